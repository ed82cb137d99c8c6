"""Which 'SAME'-like paddings pass same_padded's two-size probe yet put windows in positions
same_axis_patterns does not list (so a depthwise profile fold could be wrong at other sizes)?
(a) totals from the other axis (h/w mixed up): the probe's sizes are equal on both axes for a square conv;
(b) the larger half first, where both probe sizes have even totals."""

from compactor.layers.conv import _windows, same_axis_patterns, same_padding

for k in range(1, 7):
    for s in range(1, 6):
        for d in range(1, 3):
            known = set(same_axis_patterns(k, s, d))
            totals = {same_padding(m, k, s, d) for m in range(1, 200)}
            a = {
                w for n in range(1, 200) for t in totals for w in _windows(n, k, s, t // 2, t - t // 2, d)
            } - known
            n0 = k * d + s
            even = all(same_padding(n, k, s, d) % 2 == 0 for n in (n0, n0 + 1))
            b = set()
            if even:
                for n in range(1, 200):
                    t = same_padding(n, k, s, d)
                    b |= set(_windows(n, k, s, t - t // 2, t // 2, d))
                b -= known
            if a or b:
                print(
                    f"k={k} s={s} d={d}: (a) unlisted {sorted(a)}; (b) passes probe={even}, unlisted {sorted(b)}"
                )
