"""The engine's test zoo: one tiny model per topology, masked the ways users mask, and an oracle.

Each :class:`Case` builds a masked model (``torch.nn.utils.prune`` hooks still attached unless the case
bakes them) and lists its channel groups as :class:`Link`s. :func:`expected_fates` computes, from the
weights, masks and BatchNorm parameters alone (never from running the compacted model), what exact
compaction must do with every zeroed channel; :func:`expected_widths` turns that into the channel count
of every rebuilt layer. ``docs/EXACTNESS.md`` has the math.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune

import compactor

# --- masking helpers: the ways users mask ------------------------------------------------------------


def mask_ln(module: nn.Module, amount: float, dim: int = 0, n: int = 2) -> nn.Module:
    """``prune.ln_structured``: zero the ``amount`` of slices along ``dim`` with the smallest Ln norm."""
    return prune.ln_structured(module, "weight", amount=amount, n=n, dim=dim)


def mask_random(module: nn.Module, amount: float, dim: int = 0) -> nn.Module:
    return prune.random_structured(module, "weight", amount=amount, dim=dim)


def mask_channels(
    module: nn.Module, channels: Sequence[int], dim: int = 0, name: str = "weight"
) -> nn.Module:
    """``prune.custom_from_mask``: zero exactly ``channels`` along ``dim`` of ``module.<name>``."""
    tensor = getattr(module, name)
    mask = torch.ones_like(tensor)
    mask.index_fill_(dim, torch.tensor(list(channels), dtype=torch.long), 0.0)
    return prune.custom_from_mask(module, name, mask)


def bake(model: nn.Module) -> nn.Module:
    """``prune.remove`` everywhere: zeros stay in plain weights, hooks and ``*_orig`` go."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def zero_bn(bn: nn.modules.batchnorm._BatchNorm, channels: Sequence[int]) -> None:
    """Hand-zeroed BatchNorm (network slimming): weight and bias zero, so the channel emits exactly 0."""
    with torch.no_grad():
        idx = torch.tensor(list(channels), dtype=torch.long)
        bn.weight[idx] = 0.0
        bn.bias[idx] = 0.0


def perturb_norms(model: nn.Module, shape: Sequence[int], seed: int = 0) -> nn.Module:
    """Leave BatchNorm/GroupNorm as fine-tuning with masks would: random gamma, beta (non-zero) and running
    statistics, except that a channel whose input is constant keeps that constant as ``running_mean``
    (exactly 0 for a dead filter with no bias), as the running average of a constant converges to it.
    Hand-zeroed BatchNorm channels (weight and bias zero) stay zero."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))]
    seen: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
    hooks = [m.register_forward_pre_hook(lambda m, a: seen[m].append(a[0].detach())) for m in norms]
    training = model.training
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*shape, generator=g))
    for h in hooks:
        h.remove()
    model.train(training)
    with torch.no_grad():
        for m in norms:
            n = m.num_features if isinstance(m, nn.modules.batchnorm._BatchNorm) else m.num_channels
            slim = (m.weight == 0) & (m.bias == 0)
            m.weight.copy_(torch.where(slim, 0.0, torch.rand(n, generator=g) + 0.5))
            sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
            m.bias.copy_(torch.where(slim, 0.0, sign * (torch.rand(n, generator=g) * 0.9 + 0.1)))
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                x = torch.cat([t.movedim(1, 0).flatten(1) for t in seen[m]], 1)
                constant = (x == x[:, :1]).all(1)
                mean = torch.randn(n, generator=g) * 0.3
                m.running_mean.copy_(torch.where(constant, x[:, 0], mean))
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model


# --- the oracle ---------------------------------------------------------------------------------------

RELU, RELU6, SILU = "relu", "relu6", "silu"
AVGPOOL3 = (
    "avgpool3"  # F.avg_pool2d(x, 3, stride=1, padding=1), counting the padding (torchvision's Inception3)
)
ACTIVATIONS = (RELU, RELU6, SILU, AVGPOOL3)


@dataclass(frozen=True)
class Read:
    """A mixing layer reading a group: root channel c arrives at inputs ``offset + c*expand ... + expand``."""

    layer: str
    offset: int = 0
    expand: int = 1  # flatten: one channel becomes ``expand`` features
    first: int = 0  # only root channels first ... first + count reach this layer (a chunk)
    count: int | None = None
    step: int = 0  # channels-last flatten: channel c's copies sit ``step`` apart (c, c + step, ...)
    at: tuple[int, ...] = ()  # a permutation (roll, channel shuffle): channel c arrives at input ``at[c]``
    steps: tuple[str, ...] = ()  # functional steps on the way to this layer alone (``AVGPOOL3``)

    def sees(self, c: int) -> bool:
        return c >= self.first and (self.count is None or c < self.first + self.count)

    def inputs(self, c: int) -> list[int]:
        if not self.sees(c):
            return []
        if self.at:
            return [self.offset + self.at[c - self.first]]
        if self.step:
            return [self.offset + c - self.first + k * self.step for k in range(self.expand)]
        start = self.offset + (c - self.first) * self.expand
        return list(range(start, start + self.expand))


@dataclass(frozen=True)
class Link:
    """One channel group as the test sees it.

    ``paths``: each starts with a mixing layer writing the channels, then the channelwise layers and
    activations (``"relu"``, ``"relu6"``) on the way to the point where the paths are summed (a residual
    add); ``after``: channelwise layers and activations after the sum; ``reads``: the mixing layers
    that read the result. ``blocked``: the group must be kept whole (the reason's text, matched loosely).
    ``gated``: the first path is multiplied by the others (a gate) instead of added to them: a channel
    is zero downstream when the first path carries 0, and otherwise varies with the gate.
    """

    paths: tuple[tuple[str, ...], ...]
    reads: tuple[Read, ...]
    after: tuple[str, ...] = ()
    blocked: str = ""
    gated: bool = False
    chunks: int = 0  # the channels pass ``chunk(chunks)``: each piece must lose as many channels

    @property
    def root(self) -> str:
        return self.paths[0][0]


REMOVED, FOLDED, MERGED, CARRIER, KEPT = "removed", "folded", "merged", "carrier", "kept"


@dataclass(frozen=True)
class Fates:
    """The oracle's verdict for one link: a fate per root channel."""

    link: Link
    fates: tuple[str, ...]
    values: tuple[float | None, ...] = field(default=())

    @property
    def removed(self) -> list[int]:
        return [c for c, f in enumerate(self.fates) if f in (REMOVED, FOLDED, MERGED)]


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules and bare parameters (a LayerScale ``gamma``) by name."""
    return {**dict(model.named_parameters()), **dict(model.named_modules())}  # type: ignore[dict-item]


def _weight(m: nn.Module) -> torch.Tensor:
    return m.weight.detach()  # after a forward, masked modules hold weight_orig * weight_mask


def _out_dim(m: nn.Module) -> int:
    return 1 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 0


def _row_zero(m: nn.Module, c: int) -> bool:
    return bool((_weight(m).select(_out_dim(m), c) == 0).all())


def _col_zero(m: nn.Module, idx: Sequence[int]) -> bool:
    w = _weight(m)
    if _is_grouped(m):  # input i of a grouped conv: column i % per_in of its group's rows
        per_in, per_out = m.in_channels // m.groups, m.out_channels // m.groups
        return all(
            bool((w[i // per_in * per_out : (i // per_in + 1) * per_out, i % per_in] == 0).all()) for i in idx
        )
    in_dim = 0 if isinstance(m, nn.modules.conv._ConvTransposeNd) else 1
    return all(bool((w.select(in_dim, i) == 0).all()) for i in idx)


def _is_grouped(m: nn.Module) -> bool:
    conv = isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd)
    return conv and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels)


def _units_at(modules: dict[str, nn.Module], link: Link, c: int) -> dict[str, tuple[int, ...]]:
    """Per zero-padded reader: the group of each input where channel ``c`` enters (0: not grouped). The
    engine keeps one carrier per such place, and shares carriers only between channels entering alike."""
    out: dict[str, tuple[int, ...]] = {}
    for r in link.reads:
        m = modules[r.layer]
        if _padded(m):
            out[r.layer] = out.get(r.layer, ()) + tuple(
                i // (m.in_channels // m.groups) if _is_grouped(m) else 0 for i in r.inputs(c)
            )
    return out


def _uneven(per: int, groups: int, channels: Sequence[int], removed: set[int]) -> set[int]:
    """Of ``removed`` (indices into a layer side with ``groups`` runs of ``per``, channel ``c`` at index
    ``channels[c]``), those over the smallest per-group count: the engine keeps the lowest indices."""
    by_group: dict[int, list[int]] = defaultdict(list)
    for c in sorted(removed, key=lambda c: channels[c]):
        by_group[channels[c] // per].append(c)
    n = min(len(by_group.get(g, [])) for g in range(groups))
    return {c for cs in by_group.values() for c in cs[n:]}


def _padded(m: nn.Module) -> bool:
    """A constant input varies at the borders: zero-padded conv, or any transposed conv."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return True
    if isinstance(m, nn.modules.conv._ConvNd):
        pads = m.padding if isinstance(m.padding, tuple) else (m.padding,)
        return m.padding != "valid" and any(p != 0 for p in pads) and m.padding_mode == "zeros"
    return False


Profile = tuple[float, ...]  # a value per border pattern (one value: the same at every position)


def _through(
    modules: dict[str, nn.Module],
    steps: Sequence[str],
    c: int,
    v: Profile | None,
    dead: set[int],
) -> Profile | None:
    """The profile ``v`` of channel ``c`` after ``steps`` (None: it varies with the input).

    A zero-padded depthwise conv (or an average pool counting its padding) turns a constant into a value
    per border pattern: which of its taps fall inside the image, over every output position of every
    input size (:func:`patterns`). The oracle follows that profile pointwise through the layers after."""
    if v is None:
        return None
    for step in steps:
        if step in (RELU, RELU6, SILU):
            act = {RELU: lambda x: max(x, 0.0), RELU6: lambda x: min(max(x, 0.0), 6.0), SILU: _silu}[step]
            v = tuple(act(x) for x in v)
            continue
        if step == AVGPOOL3:
            v = _spread(v, [len(a) * len(b) / 9.0 for a, b in patterns((3, 3), (1, 1), (1, 1))])
            continue
        m = modules[step]
        if isinstance(m, nn.Parameter):  # a per-channel scale
            v = tuple(x * float(m.detach()[c]) for x in v)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            mean, var = float(m.running_mean[c]), float(m.running_var[c])
            gamma, beta = float(m.weight.detach()[c]), float(m.bias.detach()[c])
            v = tuple((x - mean) / (var + m.eps) ** 0.5 * gamma + beta for x in v)
        elif isinstance(m, nn.GroupNorm):
            size = m.num_channels // m.num_groups
            group = range(c // size * size, (c // size + 1) * size)
            if not all(g in dead for g in group):
                return None
            v = (float(m.bias.detach()[c]),)
        elif isinstance(m, nn.modules.conv._ConvNd):  # depthwise: each channel has its own filter
            bias = float(m.bias.detach()[c]) if m.bias is not None else 0.0
            w = _weight(m)[c, 0].double()  # a 16-bit kernel summed in its own precision rounds
            if not _padded(m):
                v = tuple(x * float(w.sum()) + bias for x in v)
            else:
                if len(v) != 1:
                    raise ValueError(
                        f"the oracle follows one zero-padded depthwise conv per path, not {step}"
                    )
                sums = [
                    float(w[list(a)][:, list(b)].sum())
                    for a, b in patterns(m.kernel_size, m.stride, m.padding)
                ]
                v = tuple(v[0] * s + bias for s in sums)
        else:
            raise TypeError(f"the oracle does not know {type(m).__name__} ({step})")
    return v


def _silu(x: float) -> float:
    return float(F.silu(torch.tensor(x, dtype=torch.float64)))


def _spread(v: Profile, weights: list[float]) -> Profile:
    if len(v) != 1:
        raise ValueError("the oracle follows one position-varying step per path")
    return tuple(v[0] * w for w in weights)


def patterns(
    kernel: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...] | str
) -> list[tuple[tuple[int, ...], ...]]:
    """The sets of taps inside the image, per axis, over every output position of every input size from
    1 to 40 (brute force; 2-D, symmetric padding), every combination of the two axes."""
    assert isinstance(padding, tuple)
    axes = []
    for k, st, pad in zip(kernel, stride, padding):
        found: dict[tuple[int, ...], None] = {}
        for n in range(1, 41):
            for i in range((n + 2 * pad - k) // st + 1):
                found[tuple(j for j in range(k) if 0 <= i * st - pad + j < n)] = None
        axes.append(list(found))
    return [(a, b) for a in axes[0] for b in axes[1]]


def expected_fates(model: nn.Module, link: Link, shape: Sequence[int] | None = None) -> Fates:
    """What exact compaction does with each root channel of ``link``, from weights and norms alone.

    A channel through a zero-padded depthwise conv has a profile over every border pattern at any input
    size: zero everywhere is removed, the same everywhere is a constant as before, and of the others a
    basis stays per group (as many channels as the rank of their profiles, besides the constant map a
    bias takes) and the rest merge into it. Through an average pool counting its padding, every map is
    a multiple of one: one carrier. A dead filter multiplied by a live gate stays. (``shape`` is unused:
    exact at every input size, the fates do not depend on it.)"""
    modules = _modules(model)
    first = modules[link.root]
    n = _weight(first).shape[_out_dim(first)]
    dead = {c for c in range(n) if all(_row_zero(modules[p[0]], c) for p in link.paths)}
    dead |= {c for c in range(n) if len(link.paths) == 1 and _slimmed(modules, link.paths[0], c)}
    gate_kept: set[int] = set()
    if link.gated:  # zero times the gate is zero; any other value times the gate varies with the input
        main = link.paths[0]
        rows = {c for c in range(n) if _row_zero(modules[main[0]], c)}
        dead = {c for c in rows if _value(modules, Link((main,), ()), c, set()) == (0.0,)}
        gate_kept = rows - dead
    fates: list[str] = []
    values: list[float | None] = []
    varying: dict[int, list[Profile]] = {}
    general = False
    for c in range(n):
        reads = [r for r in link.reads if r.sees(c)]
        ignored = bool(reads) and all(_col_zero(modules[r.layer], r.inputs(c)) for r in reads)
        value: float | None = None
        if c in gate_kept and not ignored and not link.blocked:
            fates.append(KEPT)
        elif c not in dead and not ignored:
            fates.append("live")
        elif link.blocked:
            fates.append(KEPT)
        elif ignored:
            fates.append(REMOVED)
        else:
            base = (0.0,) if link.gated else _value(modules, link, c, dead)
            at = [_through(modules, r.steps, c, base, dead) for r in reads]
            if base is None or any(p is None for p in at):
                fates.append(KEPT)
            elif all(p is not None and len(set(p)) == 1 for p in at):  # a constant wherever it is read
                value = base[0]
                if value == 0.0:
                    fates.append(REMOVED)
                elif any(_padded(modules[r.layer]) for r in reads):
                    fates.append(MERGED)
                else:
                    fates.append(FOLDED)
            else:
                varying[c] = [p for p in at if p is not None]
                general = general or len(base) > 1
                fates.append(KEPT)
        values.append(value)
    verdict = _settle(modules, link, fates, values)
    if not varying:
        return verdict
    foldable = not any(_padded(modules[r.layer]) for r in link.reads)
    keep = _basis_size(list(varying.values()), foldable) if general else 1
    final = list(verdict.fates)
    if len(varying) > keep:  # a basis stays (the lowest channels here: the count is what is predicted)
        for i, c in enumerate(sorted(varying)):
            final[c] = CARRIER if i < keep else MERGED
    return Fates(link, tuple(final), verdict.values)


def _basis_size(profiles: list[list[Profile]], foldable: bool) -> int:
    """How many channels span these profiles (concatenated over the readers), besides the constant map
    a bias takes where every reader folds one."""
    rows = [torch.tensor([x for p in ps for x in p], dtype=torch.float64) for ps in profiles]
    if foldable:
        rows.append(torch.ones_like(rows[0]))
    mat = torch.stack(rows)
    rank = int(torch.linalg.matrix_rank(mat, rtol=1e-9))  # the engine measures in float64: exact is ~1e-13
    return rank - 1 if foldable else rank


def _settle(modules: dict[str, nn.Module], link: Link, first: list[str], values: list[float | None]) -> Fates:
    """One carrier per group (per group of a grouped conv reading it), one channel per layer at least, whole
    groups only for a GroupNorm on the way, and as many channels from each group of a grouped conv (a
    channel a layer cannot lose is kept; the carriers are chosen again without it)."""
    pinned: set[int] = set()
    while True:
        fates = [KEPT if c in pinned else f for c, f in enumerate(first)]
        by_unit: dict[tuple[tuple[str, tuple[int, ...]], ...], list[int]] = defaultdict(list)
        for c, f in enumerate(fates):
            if f == MERGED:
                by_unit[tuple(_units_at(modules, link, c).items())].append(c)  # one carrier per place
        for (
            needs
        ) in by_unit.values():  # the engine's choice: the largest constant is the best-conditioned carrier
            carrier = max(needs, key=lambda c: abs(values[c]))  # type: ignore[arg-type]
            fates[carrier] = CARRIER
        removed = [c for c, f in enumerate(fates) if f in (REMOVED, FOLDED, MERGED)]
        if removed and len(removed) == len(fates):  # a layer needs at least one channel
            fates[removed[0]] = KEPT
            removed = removed[1:]
        more = _layout_pins(modules, link, len(fates), set(removed))
        if not more:
            return Fates(link, tuple(fates), tuple(values))
        pinned |= more


def _layout_pins(modules: dict[str, nn.Module], link: Link, n: int, removed: set[int]) -> set[int]:
    """Of ``removed``, what a layer cannot lose: part of a GroupNorm group, or more from one group of a
    grouped conv (writer or reader) than from another."""
    more: set[int] = set()
    for gn in (modules[s] for p in link.paths for s in p[1:] if isinstance(modules.get(s), nn.GroupNorm)):
        size = gn.num_channels // gn.num_groups
        for g in range(gn.num_groups):
            group = set(range(g * size, (g + 1) * size))
            if group & removed and not group <= removed:
                more |= group & removed
    for name in [p[0] for p in link.paths if _is_grouped(modules[p[0]])]:  # writers
        m = modules[name]
        more |= _uneven(m.out_channels // m.groups, m.groups, range(n), removed)
    if link.chunks:  # as many from each piece (the latest kept), and never a whole piece
        per = n // link.chunks
        at_most = min(len([c for c in removed if c // per == p]) for p in range(link.chunks))
        at_most = min(at_most, per - 1)
        for p in range(link.chunks):
            more |= set(sorted(c for c in removed if c // per == p)[at_most:])
    for r in link.reads:  # readers
        m = modules[r.layer]
        if _is_grouped(m):
            seen = {c for c in removed if r.sees(c)}
            more |= _uneven(m.in_channels // m.groups, m.groups, {c: r.inputs(c)[0] for c in seen}, seen)
    return more


def _slimmed(modules: dict[str, nn.Module], path: Sequence[str], c: int) -> bool:
    """A BatchNorm on the (only) path with weight 0 emits its bias whatever comes in."""
    return any(
        isinstance(modules.get(s), nn.modules.batchnorm._BatchNorm)
        and float(modules[s].weight.detach()[c]) == 0.0
        for s in path[1:]
    )


def _value(modules: dict[str, nn.Module], link: Link, c: int, dead: set[int]) -> Profile | None:
    total: Profile | None = (0.0,)
    for path in link.paths:
        steps = list(path[1:])
        if _row_zero(modules[path[0]], c):
            bias = getattr(modules[path[0]], "bias", None)
            v: Profile | None = (float(bias.detach()[c]) if bias is not None else 0.0,)
        else:  # slimmed: start after the BatchNorm that forgets the input
            cut = max(i for i, s in enumerate(steps) if _slimmed(modules, [path[0], s], c))
            v, steps = (float(modules[steps[cut]].bias.detach()[c]),), steps[cut + 1 :]
        v = _through(modules, steps, c, v, dead)
        if v is None or total is None:
            total = None
        elif len(v) == 1 or len(total) == 1 or len(v) == len(total):
            n = max(len(v), len(total))
            total = tuple((v[i % len(v)]) + total[i % len(total)] for i in range(n))
        else:
            raise ValueError("the oracle sums profiles of one pattern set only")
    return _through(modules, link.after, c, total, dead)


def expected_all(model: nn.Module, links: Sequence[Link], shape: Sequence[int] | None = None) -> list[Fates]:
    """:func:`expected_fates` of every link, then carriers shared between links: a link's carrier is
    merged into another's when every zero-padded layer it is read by also reads that one (with as many
    inputs). Carriers read by the most padded layers host first; a link keeps its carrier when merging it
    would leave no channel (the engine's order: most padded readers, then largest constant)."""
    modules = _modules(model)
    verdicts = [expected_fates(model, link, shape) for link in links]

    def padded(link: Link) -> dict[str, int]:  # padded layer -> how many of its inputs one channel takes
        counts: dict[str, int] = defaultdict(int)
        for r in link.reads:
            if _padded(modules[r.layer]):
                counts[r.layer] += r.expand
        return counts

    carriers = [  # a position-varying group's carriers (no constant) stay in their group
        i
        for i, v in enumerate(verdicts)
        if v.fates.count(CARRIER) == 1 and v.values[v.fates.index(CARRIER)] is not None
    ]
    hosts: list[int] = []

    def strength(i: int) -> float:  # the engine's tie-break: the best-conditioned carrier hosts first
        return abs(verdicts[i].values[verdicts[i].fates.index(CARRIER)] or 0.0)

    for i in sorted(carriers, key=lambda i: (-len(padded(links[i])), -strength(i), i)):
        mine = padded(links[i])
        at = _units_at(modules, links[i], verdicts[i].fates.index(CARRIER))
        host = next(
            (
                h
                for h in hosts
                if all(padded(links[h]).get(n) == c for n, c in mine.items())
                and all(
                    _units_at(modules, links[h], verdicts[h].fates.index(CARRIER)).get(n) == u
                    for n, u in at.items()
                )
            ),
            None,
        )
        fates = list(verdicts[i].fates)
        if host is None or len(verdicts[i].removed) + 1 >= len(fates):
            hosts.append(i)
            continue
        fates[fates.index(CARRIER)] = MERGED
        removed = {c for c, f in enumerate(fates) if f in (REMOVED, FOLDED, MERGED)}
        if _layout_pins(modules, links[i], len(fates), removed):  # one more would unbalance a layer: host
            hosts.append(i)
            continue
        verdicts[i] = Fates(links[i], tuple(fates), verdicts[i].values)
    return verdicts


def expected_widths(
    model: nn.Module, links: Sequence[Link], shape: Sequence[int] | None = None
) -> dict[str, tuple[int | None, int | None]]:
    """Per layer touched by a link: (out channels, in channels) after exact compaction (None: not mixing)."""
    modules = _modules(model)
    removed_out: dict[str, set[int]] = defaultdict(set)
    removed_in: dict[str, set[int]] = defaultdict(set)
    layers: list[str] = []
    for link, verdict in zip(links, expected_all(model, links, shape)):
        gone = verdict.removed
        for path in link.paths:
            for step in path:
                if step not in ACTIVATIONS:
                    removed_out[step].update(gone)
                    layers.append(step)
        for step in link.after:
            if step not in ACTIVATIONS:
                removed_out[step].update(gone)
                layers.append(step)
        for r in link.reads:
            for c in gone:
                removed_in[r.layer].update(r.inputs(c))
            layers.append(r.layer)
    widths = {}
    for name in dict.fromkeys(layers):
        m = modules[name]
        out, inn = _widths(m)
        widths[name] = (
            None if out is None else out - len(removed_out[name]),
            None if inn is None else inn - len(removed_in[name]),
        )
    return widths


def _widths(m: nn.Module) -> tuple[int | None, int | None]:
    if isinstance(m, nn.Parameter):
        return m.shape[0], None
    if isinstance(m, nn.Linear):
        return m.out_features, m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        if m.groups > 1 and m.groups == m.in_channels == m.out_channels:
            return m.out_channels, None
        return m.out_channels, m.in_channels
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.num_features, None
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, None
    raise TypeError(type(m).__name__)


def actual_widths(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int | None, int | None]]:
    modules = _modules(model)
    return {n: _widths(modules[n]) for n in names}


# --- the models: one per topology ---------------------------------------------------------------------


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class ConvChain(nn.Module):
    """conv-BN-ReLU x3 -> global pool -> Linear. Padded, padded, unpadded 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2, self.b3 = _cbr(3, 16), _cbr(16, 24), _cbr(24, 12, k=1, padding=0)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.b3(self.b2(self.b1(x))), 1).flatten(1))


class ResidualBlock(nn.Module):
    """Stem, then a ResNet basic block with a strided downsample, then pool -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.conv1, self.bn1 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, 2, bias=False), nn.BatchNorm2d(32))
        self.fc = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        y = F.relu(y + self.down(x))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))


class DenseConcat(nn.Module):
    """A two-layer DenseNet block: each tensor feeds both the next conv and a ``torch.cat`` of everything
    so far, and the second cat holds the first."""

    def __init__(self) -> None:
        super().__init__()
        self.b0, self.b1, self.b2 = _cbr(3, 8), _cbr(8, 4), _cbr(12, 4)
        self.b3 = _cbr(16, 8, k=1, padding=0)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.b0(x)
        x1 = torch.cat([x0, self.b1(x0)], 1)
        x2 = torch.cat([x1, self.b2(x1)], 1)
        return self.fc(self.b3(x2).mean((2, 3)))


class InceptionBranches(nn.Module):
    """Three branches of different kernels concatenated, then a padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = _cbr(3, 4, k=1, padding=0), _cbr(3, 6), _cbr(3, 6, k=5, padding=2)
        self.mix = _cbr(16, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x), self.c(x)], 1)
        return self.fc(self.mix(y).mean((2, 3)))


class RepeatedConcat(nn.Module):
    """``cat([x, x])`` into a padded conv: every channel of x is read twice by the same layer."""

    def __init__(self) -> None:
        super().__init__()
        self.b0 = _cbr(3, 8)
        self.mix = _cbr(16, 6)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b0(x)
        return self.fc(self.mix(torch.cat([x, x], 1)).mean((2, 3)))


class ChunkBranches(nn.Module):
    """One conv, ``chunk`` into two halves, each half into its own conv. ``chunk`` cuts at the runtime
    size, so each half may lose as many channels as the other (Torch-Pruning 1.6.1 maps the halves the
    wrong way round: compactor's own channel labels answer here)."""

    def __init__(self) -> None:
        super().__init__()
        self.b0 = _cbr(3, 16)
        self.left, self.right = _cbr(8, 6), _cbr(8, 6)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.b0(x).chunk(2, dim=1)
        return self.fc(torch.cat([self.left(a), self.right(b)], 1).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1, with the residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.expand, self.bn1 = nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.dw, self.bn2 = nn.Conv2d(64, 64, 3, 1, 1, groups=64, bias=False), nn.BatchNorm2d(64)
        self.project, self.bn3 = nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        y = x + self.bn3(self.project(y))
        return self.fc(y.mean((2, 3)))


class GroupedConv(nn.Module):
    """A conv whose output feeds a padded groups=2 conv: constants merge into one carrier per group, and
    each group keeps as many channels as the others, on both sides of the grouped conv."""

    def __init__(self) -> None:
        super().__init__()
        self.b0 = _cbr(3, 16)
        self.gconv, self.bn = nn.Conv2d(16, 16, 3, 1, 1, groups=2, bias=False), nn.BatchNorm2d(16)
        self.b2 = _cbr(16, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b2(F.relu(self.bn(self.gconv(self.b0(x)))))
        return self.fc(y.mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """A ResNeXt bottleneck: 1x1 -> 3x3 with groups=4 -> 1x1, residual add, a biased grouped 1x1 next to it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 16)
        self.conv1, self.bn1 = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 32, 3, 1, 1, groups=4, bias=False), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.side = nn.Conv2d(16, 8, 1, groups=2)  # unpadded: constants fold into its bias, group by group
        self.fc = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        x = F.relu(x + self.bn3(self.conv3(y)))
        return self.fc(torch.cat([x, self.side(x)], 1).mean((2, 3)))


class GroupedConcat(nn.Module):
    """A grouped conv's output concatenated with a dense branch into one padded conv: the branches' carriers
    could share one, but the grouped writer cannot lose a carrier from one of its groups alone."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.p, self.pbn = nn.Conv2d(8, 8, 3, 1, 1, groups=2, bias=False), nn.BatchNorm2d(8)
        self.q, self.qbn = nn.Conv2d(8, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(16, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([F.relu(self.pbn(self.p(x))), F.relu(self.qbn(self.q(x)))], 1)
        return self.fc(self.c(y).mean((2, 3)))


class CatResidual(nn.Module):
    """Two branches concatenated, then added to the tensor they read (GhostNet's ghost module and shortcut,
    Res2Net's cat before the add): channel c of a branch meets channel c of the stem at the add, after the cat.
    Not a :data:`CASES` entry: :func:`cat_residual_masked` masks it for the report's tests."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.a, self.b = _cbr(8, 4), _cbr(8, 4)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.a(x), self.b(x)], 1) + x
        return self.fc(y.mean((2, 3)))


class TransposedDecoder(nn.Module):
    """Encoder conv (stride 2) -> ConvTranspose2d (x2) -> conv back to 3 channels: an image-to-image model."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = _cbr(3, 16, stride=2)
        self.up, self.bn = nn.ConvTranspose2d(16, 12, 4, 2, 1, bias=False), nn.BatchNorm2d(12)
        self.head = nn.Conv2d(12, 3, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.bn(self.up(self.enc(x)))))


class UNet(nn.Module):
    """A two-level U-Net: skip connections concatenated after transposed-conv upsampling."""

    def __init__(self) -> None:
        super().__init__()
        self.e1, self.e2 = nn.Sequential(_cbr(3, 8), _cbr(8, 8)), nn.Sequential(_cbr(8, 16), _cbr(16, 16))
        self.mid = _cbr(16, 32)
        self.up2, self.d2 = nn.ConvTranspose2d(32, 16, 2, 2), nn.Sequential(_cbr(32, 16), _cbr(16, 16))
        self.up1, self.d1 = nn.ConvTranspose2d(16, 8, 2, 2), nn.Sequential(_cbr(16, 8), _cbr(8, 8))
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.e1(x)
        b = self.e2(F.max_pool2d(a, 2))
        m = self.mid(F.max_pool2d(b, 2))
        u = self.d2(torch.cat([self.up2(m), b], 1))
        return self.head(self.d1(torch.cat([self.up1(u), a], 1)))


class Conv1dNet(nn.Module):
    """1-D signal: padded conv, padded conv, 1x1 conv, mean over time, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv1d(4, 16, 5, padding=2), nn.BatchNorm1d(16)
        self.c2, self.bn2 = nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16)
        self.c3 = nn.Conv1d(16, 8, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(x)))
        return self.fc(F.relu(self.c3(x)).mean(-1))


class NormUsers(nn.Module):
    """GroupNorm after a conv (whole groups may go, partial ones not) and LayerNorm in an MLP head (blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.gn = nn.Conv2d(3, 16, 3, 1, 1), nn.GroupNorm(4, 16)
        self.conv2, self.bn2 = nn.Conv2d(16, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8)
        self.fc1, self.ln = nn.Linear(8, 16), nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn(self.conv(x)))
        x = F.relu(self.bn2(self.conv2(x))).mean((2, 3))
        return self.fc2(F.relu(self.ln(self.fc1(x))))


class FlattenLinear(nn.Module):
    """conv (with bias) -> BN -> ReLU -> maxpool -> flatten -> Linear -> ReLU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(20, 64), nn.Linear(64, 48), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SqueezeExcite(nn.Module):
    """conv -> BN -> ReLU, gated by squeeze (pool -> 1x1 reduce -> ReLU -> 1x1 expand -> sigmoid)."""

    def __init__(self) -> None:
        super().__init__()
        self.b0 = _cbr(3, 16)
        self.reduce, self.expand = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.b1 = _cbr(16, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b0(x)
        s = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return self.fc(self.b1(x * s).mean((2, 3)))


class RollChannels(nn.Module):
    """``torch.roll`` along channels: torch-pruning takes it for channel-preserving; compactor's channel
    labels follow the roll (channel c arrives at input c + 1 of ``b1``)."""

    def __init__(self) -> None:
        super().__init__()
        self.b0, self.b1 = _cbr(3, 8), _cbr(8, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b1(torch.roll(self.b0(x), 1, dims=1)).mean((2, 3)))


class ChannelsLastFlatten(nn.Module):
    """``permute`` to channels-last, then flatten into a Linear: torch-pruning maps the features as if
    channels came first; compactor's channel labels find channel c at features c, c + 8, c + 16, c + 24."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        return self.fc(x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))


class PaddingModes(nn.Module):
    """One stream read by a ``padding="same"`` conv (zero padded: merge) and a reflect-padded conv (a
    constant stays constant: fold); a circular-padded conv after (traced as channel-preserving slices)."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.same = nn.Conv2d(8, 6, 3, padding="same", dilation=2)
        self.reflect = nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect")
        self.circular = nn.Conv2d(6, 4, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.c0(x)))
        y = F.relu(self.same(x) + self.reflect(x))
        return self.fc(self.circular(y).mean((2, 3)))


class LayerScale(nn.Module):
    """A learnt per-channel scale (a bare ``nn.Parameter``, ConvNeXt-style) between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.c2 = nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.c1(x))) * self.gamma.view(1, -1, 1, 1)
        return self.fc(self.c2(x).mean((2, 3)))


class CancellingNorm(nn.Module):
    """A conv with a large bias (2e4) whose BatchNorm subtracts it again (small variance): float32 keeps
    ~1e-3 of rounding in every output, ten times the tolerance, before anything is removed."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.c1(x)))
        return self.fc(F.relu(self.bn2(self.c2(x))).mean((2, 3)))


class DeadLayer(nn.Module):
    """Every filter of ``conv2`` pruned: the output no longer depends on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, 1, 1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


# --- torchvision blocks whose dead filters vary with position (issue 11) -----------------------------------


def _conv_norm_act(
    cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU6
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: conv (padding ``(k - 1) // 2``, no bias), BatchNorm, activation."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class TVInvertedResidual(nn.Module):
    """torchvision ``mobilenetv2.InvertedResidual``: ``conv = [pw ConvNormAct(ReLU6), dw ConvNormAct(ReLU6,
    stride), Conv2d 1x1, BatchNorm]``, ``x + conv(x)`` where stride 1 and the widths match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            _conv_norm_act(inp, hidden, 1),
            _conv_norm_act(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class TVMobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout, small: stem (stride 2), a residual block and a stride-2 block."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_norm_act(3, 16, 3, 2),
            TVInvertedResidual(16, 16, 1, 6),
            TVInvertedResidual(16, 24, 2, 6),
            _conv_norm_act(24, 32, 1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class MnasInvertedResidual(nn.Module):
    """torchvision ``mnasnet._InvertedResidual``: pw conv, BN, ReLU, dw conv (3x3 or 5x5, padding k // 2,
    stride), BN, ReLU, pw-linear conv, BN; the residual where stride 1 and the widths match."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int, expansion_factor: int) -> None:
        super().__init__()
        mid = in_ch * expansion_factor
        self.apply_residual = in_ch == out_ch and stride == 1
        self.layers = nn.Sequential(
            nn.Conv2d(in_ch, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, stride=stride, groups=mid, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x) + x if self.apply_residual else self.layers(x)


class MnasNetSmall(nn.Module):
    """MnasNet's stem (conv stride 2, then a depthwise separable conv) and two 5x5 blocks: stride 2, then 1."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 16, 3, padding=1, stride=1, groups=16, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
            nn.Conv2d(16, 24, 1, padding=0, stride=1, bias=False),
            nn.BatchNorm2d(24),
            MnasInvertedResidual(24, 24, 5, 2, 6),
            MnasInvertedResidual(24, 24, 5, 1, 3),
        )
        self.classifier = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers(x).mean([2, 3]))


class TVSqueezeExcitation(nn.Module):
    """torchvision ``ops.SqueezeExcitation``: ``input * sigmoid(fc2(act(fc1(avgpool(input)))))``."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class MBConv(nn.Module):
    """torchvision ``efficientnet.MBConv``: expand ConvNormAct(SiLU), dw ConvNormAct(SiLU), squeeze-excite
    (``input_channels // 4`` squeezed), project ConvNormAct (no activation); the residual (stochastic depth
    is the identity in eval mode)."""

    def __init__(self, cin: int, cout: int, expand_ratio: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        hidden = cin * expand_ratio
        self.block = nn.Sequential(
            _conv_norm_act(cin, hidden, 1, act=nn.SiLU),
            _conv_norm_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
            TVSqueezeExcitation(hidden, max(1, cin // 4)),
            _conv_norm_act(hidden, cout, 1, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.block(x)
        return result + x if self.use_res_connect else result


class EfficientNetSmall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_norm_act(3, 16, 3, 2, act=nn.SiLU)
        self.mb = MBConv(16, 16, 6, 3, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mb(self.stem(x)).mean((2, 3)))


class BasicConv2d(nn.Module):
    """torchvision ``inception.BasicConv2d``: conv (no bias), BatchNorm (eps 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    """torchvision ``inception.InceptionA``, narrow: 1x1; 1x1 then 5x5; 1x1 then 3x3 twice; and
    ``avg_pool2d(x, 3, stride=1, padding=1)`` (counting the padding) then 1x1; concatenated."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 8, 1)
        self.branch5x5_1 = BasicConv2d(cin, 6, 1)
        self.branch5x5_2 = BasicConv2d(6, 8, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 8, 1)
        self.branch3x3dbl_2 = BasicConv2d(8, 12, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(12, 12, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionSmall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = BasicConv2d(3, 24, 3, padding=1)
        self.mixed = InceptionA(24, 8)
        self.fc = nn.Linear(36, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.mixed(self.stem(x)).mean((2, 3)))


# --- realistic sizes (slow tests) -------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """The ResNet basic block; a downsample (1x1 conv, BN) where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNet(nn.Module):
    """ResNet with basic blocks: ``widths=(64, 128, 256, 512), depths=(2, 2, 2, 2)`` is ResNet-18."""

    def __init__(self, widths: Sequence[int], depths: Sequence[int], classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for i, (w, d) in enumerate(zip(widths, depths)):
            blocks = [BasicBlock(cin if j == 0 else w, w, 2 if i > 0 and j == 0 else 1) for j in range(d)]
            layers.append(nn.Sequential(*blocks))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def blocks(self) -> list[str]:
        return [n for n, m in self.named_modules() if isinstance(m, BasicBlock)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1))


class InvertedBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        self.expand, self.bn1 = nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden)
        self.dw = nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False)
        self.bn2 = nn.BatchNorm2d(hidden)
        self.project, self.bn3 = nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
        y = self.bn3(self.project(y))
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 (width 1.0, the paper's block table) without the t=1 first block's special case."""

    CONFIG = (
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())
        blocks, cin = [], 32
        for t, c, n, s in self.CONFIG:
            for j in range(n):
                blocks.append(InvertedBlock(cin, c, s if j == 0 else 1, t))
                cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6())
        self.fc = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def resnet18_masked() -> tuple[nn.Module, tuple[Link, ...]]:
    """ResNet-18, 30% of every block's first conv and of the stem pruned (ln_structured), BN perturbed."""
    torch.manual_seed(0)
    m = ResNet((64, 128, 256, 512), (2, 2, 2, 2))
    links = []
    for b in m.blocks():
        mask_ln(m.get_submodule(f"{b}.conv1"), 0.3)
        links.append(Link(((f"{b}.conv1", f"{b}.bn1", RELU),), (Read(f"{b}.conv2"),)))
    return _finish(m, (2, 3, 32, 32)), tuple(links)


def mobilenet_v2_masked() -> tuple[nn.Module, tuple[Link, ...]]:
    """MobileNetV2, 30% of every expand conv pruned (ln_structured), BN perturbed."""
    torch.manual_seed(0)
    m = MobileNetV2()
    links = []
    for i, block in enumerate(m.blocks):
        if block.expand.out_channels == block.expand.in_channels:  # t=1: no expansion worth pruning
            continue
        mask_ln(block.expand, 0.3)
        b = f"blocks.{i}"
        steps = (f"{b}.expand", f"{b}.bn1", RELU6, f"{b}.dw", f"{b}.bn2", RELU6)
        links.append(Link((steps,), (Read(f"{b}.project"),)))
    return _finish(m, (2, 3, 64, 64)), tuple(links)


CAT_RESIDUAL_SHAPE = (2, 3, 10, 10)


def cat_residual_masked() -> nn.Module:
    """:class:`CatResidual` with filters 1, 2 of ``a`` and 2, 5 of the stem pruned: channel 2 is zero in both
    writers, channels 1 (live in the stem) and 5 (live in ``b``, row 1) are not."""
    torch.manual_seed(0)
    m = CatResidual()
    mask_channels(m.a[0], [1, 2])
    mask_channels(m.stem[0], [2, 5])
    return _finish(m, CAT_RESIDUAL_SHAPE)


# --- the cases ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]  # the masked model, in eval mode
    shape: tuple[int, ...]
    links: tuple[Link, ...]
    restored: bool = False  # verification must restore at least one group
    dead: str = ""  # the layer that makes the output input-independent
    noisy: bool = False  # float32 rounding of the masked model itself is above rtol=1e-4
    notes: str = ""

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.build().eval()

    def inputs(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(*self.shape, generator=torch.Generator().manual_seed(seed))


def _finish(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    return perturb_norms(model, shape, seed).eval()


def _conv_chain() -> nn.Module:
    m = ConvChain()
    mask_ln(m.b1[0], 0.5)  # 8 of 16, into a padded conv: merge
    mask_random(m.b2[0], 0.5)  # 12 of 24, into an unpadded 1x1: fold
    mask_channels(m.b3[0], [0, 3, 4, 9])  # into pool -> Linear: fold
    return _finish(m, (2, 3, 12, 12))


def _residual() -> nn.Module:
    m = ResidualBlock()
    mask_ln(m.stem[0], 0.25)  # into conv1 (padded: merge) and the downsample (1x1: fold)
    mask_ln(m.conv1, 0.5)
    mask_channels(m.conv2, [1, 2, 5, 8, 13, 21])  # the residual stream: dead only where both writers are
    mask_channels(m.down[0], [2, 5, 8, 13, 30])
    return _finish(m, (2, 3, 16, 16))


def _dense() -> nn.Module:
    m = DenseConcat()
    mask_ln(m.b0[0], 0.5)
    mask_ln(m.b1[0], 0.5)
    mask_random(m.b2[0], 0.5)
    return _finish(m, (2, 3, 12, 12))


def _inception() -> nn.Module:
    m = InceptionBranches()
    mask_channels(m.a[0], [1, 3])
    mask_ln(m.b[0], 0.5)
    mask_random(m.c[0], 0.5)
    return _finish(m, (2, 3, 12, 12))


def _repeated() -> nn.Module:
    m = RepeatedConcat()
    mask_ln(m.b0[0], 0.5)
    return _finish(m, (2, 3, 8, 8))


def _chunk() -> nn.Module:
    m = ChunkBranches()
    mask_channels(m.b0[0], [0, 1, 2, 9])  # 3 in the left half, 1 in the right
    mask_ln(m.left[0], 0.5)
    return _finish(m, (2, 3, 12, 12))


def _inverted() -> nn.Module:
    m = InvertedResidual()
    mask_ln(m.expand, 0.5)
    with torch.no_grad():
        m.expand.weight_orig[:4] = 0.0  # nothing to do with masks: a filter trained to zero
    mask_channels(m.project, [2, 7, 11], dim=1)  # ignored inputs of the projection
    return _finish(m, (2, 3, 10, 10))


def _grouped() -> nn.Module:
    m = GroupedConv()
    mask_channels(m.b0[0], [0, 1, 2, 5, 9, 12])  # 4 in group 0 (a carrier among them), 2 in group 1: 2 + 2 go
    mask_ln(m.b2[0], 0.5)
    mask_channels(m.gconv, [1, 3, 6, 10])  # 10, alone in group 1, carries for b2.0: group 0 keeps its 3 too
    return _finish(m, (2, 3, 10, 10))


def _grouped_concat() -> nn.Module:
    m = GroupedConcat()
    mask_channels(m.p, [1])  # one dead filter in group 0: its own carrier, which must stay
    mask_channels(m.q, [2, 5, 6])
    m = _finish(m, (2, 3, 8, 8))
    with torch.no_grad():  # constants after ReLU = beta: q's are the stronger, so q's carrier hosts
        m.pbn.bias[1], m.qbn.bias[2], m.qbn.bias[5], m.qbn.bias[6] = 0.1, 2.0, 3.0, 1.5
    return m


def _resnext() -> nn.Module:
    m = ResNeXtBlock()
    mask_ln(m.conv1, 0.5)  # uneven over conv2's 4 groups, most of it merged into per-group carriers
    mask_channels(m.conv2, [0, 1, 8, 9, 16, 17, 24, 25, 26])  # 2 per group, one more in group 3
    mask_channels(m.conv2, [1, 3, 5], dim=1)  # columns: inputs 1, 3, 5 of every group are ignored
    mask_channels(m.stem[0], [0, 9, 15])  # residual stream: conv3 and the stem both write it
    mask_channels(m.conv3, [0, 9, 15, 4])
    return _finish(m, (2, 3, 10, 10))


def _decoder() -> nn.Module:
    m = TransposedDecoder()
    mask_ln(m.enc[0], 0.5)  # into the transposed conv: merge
    mask_ln(m.up, 0.5, dim=1)  # ConvTranspose2d keeps its outputs on dim 1
    return _finish(m, (2, 3, 8, 8))


def _unet() -> nn.Module:
    m = UNet()
    for layer in m.modules():
        if isinstance(layer, nn.Conv2d) and layer is not m.head:
            mask_ln(layer, 0.4)
    mask_ln(m.up2, 0.4, dim=1)  # their biases stay: dead upsampling channels emit them
    mask_ln(m.up1, 0.4, dim=1)
    return _finish(m, (2, 3, 16, 16))


def _conv1d() -> nn.Module:
    m = Conv1dNet()
    mask_ln(m.c1, 0.5)
    prune.l1_unstructured(m.c1, "bias", amount=1.0)  # bias masked too: dead filters emit exactly 0
    mask_ln(m.c2, 0.5)  # bias kept: dead filters emit their bias, folded into the 1x1 conv
    mask_channels(m.fc, [1, 6], dim=1)
    return _finish(m, (2, 4, 24))


def _norms() -> nn.Module:
    m = NormUsers()
    mask_channels(m.conv, [0, 1, 2, 3, 8, 9, 10, 11, 5])  # two whole GroupNorm groups and one stray
    mask_channels(m.conv, [0, 1, 2, 3, 8, 9, 10, 11, 5], name="bias")
    mask_ln(m.fc1, 0.5)  # into LayerNorm: kept
    m = _finish(m, (2, 3, 8, 8))
    return m


def _flatten() -> nn.Module:
    m = FlattenLinear()
    mask_ln(m.conv, 0.5)  # bias kept: a constant folded blockwise into fc1
    mask_random(m.fc1, 0.25)
    return _finish(m, (2, 3, 8, 8))


def _mlp() -> nn.Module:
    m = MLP()
    mask_ln(m.fc1, 0.5)  # biases stay: relu(b) folded into fc2
    mask_ln(m.fc2, 0.25, dim=1)  # inputs fc2 ignores: removed from fc1 too
    mask_ln(m.fc2, 0.25)
    return bake(m).eval()


def _se() -> nn.Module:
    m = SqueezeExcite()
    mask_channels(m.reduce, [0, 3, 5])  # bias kept: relu(b) folded into expand
    mask_ln(m.b1[0], 0.5)
    mask_ln(m.b0[0], 0.5)  # gated by expand: 0 * gate goes, relu(beta) * gate stays
    return _finish(m, (2, 3, 10, 10))


def _roll() -> nn.Module:
    m = RollChannels()
    # Neighbours: after the roll, torch-pruning reads channel c where c - 1 arrives, and sees a constant.
    mask_channels(m.b0[0], [1, 2, 3, 4, 5])
    return _finish(m, (2, 3, 10, 10))


def _channels_last() -> nn.Module:
    m = ChannelsLastFlatten()
    # torch-pruning reads channel 0 at features 0..3: in channels-last order, channels 0..3 at one pixel.
    mask_channels(m.conv, [0, 1, 2, 3])
    return _finish(m, (2, 3, 2, 2))


def _padding_modes() -> nn.Module:
    m = PaddingModes()
    mask_ln(m.c0, 0.5)
    mask_channels(m.same, [0, 2, 3])
    mask_channels(m.same, [0, 2, 3], name="bias")
    mask_channels(m.reflect, [0, 2, 3, 5])
    mask_channels(m.reflect, [0, 2, 3, 5], name="bias")
    return _finish(m, (2, 3, 9, 9))


def _layer_scale() -> nn.Module:
    m = LayerScale()
    mask_ln(m.c1, 0.5)
    return _finish(m, (2, 3, 8, 8))


def _cancelling() -> nn.Module:
    m = CancellingNorm()
    mask_ln(m.c1, 0.5)
    m = _finish(m, (2, 3, 8, 8))
    with torch.no_grad():
        m.c2.bias.fill_(2e4)
        m.bn2.running_mean += 2e4
        m.bn2.running_var.fill_(1e-2)
    return m


def _dead() -> nn.Module:
    m = DeadLayer()
    mask_random(m.conv2, 1.0)
    m = _finish(m, (2, 3, 8, 8))
    return m


def _slimmed_bn() -> nn.Module:
    m = ConvChain()
    bake(mask_ln(m.b1[0], 0.25))  # baked zeros, no hooks
    zero_bn(m.b2[1], [0, 5, 6, 7, 20])  # network slimming: BN weight and bias zero
    m = _finish(m, (2, 3, 12, 12))
    with torch.no_grad():  # slimming that left the shift: weight 0, bias not, the channel emits relu(bias)
        m.b2[1].weight[[2, 9, 14]] = 0.0
    return m


def _tv_mobilenet_v2() -> nn.Module:
    m = TVMobileNetV2()
    mask_ln(m.features[1].conv[0][0], 0.6)  # 58 of 96 expand filters: a basis of at most 15 per group stays
    mask_ln(m.features[2].conv[0][0], 0.6)  # the stride-2 block: the same 16 border patterns
    return _finish(m, (2, 3, 16, 16))


def _mnasnet() -> nn.Module:
    m = MnasNetSmall()
    mask_ln(m.layers[8].layers[0], 0.7)  # 5x5 stride 2: 36 border patterns
    mask_ln(m.layers[9].layers[0], 0.5)  # 5x5 stride 1: 81 patterns, more than the group's dead channels
    return _finish(m, (2, 3, 24, 24))


def _efficientnet() -> nn.Module:
    m = EfficientNetSmall()
    mask_ln(m.mb.block[0][0], 0.5)  # dead expand filters, multiplied by the live squeeze-excite gate: kept
    mask_ln(m.mb.block[3][0], 0.25)  # project filters, into the residual stream the stem also writes
    return _finish(m, (2, 3, 16, 16))


def _inception_pool() -> nn.Module:
    m = InceptionSmall()
    mask_ln(m.stem.conv, 0.5)  # constants into three 1x1 convs (fold) and through the padded pool (merge)
    return _finish(m, (2, 3, 12, 12))


def _l(
    *paths: tuple[str, ...],
    reads: tuple[Read, ...],
    after: tuple[str, ...] = (),
    blocked: str = "",
    chunks: int = 0,
) -> Link:
    return Link(tuple(paths), reads, after, blocked, chunks=chunks)


R = Read

CASES: tuple[Case, ...] = (
    Case(
        "conv_chain",
        _conv_chain,
        (2, 3, 12, 12),
        (
            _l(("b1.0", "b1.1", RELU), reads=(R("b2.0"),)),
            _l(("b2.0", "b2.1", RELU), reads=(R("b3.0"),)),
            _l(("b3.0", "b3.1", RELU), reads=(R("fc"),)),
        ),
    ),
    Case(
        "residual_block",
        _residual,
        (2, 3, 16, 16),
        (
            _l(("stem.0", "stem.1", RELU), reads=(R("conv1"), R("down.0"))),
            _l(("conv1", "bn1", RELU), reads=(R("conv2"),)),
            _l(("conv2", "bn2"), ("down.0", "down.1"), after=(RELU,), reads=(R("fc"),)),
        ),
    ),
    Case(
        "dense_concat",
        _dense,
        (2, 3, 12, 12),
        (
            _l(("b0.0", "b0.1", RELU), reads=(R("b1.0"), R("b2.0"), R("b3.0"))),
            _l(("b1.0", "b1.1", RELU), reads=(R("b2.0", offset=8), R("b3.0", offset=8))),
            _l(("b2.0", "b2.1", RELU), reads=(R("b3.0", offset=12),)),
        ),
    ),
    Case(
        "inception_branches",
        _inception,
        (2, 3, 12, 12),
        (
            _l(("a.0", "a.1", RELU), reads=(R("mix.0"),)),
            _l(("b.0", "b.1", RELU), reads=(R("mix.0", offset=4),)),
            _l(("c.0", "c.1", RELU), reads=(R("mix.0", offset=10),)),
        ),
    ),
    Case(
        "repeated_concat",
        _repeated,
        (2, 3, 8, 8),
        (_l(("b0.0", "b0.1", RELU), reads=(R("mix.0"), R("mix.0", offset=8))),),
    ),
    Case(
        "chunk_branches",
        _chunk,
        (2, 3, 12, 12),
        (
            _l(("b0.0", "b0.1", RELU), reads=(R("left.0", count=8), R("right.0", first=8)), chunks=2),
            _l(("left.0", "left.1", RELU), reads=(R("fc"),)),
        ),
    ),
    Case(
        "inverted_residual",
        _inverted,
        (2, 3, 10, 10),
        (_l(("expand", "bn1", RELU6, "dw", "bn2", RELU6), reads=(R("project"),)),),
    ),
    Case(
        "grouped_conv",
        _grouped,
        (2, 3, 10, 10),
        (
            _l(("b0.0", "b0.1", RELU), reads=(R("gconv"),)),
            _l(("gconv", "bn", RELU), reads=(R("b2.0"),)),
            _l(("b2.0", "b2.1", RELU), reads=(R("fc"),)),
        ),
    ),
    Case(
        "grouped_concat",
        _grouped_concat,
        (2, 3, 8, 8),
        (
            _l(("stem.0", "stem.1", RELU), reads=(R("p"), R("q"))),
            _l(("p", "pbn", RELU), reads=(R("c"),)),
            _l(("q", "qbn", RELU), reads=(R("c", offset=8),)),
        ),
    ),
    Case(
        "resnext_block",
        _resnext,
        (2, 3, 10, 10),
        (
            _l(("conv1", "bn1", RELU), reads=(R("conv2"),)),
            _l(("conv2", "bn2", RELU), reads=(R("conv3"),)),
            _l(
                ("stem.0", "stem.1", RELU),
                ("conv3", "bn3"),
                after=(RELU,),
                reads=(R("conv1"), R("side"), R("fc")),
            ),
            _l(("side",), reads=(R("fc", offset=16),)),
        ),
    ),
    Case(
        "transposed_decoder",
        _decoder,
        (2, 3, 8, 8),
        (
            _l(("enc.0", "enc.1", RELU), reads=(R("up"),)),
            _l(("up", "bn", RELU), reads=(R("head"),)),
        ),
    ),
    Case(
        "unet",
        _unet,
        (2, 3, 16, 16),
        (
            _l(("e1.0.0", "e1.0.1", RELU), reads=(R("e1.1.0"),)),
            _l(("e1.1.0", "e1.1.1", RELU), reads=(R("e2.0.0"), R("d1.0.0", offset=8))),
            _l(("e2.0.0", "e2.0.1", RELU), reads=(R("e2.1.0"),)),
            _l(("e2.1.0", "e2.1.1", RELU), reads=(R("mid.0"), R("d2.0.0", offset=16))),
            _l(("mid.0", "mid.1", RELU), reads=(R("up2"),)),
            _l(("up2",), reads=(R("d2.0.0"),)),
            _l(("d2.0.0", "d2.0.1", RELU), reads=(R("d2.1.0"),)),
            _l(("d2.1.0", "d2.1.1", RELU), reads=(R("up1"),)),
            _l(("up1",), reads=(R("d1.0.0"),)),
            _l(("d1.0.0", "d1.0.1", RELU), reads=(R("d1.1.0"),)),
            _l(("d1.1.0", "d1.1.1", RELU), reads=(R("head"),)),
        ),
    ),
    Case(
        "conv1d",
        _conv1d,
        (2, 4, 24),
        (
            _l(("c1", "bn1", RELU), reads=(R("c2"),)),
            _l(("c2", "bn2", RELU), reads=(R("c3"),)),
            _l(("c3", RELU), reads=(R("fc"),)),
        ),
    ),
    Case(
        "norm_users",
        _norms,
        (2, 3, 8, 8),
        (
            _l(("conv", "gn", RELU), reads=(R("conv2"),)),
            _l(("fc1",), reads=(R("fc2"),), blocked="LayerNorm"),
        ),
    ),
    Case(
        "flatten_linear",
        _flatten,
        (2, 3, 8, 8),
        (
            _l(("conv", "bn", RELU), reads=(R("fc1", expand=16),)),
            _l(("fc1", RELU), reads=(R("fc2"),)),
        ),
    ),
    Case(
        "mlp",
        _mlp,
        (3, 20),
        (
            _l(("fc1", RELU), reads=(R("fc2"),)),
            _l(("fc2", RELU), reads=(R("fc3"),)),
        ),
    ),
    Case(
        "squeeze_excite",
        _se,
        (2, 3, 10, 10),
        (
            _l(("reduce", RELU), reads=(R("expand"),)),
            _l(("b1.0", "b1.1", RELU), reads=(R("fc"),)),
            Link((("b0.0", "b0.1", RELU), ("expand",)), (R("reduce"), R("b1.0")), gated=True),
        ),
    ),
    Case(
        "roll_channels",
        _roll,
        (2, 3, 10, 10),
        (_l(("b0.0", "b0.1", RELU), reads=(R("b1.0", at=tuple((c + 1) % 8 for c in range(8))),)),),
    ),
    Case(
        "channels_last_flatten",
        _channels_last,
        (2, 3, 2, 2),
        (_l(("conv", "bn", RELU), reads=(R("fc", expand=4, step=8),)),),
    ),
    Case(
        "padding_modes",
        _padding_modes,
        (2, 3, 9, 9),
        (
            _l(("c0", "bn0", RELU), reads=(R("same"), R("reflect"))),
            _l(("same",), ("reflect",), after=(RELU,), reads=(R("circular"),)),
        ),
    ),
    Case(
        "layer_scale",
        _layer_scale,
        (2, 3, 8, 8),
        (_l(("c1", "bn", RELU, "gamma"), reads=(R("c2"),)),),
    ),
    Case(
        "cancelling_norm",
        _cancelling,
        (2, 3, 8, 8),
        (_l(("c1", "bn1", RELU), reads=(R("c2"),)),),
        noisy=True,
    ),
    Case(
        "dead_layer",
        _dead,
        (2, 3, 8, 8),
        (
            _l(("conv1", "bn1", RELU), reads=(R("conv2"),)),
            _l(("conv2", "bn2", RELU), reads=(R("fc", expand=64),)),
        ),
        dead="conv2",
    ),
    Case(
        "slimmed_bn_baked",
        _slimmed_bn,
        (2, 3, 12, 12),
        (
            _l(("b1.0", "b1.1", RELU), reads=(R("b2.0"),)),
            _l(("b2.0", "b2.1", RELU), reads=(R("b3.0"),)),
        ),
        notes="hand-zeroed BatchNorm: the conv rows live, the norm forgets them (weight 0), the channel emits 0",
    ),
    Case(
        "tv_mobilenet_v2",
        _tv_mobilenet_v2,
        (2, 3, 16, 16),
        (
            _l(
                (
                    "features.1.conv.0.0",
                    "features.1.conv.0.1",
                    RELU6,
                    "features.1.conv.1.0",
                    "features.1.conv.1.1",
                    RELU6,
                ),
                reads=(R("features.1.conv.2"),),
            ),
            _l(
                (
                    "features.2.conv.0.0",
                    "features.2.conv.0.1",
                    RELU6,
                    "features.2.conv.1.0",
                    "features.2.conv.1.1",
                    RELU6,
                ),
                reads=(R("features.2.conv.2"),),
            ),
        ),
        notes="torchvision InvertedResidual: dead expand filters vary with position after the padded depthwise conv",
    ),
    Case(
        "mnasnet",
        _mnasnet,
        (2, 3, 24, 24),
        (
            _l(
                (
                    "layers.8.layers.0",
                    "layers.8.layers.1",
                    RELU,
                    "layers.8.layers.3",
                    "layers.8.layers.4",
                    RELU,
                ),
                reads=(R("layers.8.layers.6"),),
            ),
            _l(
                (
                    "layers.9.layers.0",
                    "layers.9.layers.1",
                    RELU,
                    "layers.9.layers.3",
                    "layers.9.layers.4",
                    RELU,
                ),
                reads=(R("layers.9.layers.6"),),
            ),
        ),
    ),
    Case(
        "efficientnet_mbconv",
        _efficientnet,
        (2, 3, 16, 16),
        (
            Link(
                (
                    ("mb.block.0.0", "mb.block.0.1", SILU, "mb.block.1.0", "mb.block.1.1", SILU),
                    ("mb.block.2.fc2",),
                ),
                (R("mb.block.2.fc1"), R("mb.block.3.0")),
                gated=True,
            ),
            _l(
                ("stem.0", "stem.1", SILU),
                ("mb.block.3.0", "mb.block.3.1"),
                reads=(R("mb.block.0.0"), R("fc")),
            ),
        ),
    ),
    Case(
        "inception_pool",
        _inception_pool,
        (2, 3, 12, 12),
        (
            _l(
                ("stem.conv", "stem.bn", RELU),
                reads=(
                    R("mixed.branch1x1.conv"),
                    R("mixed.branch5x5_1.conv"),
                    R("mixed.branch3x3dbl_1.conv"),
                    R("mixed.branch_pool.conv", steps=(AVGPOOL3,)),
                ),
            ),
        ),
    ),
)

BY_NAME = {c.name: c for c in CASES}


class ZooResults:
    """(masked model, compacted model, report) per case, computed at most once per test session."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[nn.Module, nn.Module, compactor.CompactionReport]] = {}

    def put(self, case: Case, result: tuple[nn.Module, nn.Module, compactor.CompactionReport]) -> None:
        self._cache[case.name] = result

    def get(self, case: Case) -> tuple[nn.Module, nn.Module, compactor.CompactionReport]:
        if case.name not in self._cache:
            model = case.model()
            small, report = compactor.compact(model, case.inputs(1))
            self._cache[case.name] = (model, small, report)
        return self._cache[case.name]
