"""Convolutions: Conv1d/2d/3d (grouped and depthwise too) and ConvTranspose1d/2d/3d."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Index, Role, Shrinker, Side, must_take, new_like, register, take, zero_along

_ConvNd = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BASE_FORWARDS = tuple(t.forward for t in _ConvNd)
_ConvTNd = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
Conv = nn.modules.conv._ConvNd


def is_depthwise(m: Conv) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


@register(*_ConvNd)
class ConvShrinker(Shrinker[Conv]):
    """Conv1d/2d/3d. weight: [out, in/groups, *kernel]. Depthwise (groups == in == out) is channelwise.

    A grouped conv is mixing within each group: output channel ``o`` of group ``j`` reads inputs
    ``j * in/groups ...`` only, through weight columns ``0 ... in/groups``. Every group must keep the
    same number of inputs and of outputs (:meth:`removable`), and a constant input folds or merges only
    within its group (:meth:`merge_unit`)."""

    role = Role.MIXING
    shape_attrs = ("in_channels", "out_channels", "groups")

    def role_of(self, m: Conv) -> Role:
        return Role.CHANNELWISE if is_depthwise(m) else Role.MIXING

    def expected_shapes(self, m: Conv) -> dict[str, tuple[int | None, ...]]:
        if m.groups < 1 or m.in_channels % m.groups or m.out_channels % m.groups:
            return {"weight": (-1,)}  # no shape fits: groups do not divide the channels
        return {"weight": (m.out_channels, m.in_channels // m.groups), "bias": (m.out_channels,)}

    def out_rows_zero(self, m: Conv, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 0, idx)

    def forgets_input(self, m: Conv, idx: Index) -> torch.Tensor:
        """A depthwise conv's zero filter emits its bias whatever comes in (a mixing conv's dead row is the
        writer's own, :meth:`out_rows_zero`)."""
        if not is_depthwise(m):
            return torch.zeros(len(idx), dtype=torch.bool)
        return zero_along(m.weight, 0, idx)

    def in_cols_zero(self, m: Conv, idx: Index) -> torch.Tensor:
        if m.groups == 1:
            return zero_along(m.weight, 1, idx)
        w = m.weight.detach()
        return torch.tensor(
            [bool((w[rows, col] == 0).all()) for rows, col in (_grouped_col(m, i) for i in idx.tolist())]
        )

    def can_fold(self, m: Conv) -> bool:
        # Every output position sees the whole kernel over constant values: no zero padding reaches it.
        if same_padded(m):  # 'SAME' pads wherever a window spans more than one position
            return all(k == 1 for k in _spans(m))
        return not _zero_padded(m) or m.padding_mode != "zeros"

    def fold_delta(self, m: Conv, idx: Index, k: torch.Tensor) -> torch.Tensor:
        w = m.weight.detach()
        if m.groups == 1:
            return (w[:, idx].flatten(2).sum(-1) * k.to(w)).sum(1)
        delta = torch.zeros(m.out_channels, dtype=w.dtype, device=w.device)
        for i, kk in zip(idx.tolist(), k.tolist()):
            rows, col = _grouped_col(m, i)
            delta[rows] += w[rows, col].flatten(1).sum(-1) * kk
        return delta

    def border_values(self, m: Conv, idx: Index, k: torch.Tensor) -> torch.Tensor | None:
        """Depthwise and zero padded: channel ``c`` holding ``k`` comes out as ``b_c + k * sum(w_c[t])`` over
        the taps ``t`` inside the input, one value per pattern of :func:`border_patterns`."""
        if not is_depthwise(m) or self.can_fold(m):
            return None
        masks = torch.stack([_tap_mask(m, pattern) for pattern in border_patterns(m)])  # [P, *kernel]
        w = m.weight.detach().double().cpu()[idx, 0].flatten(1)  # [len(idx), taps]
        bias = (
            m.bias.detach().double().cpu()[idx]
            if m.bias is not None
            else torch.zeros(len(idx), dtype=w.dtype)
        )
        return bias[:, None] + k.double().cpu()[:, None] * (w @ masks.flatten(1).T)

    def merge_unit(self, m: Conv, i: int) -> int:
        return i // (m.in_channels // m.groups)

    def merge_into(self, m: Conv, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            w = m.weight
            if m.groups == 1:
                shape = (1, -1) + (1,) * (w.dim() - 2)
                w[:, carrier] += (w[:, idx] * ratio.to(w).view(shape)).sum(1)
                return
            rows, into = _grouped_col(m, carrier)
            for i, r in zip(idx.tolist(), ratio.tolist()):
                their_rows, col = _grouped_col(m, i)
                if their_rows != rows:
                    raise ValueError(f"input {i} is in another group than carrier {carrier}")
                w[rows, into] += w[rows, col] * r

    def out_channels(self, m: Conv) -> int:
        return m.out_channels

    def in_channels(self, m: Conv) -> int:
        return m.in_channels

    def known_variant(self, m: Conv) -> str | None:
        return "TensorFlow 'SAME' padding computed in the forward" if same_padded(m) else None

    def probe_inputs(self, m: Conv) -> list[torch.Tensor]:
        return _probe_inputs(m)

    def removable(self, m: Conv, side: Side, idx: Index) -> Index:
        if m.groups == 1 or is_depthwise(m):
            return idx
        return _balanced(idx, m.groups, (m.out_channels if side is Side.OUT else m.in_channels) // m.groups)

    def why_unremovable(self, m: Conv) -> str:
        return f"grouped conv (groups={m.groups}) loses the same number of channels in every group"

    def what_would_remove(self, m: Conv, side: Side, idx: Index) -> str:
        if m.groups == 1 or is_depthwise(m):
            return ""
        per = (m.out_channels if side is Side.OUT else m.in_channels) // m.groups
        counts = torch.bincount(torch.unique(idx) // per, minlength=m.groups).tolist()
        most = max(counts)
        short: dict[int, list[int]] = {}
        for g, c in enumerate(counts):
            if c < most:
                short.setdefault(most - c, []).append(g)
        if not short:
            return ""
        wanted = ", ".join(
            f"{n} more in {'group' if len(gs) == 1 else 'each of groups'} {', '.join(map(str, gs))} "
            f"({side.value}puts {', '.join(f'{g * per}-{(g + 1) * per - 1}' for g in gs)})"
            for n, gs in sorted(short.items())
        )
        return f"its groups would lose {', '.join(map(str, counts))}: zero {wanted} to balance them"

    def layout(self, m: Conv, side: Side, n: int) -> Index:
        if m.groups == 1 or is_depthwise(m):
            return torch.arange(n)
        if n % m.groups:
            raise ValueError(f"{n} {side.value}put channels do not split into {m.groups} groups")
        per = (m.out_channels if side is Side.OUT else m.in_channels) // m.groups
        return torch.tensor(
            [g * per + i for g in range(m.groups) for i in range(n // m.groups)], dtype=torch.long
        )

    def channel_params(self, m: Conv, side: Side) -> dict[str, int]:
        if side is Side.OUT or is_depthwise(m):
            return {"weight": 0, "bias": 0}
        return {"weight": 1}  # a grouped conv's column c serves the rows of its group only: numel // in

    def shrink(self, m: Conv, keep_out: Index | None, keep_in: Index | None) -> Conv:
        if is_depthwise(m):
            keep = keep_out if keep_out is not None else keep_in
            assert keep is not None
            new = new_like(m, weight=must_take(m.weight, 0, keep), bias=take(m.bias, 0, keep))
            new.in_channels = new.out_channels = new.groups = len(keep)
            return new
        if keep_out is not None and m.groups > 1:
            _check_balanced(keep_out, m.groups, m.out_channels // m.groups, "outputs")
        weight = must_take(m.weight, 0, keep_out)
        if keep_in is not None:
            weight = (
                weight.index_select(1, keep_in.to(weight.device))
                if m.groups == 1
                else _grouped_cols(m, weight, keep_in)
            )
        new = new_like(m, weight=weight, bias=take(m.bias, 0, keep_out))
        new.out_channels = len(keep_out) if keep_out is not None else m.out_channels
        new.in_channels = len(keep_in) if keep_in is not None else m.in_channels
        _check_groups(new)
        return new


def _grouped_col(m: Conv, i: int) -> tuple[slice, int]:
    """Input ``i`` of a grouped conv: the weight rows of its group, and its column there."""
    group, col = divmod(i, m.in_channels // m.groups)
    per = m.out_channels // m.groups
    return slice(group * per, (group + 1) * per), col


def _grouped_cols(m: Conv, weight: torch.Tensor, keep_in: Index) -> torch.Tensor:
    """``weight`` (rows already taken) keeping inputs ``keep_in`` of each group in that group's rows."""
    per_in, rows = m.in_channels // m.groups, weight.shape[0] // m.groups
    _check_balanced(keep_in, m.groups, per_in, "inputs")
    parts = []
    for g in range(m.groups):
        cols = [i - g * per_in for i in keep_in.tolist() if i // per_in == g]
        parts.append(
            weight[g * rows : (g + 1) * rows].index_select(
                1, torch.tensor(cols, dtype=torch.long, device=weight.device)
            )
        )
    return torch.cat(parts, 0)


def _balanced(idx: Index, groups: int, per: int) -> Index:
    """The largest subset of ``idx`` that takes the same number from each of ``groups`` runs of ``per``."""
    by_group: list[list[int]] = [[] for _ in range(groups)]
    for i in sorted(set(idx.tolist())):
        by_group[i // per].append(i)
    n = min(len(b) for b in by_group)
    return torch.tensor(sorted(i for b in by_group for i in b[:n]), dtype=torch.long)


def _check_balanced(keep: Index, groups: int, per: int, what: str) -> None:
    counts = torch.bincount(keep // per, minlength=groups).tolist()
    if len(set(counts)) != 1:
        raise ValueError(f"unbalanced {what} for a conv with {groups} groups: {counts}")


def _check_groups(m: Conv) -> None:
    if m.in_channels % m.groups or m.out_channels % m.groups:
        raise ValueError(
            f"{m.in_channels} in and {m.out_channels} out channels do not split into {m.groups} groups"
        )


def axis_patterns(k: int, stride: int, before: int, after: int, dilation: int = 1) -> list[tuple[int, ...]]:
    """Along one axis of a zero-padded window (``k`` taps, ``stride``, padding ``before``/``after``,
    ``dilation``): every set of taps that falls inside the input at some output position of some input
    size ``n >= 1``, in the order first met.

    Output ``i`` reads inputs ``i*stride - before + u*dilation``, ``u < k``. Once ``n >= (k - 1) * dilation``
    no window is cut at both ends; the windows cut at the start are then the same for every ``n``, and
    those cut at the end depend on ``n`` modulo ``stride`` alone. So sizes up to that bound plus two strides
    (more here, for margin) show every pattern; a test checks a bound ten times larger finds no more."""
    found: dict[tuple[int, ...], None] = {}
    for n in range(1, 2 * ((k - 1) * dilation + before + after + 2 * stride) + 2):
        found.update(dict.fromkeys(_windows(n, k, stride, before, after, dilation)))
    return list(found)


def same_axis_patterns(k: int, stride: int, dilation: int = 1) -> list[tuple[int, ...]]:
    """:func:`axis_patterns` for TensorFlow's 'SAME' padding, whose amount depends on the input size (and is
    at most the window's span, ``(k - 1) * dilation``, so the same bound holds)."""
    found: dict[tuple[int, ...], None] = {}
    span = (k - 1) * dilation
    for n in range(1, 2 * (3 * span + 2 * stride) + 2):
        total = same_padding(n, k, stride, dilation)
        found.update(dict.fromkeys(_windows(n, k, stride, total // 2, total - total // 2, dilation)))
    return list(found)


def _windows(
    n: int, k: int, stride: int, before: int, after: int, dilation: int
) -> Iterator[tuple[int, ...]]:
    """The taps inside an input of size ``n`` at each output position."""
    out = (n + before + after - (k - 1) * dilation - 1) // stride + 1
    for i in range(max(out, 0)):
        start = i * stride - before
        yield tuple(u for u in range(k) if 0 <= start + u * dilation < n)


def same_padding(n: int, k: int, stride: int, dilation: int = 1) -> int:
    """TensorFlow's 'SAME' padding along an axis of size ``n``, in all (the smaller half before)."""
    return max((math.ceil(n / stride) - 1) * stride + (k - 1) * dilation + 1 - n, 0)


def border_patterns(m: Conv) -> list[tuple[tuple[int, ...], ...]]:
    """The border patterns of conv ``m`` (one set of taps per spatial axis) at any input size: every
    combination of :func:`axis_patterns` (or :func:`same_axis_patterns`), since each axis can take any size
    independently."""
    dims = len(m.kernel_size)
    pads = m._reversed_padding_repeated_twice  # (before, after) per axis, last axis first
    same = same_padded(m)
    axes = [
        same_axis_patterns(m.kernel_size[d], _at(m.stride, d), _at(m.dilation, d))
        if same
        else axis_patterns(
            m.kernel_size[d],
            _at(m.stride, d),
            pads[2 * (dims - 1 - d)],
            pads[2 * (dims - 1 - d) + 1],
            _at(m.dilation, d),
        )
        for d in range(dims)
    ]
    patterns: list[tuple[tuple[int, ...], ...]] = [()]
    for axis in axes:
        patterns = [(*p, a) for p in patterns for a in axis]
    return patterns


_SAME: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def same_padded(m: Conv) -> bool:
    """Whether conv ``m``, of a class with a forward of its own and no padding of its own, pads its input in
    that forward as TensorFlow's 'SAME' does (timm's ``Conv2dSame``: ``F.pad`` by :func:`same_padding`, the
    smaller half first, then the conv). Checked on probe inputs of every size modulo the stride on each axis
    (the padding depends on nothing else, so every amount it ever takes, odd ones included, is seen), the
    axes of different sizes (a forward that pads one axis by another's size is not taken for it); the answer
    is kept per layer."""
    if (
        not isinstance(m, _ConvNd)
        or type(m).forward in _BASE_FORWARDS
        or m.padding_mode != "zeros"
        or _zero_padded(m)
    ):
        return False
    known = _SAME.get(m)
    if known is None:
        known = _SAME[m] = _computes_same(m)
    return known


def _computes_same(m: Conv) -> bool:
    base: Any = next(cls for cls in type(m).__mro__ if cls in _ConvNd)
    for x in _probe_inputs(m):
        sizes = x.shape[2:]
        pads: list[int] = []
        for n, k, s, d in reversed(list(zip(sizes, m.kernel_size, m.stride, m.dilation))):  # last axis first
            total = same_padding(n, k, s, d)
            pads += [total // 2, total - total // 2]
        try:
            with torch.no_grad():
                got, want = type(m).forward(m, x), base.forward(m, F.pad(x, pads))  # no hooks run
        except Exception:  # a forward that does not take this input is no conv this module knows
            return False
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return False
    return True


def _probe_inputs(m: Conv) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, m.in_channels, *size, generator=g).to(m.weight) for size in _probe_sizes(m)]


def _probe_sizes(m: Conv) -> list[tuple[int, ...]]:
    """Input sizes for :func:`_probe_inputs`: one above the window on every axis, the axes of
    different sizes (a forward that pads one axis by another's size is not taken for 'SAME'); then each axis
    in turn through every other size modulo its stride (two sizes at least), where 'SAME' takes every amount
    of padding it ever does, odd ones included."""
    first = [k * dil + s + d for d, (k, dil, s) in enumerate(zip(m.kernel_size, m.dilation, m.stride))]
    sizes = [tuple(first)]
    for d, s in enumerate(m.stride):
        sizes += [tuple(n + r if a == d else n for a, n in enumerate(first)) for r in range(1, max(s, 2))]
    return sizes


def _spans(m: Conv) -> list[int]:
    """Each spatial axis's window span in input positions."""
    return [(k - 1) * d + 1 for k, d in zip(m.kernel_size, m.dilation)]


def _tap_mask(m: Conv, pattern: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """1 at the kernel taps inside the input for ``pattern``, 0 elsewhere (float64, the kernel's shape)."""
    mask = torch.ones((), dtype=torch.float64)
    for d, taps in enumerate(pattern):
        axis = torch.zeros(m.kernel_size[d], dtype=torch.float64)
        axis[list(taps)] = 1.0
        mask = mask[..., None] * axis
    return mask


def _at(v: int | tuple[int, ...], d: int) -> int:
    return int(v[d]) if isinstance(v, (tuple, list)) else int(v)


def _zero_padded(m: Conv) -> bool:
    """Any padding at all (``padding="same"`` pads unless every kernel extent is 1)."""
    if m.padding == "valid":
        return False
    if m.padding == "same":
        return any(p != 0 for p in m._reversed_padding_repeated_twice)
    return any(int(p) != 0 for p in (m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,)))


@register(*_ConvTNd)
class ConvTransposeShrinker(Shrinker[Conv]):
    """ConvTranspose1d/2d/3d. weight: [in, out/groups, *kernel]. Constant inputs vary at the borders."""

    role = Role.MIXING
    shape_attrs = ("in_channels", "out_channels", "groups")

    def role_of(self, m: Conv) -> Role:
        return Role.MIXING if m.groups == 1 else Role.BLOCKING

    def expected_shapes(self, m: Conv) -> dict[str, tuple[int | None, ...]]:
        if m.groups < 1 or m.out_channels % m.groups:
            return {"weight": (-1,)}
        return {"weight": (m.in_channels, m.out_channels // m.groups), "bias": (m.out_channels,)}

    def why_blocking(self, m: Conv) -> str:
        return f"grouped transposed conv (groups={m.groups})"

    def out_rows_zero(self, m: Conv, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 1, idx)

    def in_cols_zero(self, m: Conv, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 0, idx)

    def fold_delta(self, m: Conv, idx: Index, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a transposed conv spreads a constant unevenly; merge into a carrier")

    def merge_into(self, m: Conv, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            w = m.weight
            shape = (-1,) + (1,) * (w.dim() - 1)
            w[carrier] += (w[idx] * ratio.to(w).view(shape)).sum(0)

    def out_channels(self, m: Conv) -> int:
        return m.out_channels

    def in_channels(self, m: Conv) -> int:
        return m.in_channels

    def channel_params(self, m: Conv, side: Side) -> dict[str, int]:
        if m.groups != 1:
            return {}
        return {"weight": 1, "bias": 0} if side is Side.OUT else {"weight": 0}

    def shrink(self, m: Conv, keep_out: Index | None, keep_in: Index | None) -> Conv:
        new = new_like(
            m, weight=must_take(must_take(m.weight, 1, keep_out), 0, keep_in), bias=take(m.bias, 0, keep_out)
        )
        new.out_channels = len(keep_out) if keep_out is not None else m.out_channels
        new.in_channels = len(keep_in) if keep_in is not None else m.in_channels
        return new
