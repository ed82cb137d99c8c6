"""Position-varying constants: input-independent channels whose value at a consumer differs at the borders.

A dead filter's constant that passes a zero-padded depthwise conv comes out as ``b + k * sum(w[t])`` over
the taps ``t`` inside the image: a different value per *border pattern* (which taps fall inside). After the
pointwise layers that follow (BatchNorm, an activation), the map ``M_c`` a consumer reads is still a
function of the border pattern alone, and the patterns that occur at any input size are finitely many
(``Shrinker.border_values``). So every such map is a vector over those patterns, its *profile*: the
consumer is linear in its input channels, and where ``M_c = sum_b a_b M_b (+ a_0 where the consumer
folds a constant)`` on every pattern, ``W[:, b] += a_b W[:, c]`` (and ``a_0 W[:, c]`` into the bias)
removes ``c`` exactly at every resolution. A basis of at most one channel per pattern is kept per group.

The profiles are measured on the model: the depthwise conv's output is replaced by the value of every
pattern (a probe, at the example's shape) and the consumer's input is read back. That the layers between
act on each position alone is checked: a value probed at several positions, and every value the natural
run shows, must read back the same. A channel whose map differs between inputs (a live squeeze-excite
gate multiplies it) is kept, with that reason.

Without a depthwise conv in the group (a functional average pool that counts the padding), channels whose
maps are proportional merge into one carrier; see ``docs/EXACTNESS.md`` for what that rests on.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...inputs import ExampleInputs
from ...layers import Role, Side, role_of
from ...modules import wide_clone
from ..coupling import ChannelGroup, Kind, Member
from .base import ChannelFate, Fate, Fold, InputStats, Merge, Modules, mixing, shrinker_at
from .compensate import fold
from .observe import dead_rows, reads_constant, run_with_hooks

Hook = Callable[..., Any]

GATED = "varies with the input: a live gate multiplies it (squeeze-excite)"
GATED_HINT = "a squeeze-excite gate; zeroed in every factor, it would go"
SIZED = "its value depends on the input's size: one constant at the example's size, another at another size"
# A profile within this (relative) of the basis's span merges. Profiles are measured in float64, where an
# exact dependency leaves ~1e-13; a near one in these nets leaves ~1e-5 (the oracle's threshold is the same).
_TOL = 1e-9
_MATCH = 1e-4  # relative: probe and natural run agree
# where a consumer reads a root channel: its name and which of the channel's inputs there (a ghost module's
# cat of a channel and its depthwise conv's output: one root channel, two inputs of the next conv)
Slot = tuple[str, int]


@dataclass
class Maps:
    """One group's position-varying channels: per root channel, per consumer, the profile (float64),
    whether profiles cover every border pattern (``general``) or only the example's positions (then only
    proportional maps merge), and the channels that must stay, with the reason."""

    general: bool
    profiles: dict[int, dict[Slot, torch.Tensor]] = field(default_factory=dict)
    kept: dict[int, str] = field(default_factory=dict)
    tol: float = _TOL


def spatial_layer(group: ChannelGroup, modules: Modules) -> list[Member]:
    """The group's channelwise layers that make a constant vary at the borders (zero-padded depthwise)."""
    found = []
    for member in group.layers(Side.OUT):
        obj = modules.get(member.name)
        if role_of(obj) is not Role.CHANNELWISE or not isinstance(obj, nn.Module):
            continue
        idx = next((i for i in member.idxs if i), None)
        if idx is None:
            continue
        probe = torch.tensor(idx[:1], dtype=torch.long)
        if (
            shrinker_at(modules, member.name).border_values(obj, probe, torch.ones(1, dtype=torch.float64))
            is not None
        ):
            found.append(member)
    return found


def varying_maps(
    model: nn.Module,
    groups: list[ChannelGroup],
    modules: Modules,
    stats: InputStats,
    runs: list[ExampleInputs],
    candidates: dict[int, list[int]],
) -> dict[int, Maps]:
    """Per group index: the :class:`Maps` of its ``candidates`` (input-independent root channels that no
    reader ignores)."""
    out: dict[int, Maps] = {}
    natural = _Recorder(modules)
    plans: list[tuple[int, ChannelGroup, list[int], Member | None, list[Member]]] = []
    for i, rs in candidates.items():
        group = groups[i]
        consumers = [c for c in mixing(group.layers(Side.IN), modules) if c.name in stats.lo]
        spatial = spatial_layer(group, modules)
        # a depthwise filter that is zero emits its bias: where every consumer reads a constant, the
        # channel is a plain constant (folded, see .compensate), not a map of the border pattern
        dead = dead_rows(group, modules)
        rs = [
            r
            for r in rs
            if not (_forgets(spatial, dead, r) and reads_constant(stats, consumers, r) is not None)
        ]
        if not rs:
            continue
        if len(spatial) > 1:
            names = ", ".join(m.name for m in spatial)
            out[i] = Maps(
                True, kept={r: f"passes several zero-padded depthwise layers ({names})" for r in rs}
            )
            continue
        dw = spatial[0] if spatial else None
        if dw is None:  # only channels that vary at some consumer are this module's business
            rs = [
                r
                for r in rs
                if any(stats.constant(c.name, c.idxs[r]) is None for c in consumers if c.idxs[r])
            ]
            sized = [r for r in rs if _constant_at_example(stats, consumers, r)]
            if sized:  # constant at the example's size, another constant at another: no fold stands for it
                out[i] = Maps(False, kept={r: SIZED for r in sized})
                rs = [r for r in rs if r not in sized]
        else:
            rs = [r for r in rs if dw.idxs[r]]
        if not rs:
            continue
        out[i] = out.get(i) or Maps(dw is not None)
        plans.append((i, group, rs, dw, consumers))
        for c in consumers:
            natural.want(c.name, "in", [j for r in rs for j in c.idxs[r]])
        if dw is not None:
            natural.want(dw.name, "in", [dw.idxs[r][0] for r in rs])
            natural.want(dw.name, "out", [dw.idxs[r][0] for r in rs])
        for m in _channelwise(group, modules):
            natural.want(m.name, "in", [j for r in rs for j in m.idxs[r]])
    if not plans:
        return out
    wide = model if _is_double(model) else wide_clone(model)  # measured in float64
    runs = [r.widened() for r in runs]
    natural.run(wide, runs)
    probes: list[_Probe] = []
    for i, group, rs, dw, consumers in plans:
        maps = out[i]
        gated = any(m.kind is Kind.MULTIPLY for m in group.members)
        layers = _channelwise(group, modules)
        for r in rs:
            why = _why_not(r, consumers, dw, natural, gated)
            if dw is None and why is None:  # a per-channel layer on a varying map: proportional no more
                why = next(
                    (
                        f"varies where it enters {m.name}, a layer of its own per channel"
                        for m in layers
                        if any(not natural.constant(m.name, "in", j) for j in m.idxs[r])
                    ),
                    None,
                )
            if why:
                maps.kept[r] = why
        live = [r for r in rs if r not in maps.kept]
        if dw is None:
            for r in live:
                maps.profiles[r] = {
                    (c.name, k): natural.single(c.name, "in", j).flatten()
                    for c in consumers
                    for k, j in enumerate(c.idxs[r])
                }
        elif live:
            probes.append(_Probe(i, dw, live, consumers, modules, natural))
    if probes:
        _run_probes(wide, runs[0], probes, out, modules)
    return out


def _forgets(spatial: list[Member], dead: dict[str, list[bool]], r: int) -> bool:
    """Whether every zero-padded depthwise layer of the group that maps root channel ``r`` ignores it (its
    filter is zero; ``dead``: :func:`.observe.dead_rows`): each then emits its bias, and nothing makes the
    channel vary at the borders. (One that does not forget it, after one that does, would vary a constant
    at the borders, which a small example can hide: a 1x1 map has one border pattern.)"""
    mapping = [m for m in spatial if m.idxs[r]]
    return bool(mapping) and all(m.name in dead and dead[m.name][r] for m in mapping)


def _constant_at_example(stats: InputStats, consumers: list[Member], r: int) -> bool:
    """Whether channel ``r`` is a constant at every consumer on the runs at the example's size (while
    ``stats``, with a run at another size, says it varies)."""
    at = stats.example
    reads = [c for c in consumers if c.idxs[r]]
    return (
        at is not None
        and bool(reads)
        and all(c.name in at.lo and at.constant(c.name, c.idxs[r]) is not None for c in reads)
    )


def _channelwise(group: ChannelGroup, modules: Modules) -> list[Member]:
    """The group's channelwise layers that are modules (a forward pre-hook can watch their input)."""
    return [
        m
        for m in group.layers(Side.OUT)
        if isinstance(modules.get(m.name), nn.Module) and role_of(modules[m.name]) is Role.CHANNELWISE
    ]


def _is_double(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return all(t.dtype == torch.float64 for t in tensors if t.is_floating_point())


def _why_not(r: int, consumers: list[Member], dw: Member | None, rec: _Recorder, gated: bool) -> str | None:
    """Why channel ``r``'s maps cannot be profiled, or None."""
    reads = [c for c in consumers if c.idxs[r]]
    for c in reads:
        if not all(rec.same_everywhere(c.name, "in", j) for j in c.idxs[r]):
            return GATED if gated else f"varies with the input at {c.name}"
    if dw is None:
        return None
    j = dw.idxs[r][0]
    if not rec.constant(dw.name, "in", j):
        return f"not a constant where it enters {dw.name}"
    positions = math.prod(rec.spatial(dw.name, "out"))
    for c in reads:  # a reshape between may lay the positions out anew (SegFormer's Mix-FFN: [B, C, H, W]
        # into [B, H*W, C]): the probes check that each consumer position reads one depthwise position
        if math.prod(rec.spatial(c.name, "in")) != positions:
            return f"{c.name} reads it at another size than {dw.name} writes it"
    return None


# --- recording ----------------------------------------------------------------------------------------
class _Recorder:
    """Per (layer, side): the maps of some channels on every sample, ``[samples, channels, *spatial]``."""

    def __init__(self, modules: Modules) -> None:
        self.modules = modules
        self.wanted: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.seen: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)

    def want(self, layer: str, side: str, channels: list[int]) -> None:
        key = (layer, side)
        self.wanted[key] += [c for c in channels if c not in self.wanted[key]]

    def run(self, model: nn.Module, runs: list[ExampleInputs], edit: dict[str, Hook] | None = None) -> None:
        self.seen.clear()
        hooks = []
        for name, module in model.named_modules():
            for side in ("in", "out"):
                if (name, side) in self.wanted:
                    hooks.append(_hook(module, side, self._record(name, side)))
            if edit and name in edit:
                hooks.append(module.register_forward_hook(edit[name]))
        run_with_hooks(model, runs, hooks)

    def _record(self, name: str, side: str) -> Hook:
        idx = torch.tensor(self.wanted[(name, side)], dtype=torch.long)
        dim = shrinker_at(self.modules, name).input_channel_dim

        def record(x: torch.Tensor) -> None:
            self.seen[(name, side)].append(
                x.detach().movedim(dim, 1).index_select(1, idx.to(x.device)).double().cpu()
            )

        return record

    def maps(self, layer: str, side: str, channel: int) -> torch.Tensor:
        """``[samples, *spatial]`` of one channel."""
        at = self.wanted[(layer, side)].index(channel)
        return torch.cat([t[:, at] for t in self.seen[(layer, side)]])

    def same_everywhere(self, layer: str, side: str, channel: int) -> bool:
        m = self.maps(layer, side, channel)
        return bool((m == m[:1]).all())

    def constant(self, layer: str, side: str, channel: int) -> bool:
        m = self.maps(layer, side, channel)
        return bool((m == m.flatten()[0]).all())

    def single(self, layer: str, side: str, channel: int) -> torch.Tensor:
        return self.maps(layer, side, channel)[0]

    def spatial(self, layer: str, side: str) -> tuple[int, ...]:
        return tuple(self.seen[(layer, side)][0].shape[2:])


def _hook(module: nn.Module, side: str, record: Callable[[torch.Tensor], None]) -> Any:
    if side == "in":
        return module.register_forward_pre_hook(lambda m, args: record(args[0]))
    return module.register_forward_hook(lambda m, args, out: record(out))


# --- probing --------------------------------------------------------------------------------------------
class _Probe:
    """One group's depthwise layer, its channels and the values of every border pattern there."""

    def __init__(
        self, index: int, dw: Member, rs: list[int], consumers: list[Member], modules: Modules, rec: _Recorder
    ) -> None:
        self.index, self.dw, self.rs, self.consumers = index, dw, rs, consumers
        module = modules[dw.name]
        local = torch.tensor([dw.idxs[r][0] for r in rs], dtype=torch.long)
        k = torch.stack([rec.maps(dw.name, "in", int(j)).flatten()[0] for j in local])
        values = shrinker_at(modules, dw.name).border_values(module, local, k)
        assert values is not None
        self.local, self.values = local, values  # [channels, patterns]
        self.natural_in = {r: rec.maps(dw.name, "out", dw.idxs[r][0]) for r in rs}
        first = rec.seen[(dw.name, "out")][0]
        self.shape = torch.Size(
            (first.shape[0], len(rs), *first.shape[2:])
        )  # one run's output, these channels
        self.natural_out = {
            (r, (c.name, k)): rec.maps(c.name, "in", j)
            for r in rs
            for c in consumers
            for k, j in enumerate(c.idxs[r])
        }

    @property
    def patterns(self) -> int:
        return int(self.values.shape[1])


def _run_probes(
    model: nn.Module, run: ExampleInputs, probes: list[_Probe], out: dict[int, Maps], modules: Modules
) -> None:
    """Write every pattern's value into each depthwise layer's output, read the consumers back, and turn
    what they read into profiles; check that the layers between act on each position alone."""
    rec = _Recorder(modules)
    for p in probes:
        for c in p.consumers:
            rec.want(c.name, "in", [j for r in p.rs for j in c.idxs[r]])
    generator = torch.Generator().manual_seed(0)
    readings: dict[tuple[int, int, Slot], list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
    # each pattern at two slots at least (pass t puts pattern (t * slots + s) % P at slot s, the slots in
    # a fresh random order each pass): a spatial layer between would read different neighbours there
    passes = max(-(-2 * p.patterns // _slots(p.shape)) for p in probes)
    for t in range(passes):
        edit: dict[str, Hook] = {}
        slots_of: dict[int, torch.Tensor] = {}
        for p in probes:
            n = _slots(p.shape)
            slots = ((torch.arange(n) + t * n) % p.patterns)[torch.randperm(n, generator=generator)]
            slots_of[p.index] = slots
            edit[p.dw.name] = _writer(p, slots, p.shape)
        rec.run(model, [run], edit)
        for p in probes:
            for r in p.rs:
                for c in p.consumers:
                    for k, j in enumerate(c.idxs[r]):
                        got = rec.maps(c.name, "in", j).flatten()
                        readings[(p.index, r, (c.name, k))].append((slots_of[p.index], got))
    for p in probes:
        maps = out[p.index]
        for a, r in enumerate(p.rs):
            profiles = {}
            for slot in [(c.name, k) for c in p.consumers for k in range(len(c.idxs[r]))]:
                profile, why = _profile(p, a, r, slot, readings[(p.index, r, slot)])
                if why:
                    maps.kept[r] = why
                    break
                assert profile is not None
                profiles[slot] = profile
            if r not in maps.kept:
                maps.profiles[r] = profiles


def _slots(shape: torch.Size) -> int:
    n = 1
    for d in (shape[0], *shape[2:]):
        n *= int(d)
    return n


def _writer(p: _Probe, slots: torch.Tensor, shape: torch.Size) -> Hook:
    """A forward hook writing pattern ``slots[s]``'s value at slot ``s`` of each probed channel."""

    def write(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        values = p.values[:, slots]  # [channels, slots]
        crafted = values.view(len(p.rs), shape[0], *shape[2:]).movedim(0, 1).to(out)
        out = out.clone()
        out[:, p.local.to(out.device)] = crafted
        return out

    return write


def _profile(
    p: _Probe, a: int, r: int, slot: Slot, readings: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor | None, str | None]:
    """Channel ``r``'s profile at ``slot`` from the probe passes, or why the probe cannot be trusted."""
    layer = slot[0]
    slots = torch.cat([sl for sl, _ in readings])
    values = torch.cat([v for _, v in readings])
    scale = 1.0 + float(values.abs().max())
    count = torch.bincount(slots, minlength=p.patterns)
    if bool((count == 0).any()):
        return None, f"a border pattern was not probed at {layer}"
    lo = torch.full((p.patterns,), float("inf"), dtype=torch.float64).scatter_reduce(0, slots, values, "amin")
    hi = torch.full((p.patterns,), float("-inf"), dtype=torch.float64).scatter_reduce(
        0, slots, values, "amax"
    )
    if bool((hi - lo > _MATCH * scale).any()):
        return None, f"the layers between {p.dw.name} and {layer} do not act on each position alone"
    result = torch.zeros(p.patterns, dtype=torch.float64).index_add(0, slots, values) / count
    # what the natural run showed must be what the probe says for the same value out of the depthwise layer
    z, y = p.natural_in[r].flatten(), p.natural_out[(r, slot)].flatten()
    written = p.values[a]
    zscale = 1.0 + float(written.abs().max())
    nearest = (z[:, None] - written[None, :]).abs().argmin(1)
    if bool(((z - written[nearest]).abs() > _MATCH * zscale).any()):
        return None, f"{p.dw.name} gives a value no border pattern explains"
    if bool(((y - result[nearest]).abs() > _MATCH * scale).any()):
        return None, f"the layers between {p.dw.name} and {layer} do not act on each position alone"
    return result, None


# --- deciding ---------------------------------------------------------------------------------------------
def plan_varying(
    group: ChannelGroup,
    consumers: list[Member],
    modules: Modules,
    maps: Maps,
    channels: list[int],
) -> tuple[dict[int, ChannelFate], dict[int, list[Fold]], list[Merge]]:
    """Fates, folds and merges for ``channels`` (profiled): a basis stays, the rest merge into it."""
    by_name = {c.name: c for c in consumers}
    profiles = {r: maps.profiles[r] for r in channels}
    slots = sorted({slot for r in channels for slot in profiles[r]})
    folds_ok = {slot: shrinker_at(modules, slot[0]).can_fold(modules[slot[0]]) for slot in slots}
    if maps.general:
        basis, coef = _basis(profiles, slots, folds_ok, maps.tol)
    else:
        basis, coef = _proportional(profiles, slots, folds_ok, maps.tol)
    fates: dict[int, ChannelFate] = {}
    folds: dict[int, list[Fold]] = defaultdict(list)
    parts: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    used: set[int] = set()
    for r in channels:
        if r in basis:
            continue
        if r not in coef:
            fates[r] = ChannelFate(r, Fate.KEPT_VARYING, "its map is not a multiple of its group's carrier's")
            continue
        merged = False
        for slot, (weights, const) in coef[r].items():
            name, k = slot
            idxs = by_name[name].idxs
            for b, a in weights.items():
                if a != 0.0:
                    parts[(name, idxs[b][k])].append((idxs[r][k], a))
                    used.add(b)
                    merged = True
            if const != 0.0:
                folds[r].append(fold(group, modules, name, (idxs[r][k],), torch.tensor([const])))
        if merged:
            fates[r] = ChannelFate(r, Fate.MERGED, "position-varying, merged into its group's carriers")
        elif folds[r]:
            fates[r] = ChannelFate(
                r, Fate.FOLDED, "the same at every border pattern, folded into the next layer's bias"
            )
        else:
            fates[r] = ChannelFate(r, Fate.REMOVED, "emits exactly zero at every border pattern")
    for r in basis:
        if r in used:
            fates[r] = ChannelFate(r, Fate.CARRIER, "kept to carry the merged position-varying channels")
        else:
            fates[r] = ChannelFate(
                r,
                Fate.KEPT_VARYING,
                "varies with position, and no other channel's map is a combination of it and its group's carriers",
            )
    merges = [
        Merge(n, into, tuple(i for i, _ in ps), tuple(q for _, q in ps)) for (n, into), ps in parts.items()
    ]
    return fates, dict(folds), merges


Coefficients = dict[
    int, dict[Slot, tuple[dict[int, float], float]]
]  # channel -> where a consumer reads it -> (basis weights, constant)


def _basis(
    profiles: dict[int, dict[Slot, torch.Tensor]], layers: list[Slot], folds_ok: dict[Slot, bool], tol: float
) -> tuple[list[int], Coefficients]:
    """A basis chosen greedily (the channel farthest from the span so far, at the layer where it is
    farthest), then each other channel's coefficients on it, solved at each layer; a layer that folds a
    constant into its bias has the constant map in its span for free."""
    order = sorted(profiles)
    at: dict[Slot, list[int]] = {n: [r for r in order if n in profiles[r]] for n in layers}
    mats = {n: torch.stack([profiles[r][n] for r in at[n]]) for n in layers if at[n]}  # [channels, patterns]
    scale = {n: 1.0 + float(m.abs().max()) for n, m in mats.items()}
    q = {n: torch.zeros(m.shape[1], 0, dtype=torch.float64) for n, m in mats.items()}  # orthonormal columns
    for n, m in mats.items():
        if folds_ok[n]:
            q[n] = torch.full((m.shape[1], 1), m.shape[1] ** -0.5, dtype=torch.float64)
    basis: list[int] = []
    while True:
        far: dict[int, float] = defaultdict(float)
        for n, m in mats.items():
            worst = _residual(m, q[n]).abs().amax(1) / scale[n]
            for r, d in zip(at[n], worst.tolist()):
                far[r] = max(far[r], d)
        best = max((r for r in order if r not in basis), key=lambda r: far[r], default=None)
        if best is None or far[best] <= tol:
            break
        basis.append(best)
        for n, m in mats.items():
            if best in at[n]:
                rest = _residual(m[at[n].index(best)][None, :], q[n])[0]
                if float(rest.norm()) > 0:
                    q[n] = torch.cat([q[n], (rest / rest.norm())[:, None]], 1)
    coef: Coefficients = {r: {} for r in order if r not in basis}
    for n, m in mats.items():
        cols = [b for b in basis if b in at[n]]
        spans = [m[at[n].index(b)] for b in cols] + (
            [torch.ones(m.shape[1], dtype=m.dtype)] if folds_ok[n] else []
        )
        others = [r for r in at[n] if r not in basis]
        sol = (
            torch.linalg.lstsq(torch.stack(spans, 1), m[[at[n].index(r) for r in others]].T).solution
            if spans and others
            else None
        )
        for j, r in enumerate(others):
            v = m[at[n].index(r)]
            if bool((v == v[0]).all()) and (folds_ok[n] or float(v[0]) == 0.0):  # zero, or a constant to fold
                coef[r][n] = ({}, float(v[0]))
            elif sol is None:  # within the tolerance of zero, and nothing to merge into
                coef[r][n] = ({}, 0.0)
            else:
                x = sol[:, j].tolist()
                coef[r][n] = (dict(zip(cols, x)), x[-1] if folds_ok[n] else 0.0)
    return basis, coef


def _residual(v: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rows of ``v`` less their projection on the columns of ``q`` (twice: Gram-Schmidt loses orthogonality)."""
    for _ in range(2):
        v = v - (v @ q) @ q.T
    return v


def _proportional(
    profiles: dict[int, dict[Slot, torch.Tensor]], layers: list[Slot], folds_ok: dict[Slot, bool], tol: float
) -> tuple[list[int], Coefficients]:
    """One carrier (the largest map) and the channels whose map is a multiple of its at every layer; a
    constant map folds where the layer folds. Maps seen at the example's positions only: no other span."""
    varying = {r: {n for n, v in p.items() if bool((v != v[0]).any())} for r, p in profiles.items()}
    candidates = [r for r in profiles if varying[r]]
    carrier = max(
        candidates, key=lambda r: min(float(profiles[r][n].abs().max()) for n in varying[r]), default=None
    )
    coef: Coefficients = {}
    for r, p in profiles.items():
        if r == carrier:
            continue
        entry: dict[Slot, tuple[dict[int, float], float]] = {}
        for n, v in p.items():
            if n not in varying[r]:
                k = float(v[0])
                if k != 0.0 and not folds_ok[n]:
                    break
                entry[n] = ({}, k)
                continue
            if carrier is None or n not in varying[carrier]:
                break
            base = profiles[carrier][n]
            ratio = float(v @ base) / float(base @ base)
            if float((v - ratio * base).abs().max()) > tol * (1.0 + float(v.abs().max())):
                break
            entry[n] = ({carrier: ratio}, 0.0)
        else:
            coef[r] = entry
    return ([carrier] if carrier is not None else []), coef
