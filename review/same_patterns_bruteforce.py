"""Do same_axis_patterns cover every window pattern of TF 'SAME' padding at every size up to 400?"""

from compactor.layers.conv import _windows, same_axis_patterns, same_padding

bad = []
for k in range(1, 8):
    for s in range(1, 7):
        for d in range(1, 4):
            found = set(same_axis_patterns(k, s, d))
            for n in range(1, 400):
                t = same_padding(n, k, s, d)
                for w in _windows(n, k, s, t // 2, t - t // 2, d):
                    if w not in found:
                        bad.append((k, s, d, n, w))
print("missing:", len(bad), bad[:5])
