"""Stage 4, plan: decide the fate of every zeroed channel, and the exact compensation its removal needs.

A root channel of a group is *zeroed* when either

* every mixing layer that writes it has an all-zero weight row (``input-independent``): downstream it
  carries a value that no input can change. So does a channel with one writer and a BatchNorm of weight 0
  after it (network slimming), and a dead channel multiplied by a live gate (``0 * g``, squeeze-excite:
  proved by shaking the gate with noise, see :func:`_gated_zeros`). We observe that value at each
  consuming layer's input. Zero everywhere: remove it. A constant: fold ``k * W[:, c]`` into the
  consumer's bias (or, for a consumer with no bias feeding a BatchNorm, into that norm's running mean)
  where the consumer sees a constant at every position, or merge it into a *carrier* channel where zero
  padding makes the borders differ (``W[:, carrier] += k_c / k_carrier * W[:, c]``; one carrier per
  group, and per group of a grouped conv that reads it). Varying with position (a zero-padded
  depthwise conv on a constant): keep it.
* every mixing layer that reads it has an all-zero weight column (``ignored``): remove it, whatever it
  carries, unless something else reads it (a model output, a blocking layer).

A group is kept whole when a blocking layer holds it (LayerNorm, attention heads, which go
only whole through :mod:`compactor.heads`), when it reaches a model output, when its channels pass a
split/chunk/slice whose sizes the forward code fixes, or when Torch-Pruning mapped it inconsistently.
A GroupNorm loses whole groups only, a grouped conv as many channels from each of its groups;
``round_to`` keeps counts at multiples. These pin channels and plan again until nothing moves.

See ``docs/EXACTNESS.md`` for the math. The plan is data: the rebuild stage applies it to a copy, and
the verify stage decides whether it ships.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch
from torch import nn

from .graph import IN, OUT, ChannelGroup, Member
from .heads import head_layers
from .inputs import ExampleInputs
from .layers import Role, shrinker_for


class Fate(str, Enum):
    REMOVED = "removed"  # emits exactly zero, or no layer reads it: nothing to compensate
    FOLDED = "folded"  # a constant, folded into the consumers' biases
    MERGED = "merged"  # a constant, merged into a carrier channel (zero-padded consumers)
    CARRIER = "carrier"  # a constant, kept to carry the merged ones
    KEPT_READ_ELSEWHERE = "kept: read elsewhere"  # a model output or a blocking layer reads it
    KEPT_VARYING = "kept: varies with position"  # input-independent, but not a constant
    KEPT_MIN_ONE = "kept: layer needs a channel"  # a layer cannot have zero channels
    KEPT_LAYOUT = "kept: layer layout"  # a GroupNorm group or a grouped conv's groups would be left uneven
    KEPT_UNVERIFIED = "kept: verification failed"  # its removal did not reproduce the outputs
    KEPT_ROUNDING = "kept: --round-to"  # kept to round a channel count up to a multiple

    @property
    def removed(self) -> bool:
        return self in (Fate.REMOVED, Fate.FOLDED, Fate.MERGED)


IGNORED = "no layer reads it"  # the reason of a channel removed because every reader ignores it


@dataclass(frozen=True)
class ChannelFate:
    channel: int  # root channel index
    fate: Fate
    reason: str


@dataclass(frozen=True)
class Fold:
    """Add the effect of constants ``k`` on input indices ``idx`` of ``layer`` to its bias; or, where
    ``layer`` has no bias and feeds only the BatchNorm ``norm``, subtract it from that norm's
    ``running_mean`` (the same function, and the architecture keeps ``bias=False``)."""

    layer: str
    idx: tuple[int, ...]
    k: tuple[float, ...]
    norm: str | None = None


@dataclass(frozen=True)
class Merge:
    """``W[:, carrier] += sum_i ratio_i * W[:, idx_i]`` on ``layer`` (inputs)."""

    layer: str
    carrier: int
    idx: tuple[int, ...]
    ratio: tuple[float, ...]


@dataclass(frozen=True)
class GroupPlan:
    group: ChannelGroup
    fates: tuple[ChannelFate, ...]
    folds: tuple[Fold, ...] = ()
    merges: tuple[Merge, ...] = ()

    @property
    def removed(self) -> list[int]:
        return [f.channel for f in self.fates if f.fate.removed]

    def restored(self, reason: str, fate: Fate = Fate.KEPT_UNVERIFIED) -> GroupPlan:
        """The same group with every removal undone (after verification failed, or for rounding)."""
        fates = tuple(
            ChannelFate(f.channel, fate, reason) if f.fate.removed or f.fate is Fate.CARRIER else f
            for f in self.fates
        )
        return GroupPlan(self.group, fates)


@dataclass
class InputStats:
    """Per consumer layer, per input index: the smallest and largest value seen over all inputs."""

    lo: dict[str, torch.Tensor] = field(default_factory=dict)
    hi: dict[str, torch.Tensor] = field(default_factory=dict)

    def constant(self, layer: str, idx: Iterable[int]) -> torch.Tensor | None:
        """The constants at ``idx`` (float64), or None if any of them varied."""
        i = torch.tensor(list(idx), dtype=torch.long)
        lo, hi = self.lo[layer][i], self.hi[layer][i]
        if not torch.equal(lo, hi):
            return None
        return lo


def observe_inputs(
    model: nn.Module,
    runs: list[ExampleInputs],
    layers: set[str],
    noise: dict[str, list[int]] | None = None,
) -> InputStats:
    """Run ``model`` on each input and record min/max per input channel of each layer in ``layers``.

    ``noise``: layer -> output channels to which large random noise is added on the way (to prove
    that nothing those channels carry reaches a consumer)."""
    stats = InputStats()
    hooks = []
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        shrinker = shrinker_for(module)
        if shrinker is None:
            continue
        if noise and noise.get(name):
            hooks.append(module.register_forward_hook(_noise(noise[name], shrinker.input_channel_dim, generator)))
        if name in layers:
            hooks.append(module.register_forward_pre_hook(_recorder(stats, name, shrinker.input_channel_dim)))
    try:
        with torch.no_grad():
            for run in runs:
                model(*run.args, **run.kwargs)
    finally:
        for h in hooks:
            h.remove()
    return stats


def _recorder(stats: InputStats, name: str, dim: int) -> Any:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double().movedim(dim, 0).flatten(1)
        lo, hi = x.amin(1), x.amax(1)
        if name in stats.lo:
            lo, hi = torch.minimum(lo, stats.lo[name]), torch.maximum(hi, stats.hi[name])
        stats.lo[name], stats.hi[name] = lo, hi

    return hook


def _noise(channels: list[int], dim: int, generator: torch.Generator) -> Any:
    idx = torch.tensor(channels, dtype=torch.long)

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        scale = 10.0 * (1.0 + float(out.detach().abs().max()))
        shape = list(out.shape)
        shape[dim] = len(channels)
        noise = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(out)
        return out.index_add(dim, idx.to(out.device), noise)

    return hook


def consumer_layers(groups: list[ChannelGroup], model: nn.Module) -> set[str]:
    modules = dict(model.named_modules())
    return {m.name for g in groups for m in _mixing(g.layers(IN), modules)}


def plan_groups(
    model: nn.Module,
    groups: list[ChannelGroup],
    stats: InputStats,
    *,
    round_to: int = 1,
    runs: list[ExampleInputs] | None = None,
) -> list[GroupPlan]:
    """One plan per group. ``round_to``: keep each group's surviving channel count a multiple of it.
    ``runs``: inputs to prove gated zeros with (see :func:`_gated_zeros`); without them none are."""
    if round_to < 1:
        raise ValueError(f"round_to must be a positive integer, found {round_to}")
    modules: dict[str, Any] = dict(model.named_modules())
    modules.update(dict(model.named_parameters()))
    heads = head_layers(model)
    gated = _gated_zeros(model, groups, modules, stats, runs) if runs else {}
    plans = [_plan_group(g, modules, stats, round_to, gated.get(i), heads) for i, g in enumerate(groups)]
    if round_to == 1:  # with rounding, a carrier that goes would only be pinned back
        plans = _share_carriers(plans, modules, stats)
    return round_layers(model, plans, round_to)


@dataclass(frozen=True)
class _Carrier:
    """A group's carrier channel as other groups see it: where it sits and what it carries."""

    index: int  # the plan's position
    channel: int  # root channel
    at: dict[str, tuple[int, ...]]  # consumer layer -> its input indices
    k: dict[str, torch.Tensor]  # consumer layer -> the constants there
    padded: frozenset[str]  # the zero-padded consumers
    needs: frozenset[str]  # padded layers where this group merges, or where its carrier is not zero
    units: dict[str, tuple[int, ...]]  # consumer layer -> the group of a grouped conv at each input

    @property
    def covers(self) -> frozenset[str]:
        """Padded layers where it can carry others: a non-zero constant at every input."""
        return frozenset(n for n in self.padded if n in self.k and bool((self.k[n] != 0).all()))

    @property
    def strength(self) -> float:
        """Its smallest constant where it covers: the larger, the better conditioned the merge ratios."""
        return min((float(self.k[n].abs().min()) for n in self.covers), default=0.0)

    def hosts(self, guest: _Carrier) -> bool:
        return all(n in self.covers and self.units[n] == guest.units[n] for n in guest.needs)


def _share_carriers(plans: list[GroupPlan], modules: dict[str, Any], stats: InputStats) -> list[GroupPlan]:
    """One carrier per group is one more than needed where several groups feed the same padded conv:
    any two constant inputs of one conv see the same zero padding, so a group's carrier can itself be
    merged into another group's carrier that every padded layer it needs also reads.

    The hosts stay whatever happens to their groups (a carrier is never removed; verification restoring
    its group keeps it too), so the guests' plans stay exact on their own. Carriers that cover most
    padded layers are made hosts first, then the best conditioned (largest constant). A guest whose
    layers cannot lose one more channel (a GroupNorm group, a grouped conv's balance) stays a host.
    """
    carriers = [c for i, p in enumerate(plans) if (c := _carrier_of(i, p, modules, stats)) is not None]
    hosts: list[_Carrier] = []
    out = list(plans)
    for guest in sorted(carriers, key=lambda c: (-len(c.covers), -c.strength, c.index)):
        host = next((h for h in hosts if h.hosts(guest)), None)
        if host is None or len(out[guest.index].removed) + 1 >= out[guest.index].group.size:
            hosts.append(guest)
            continue
        merged = _merged_into(out[guest.index], guest, host, plans[host.index].group.root, modules)
        if _unremovable(merged.group, modules, {f.channel: f for f in merged.fates}):  # one more would unbalance a layer
            hosts.append(guest)
            continue
        out[guest.index] = merged
    return out


def _carrier_of(index: int, plan: GroupPlan, modules: dict[str, Any], stats: InputStats) -> _Carrier | None:
    carriers = [f.channel for f in plan.fates if f.fate is Fate.CARRIER]
    if len(carriers) != 1:  # none, or one per group of a grouped conv: those stay where they are
        return None
    r = carriers[0]
    consumers = [c for c in _mixing(plan.group.layers(IN), modules) if c.idxs[r] and c.name in stats.lo]
    k = {c.name: stats.constant(c.name, c.idxs[r]) for c in consumers}
    if any(v is None for v in k.values()):
        return None
    padded = frozenset(c.name for c in consumers if not shrinker_for(modules[c.name]).can_fold(modules[c.name]))  # type: ignore[union-attr]
    needs = {m.layer for m in plan.merges} | {n for n in padded if _nonzero(k[n])}
    units = {c.name: _units(r, [c], modules) for c in consumers}
    return _Carrier(index, r, {c.name: tuple(c.idxs[r]) for c in consumers}, k, padded, frozenset(needs), units)  # type: ignore[arg-type]


def _merged_into(plan: GroupPlan, guest: _Carrier, host: _Carrier, host_root: str, modules: dict[str, Any]) -> GroupPlan:
    """``plan`` with its carrier merged into ``host``, and everything it carried re-aimed there."""
    merges = []
    for m in plan.merges:
        j = guest.at[m.layer].index(m.carrier)
        scale = float(guest.k[m.layer][j]) / float(host.k[m.layer][j])
        merges.append(Merge(m.layer, host.at[m.layer][j], m.idx, tuple(x * scale for x in m.ratio)))
    for name in guest.padded:
        if not _nonzero(guest.k[name]):
            continue
        for j, (idx, into) in enumerate(zip(guest.at[name], host.at[name])):
            merges.append(Merge(name, into, (idx,), (float(guest.k[name][j]) / float(host.k[name][j]),)))
    folds = list(plan.folds)
    for name, k in guest.k.items():
        if name not in guest.padded and _nonzero(k):
            folds.append(_fold(plan.group, modules, name, guest.at[name], k))
    reason = f"constant merged into channel {host.channel} of the group of {host_root}"
    fates = tuple(ChannelFate(f.channel, Fate.MERGED, reason) if f.channel == guest.channel else f for f in plan.fates)
    return GroupPlan(plan.group, fates, tuple(folds), tuple(merges))


def _fold(group: ChannelGroup, modules: dict[str, Any], layer: str, idx: tuple[int, ...], k: torch.Tensor) -> Fold:
    """Fold constants ``k`` at inputs ``idx`` of ``layer``: into its bias, or into the running mean of the
    BatchNorm it alone feeds when it has no bias."""
    norm = dict(group.norm_after).get(layer) if getattr(modules[layer], "bias", None) is None else None
    return Fold(layer, idx, tuple(float(v) for v in k), norm)


def round_layers(model: nn.Module, plans: list[GroupPlan], round_to: int) -> list[GroupPlan]:
    """Undo the groups that leave a layer with a count off the multiple, until none does.

    Each group keeps a multiple of ``round_to`` on its own; a layer that reads several groups (a
    ``cat``) can still miss it when one of them is untouched and is not a multiple itself. Each pass
    restores at least one group, so this ends.
    """
    if round_to <= 1:
        return plans
    modules: dict[str, Any] = dict(model.named_modules())
    plans = list(plans)
    while True:
        removed: dict[tuple[str, str], set[int]] = defaultdict(set)
        touching: dict[tuple[str, str], set[int]] = defaultdict(set)
        for i, plan in enumerate(plans):
            for member in plan.group.layers():
                idx = {j for r in plan.removed for j in member.idxs[r]}
                if idx:
                    removed[(member.name, member.side)] |= idx
                    touching[(member.name, member.side)].add(i)
        widths = {key: _width(modules, *key) for key in removed}
        off = [key for key, idx in removed.items() if widths[key] is not None and (widths[key] - len(idx)) % round_to]
        if not off:
            return plans
        for name, side in off:
            reason = f"kept so that {name} keeps a multiple of {round_to} channels"
            for i in touching[(name, side)]:
                plans[i] = plans[i].restored(reason, Fate.KEPT_ROUNDING)


def _width(modules: dict[str, Any], name: str, side: str) -> int | None:
    obj = modules.get(name)
    shrinker = shrinker_for(obj) if obj is not None else None
    if shrinker is None:
        return None
    return shrinker.out_channels(obj) if side == OUT else shrinker.in_channels(obj)


def _mixing(members: list[Member], modules: dict[str, Any]) -> list[Member]:
    return [m for m in members if _role(modules.get(m.name)) is Role.MIXING]


def _role(obj: Any) -> Role | None:
    shrinker = shrinker_for(obj) if obj is not None else None
    return shrinker.role_of(obj) if shrinker is not None else None


def _gated_zeros(
    model: nn.Module,
    groups: list[ChannelGroup],
    modules: dict[str, Any],
    stats: InputStats,
    runs: list[ExampleInputs],
) -> dict[int, set[int]]:
    """Per group index: root channels that are exactly zero after a multiply although a writer lives.

    Several mixing layers write a group through an add or a multiply; Torch-Pruning does not say which.
    For an add, a channel is input-independent only when every writer is dead. For a multiply (a gate,
    squeeze-excite) a dead writer emitting 0 is enough: ``0 * g = 0``. A candidate has a dead writer,
    a live one, and reads exactly 0 at every consumer; it is proved when large random noise added to
    the live writers' channels still leaves exactly 0 at every consumer. One noisy pass serves every
    group: noise elsewhere cannot make a structural zero non-zero, only expose a false one.
    """
    found: dict[int, tuple[list[Member], list[int]]] = {}
    noise: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        if not any("MulBackward" in m.name for m in group.members):
            continue
        producers = _mixing(group.layers(OUT), modules)
        consumers = [c for c in _mixing(group.layers(IN), modules) if c.name in stats.lo]
        if len(producers) < 2 or not consumers:
            continue
        dead = {p.name: _all_zero([p], modules, group.size, _rows_zero) for p in producers}
        candidates = [
            r
            for r in range(group.size)
            if any(dead[p.name][r] for p in producers)
            and not all(dead[p.name][r] for p in producers)
            and _reads_zero(stats, consumers, r)
        ]
        if candidates:
            found[i] = (consumers, candidates)
            for p in producers:
                noise[p.name] += [j for r in candidates if not dead[p.name][r] for j in p.idxs[r]]
    if not found:
        return {}
    layers = {c.name for consumers, _ in found.values() for c in consumers}
    shaken = observe_inputs(model, runs, layers, dict(noise))
    return {i: {r for r in candidates if _reads_zero(shaken, consumers, r)} for i, (consumers, candidates) in found.items()}


def _rows_zero(shrinker: Any, module: Any, idx: torch.Tensor) -> torch.Tensor:
    return shrinker.out_rows_zero(module, idx)


def _reads_zero(stats: InputStats, consumers: list[Member], r: int) -> bool:
    ks = [stats.constant(c.name, c.idxs[r]) for c in consumers if c.idxs[r]]
    return bool(ks) and all(k is not None and bool((k == 0).all()) for k in ks)


def _plan_group(
    group: ChannelGroup,
    modules: dict[str, Any],
    stats: InputStats,
    round_to: int = 1,
    gated: set[int] | None = None,
    heads: dict[tuple[str, str], str] | None = None,
) -> GroupPlan:
    producers = _mixing(group.layers(OUT), modules)
    consumers = _mixing(group.layers(IN), modules)
    if not producers:
        return _blocked_writer(group, modules)
    indep = _all_zero(producers, modules, group.size, lambda s, m, i: s.out_rows_zero(m, i))
    if len(producers) == 1:  # one writer: a BatchNorm with weight 0 after it forgets its input too
        indep = [a or b for a, b in zip(indep, _norm_forgets(group, modules))]
    indep = [a or r in (gated or set()) for r, a in enumerate(indep)]
    ignored = (
        _all_zero(consumers, modules, group.size, lambda s, m, i: s.in_cols_zero(m, i))
        if consumers
        else [False] * group.size
    )
    zeroed = [r for r in range(group.size) if indep[r] or ignored[r]]
    if not zeroed:
        return GroupPlan(group, ())
    blocker = _blocker(group, modules, heads or {})
    if blocker:
        return GroupPlan(group, tuple(ChannelFate(r, Fate.KEPT_READ_ELSEWHERE, blocker) for r in zeroed))

    base: dict[int, ChannelFate] = {}
    all_constants: dict[int, dict[str, torch.Tensor]] = {}  # root channel -> consumer -> constants at its idx
    for r in zeroed:
        if ignored[r]:
            base[r] = ChannelFate(r, Fate.REMOVED, IGNORED)
            continue
        seen = {c.name: stats.constant(c.name, c.idxs[r]) for c in consumers if c.idxs[r] and c.name in stats.lo}
        if any(k is None for k in seen.values()):
            where = next(n for n, k in seen.items() if k is None)
            base[r] = ChannelFate(r, Fate.KEPT_VARYING, f"input-independent but not constant at {where}")
        elif all(bool((k == 0).all()) for k in seen.values()):
            base[r] = ChannelFate(r, Fate.REMOVED, "emits exactly zero")
        else:
            all_constants[r] = {n: k for n, k in seen.items() if k is not None}

    # Decide, check what the layers can lose, pin what they cannot, decide again. Pins only grow, so
    # this ends; a GroupNorm that would lose part of a group or a count off the rounding adds pins.
    pinned: dict[int, ChannelFate] = {}
    while True:
        fates = {**base, **pinned}
        constants = {r: k for r, k in all_constants.items() if r not in pinned}
        folds, merges = _compensate(group, consumers, modules, constants, fates)
        _keep_one(group, fates, folds)
        more = _unremovable(group, modules, fates) or _rounding(group, fates, round_to)
        if not more:
            break
        pinned.update(more)
    return GroupPlan(
        group,
        tuple(fates[r] for r in sorted(fates)),
        tuple(f for r in sorted(folds) for f in folds[r]),
        tuple(merges),
    )


def _blocked_writer(group: ChannelGroup, modules: dict[str, Any]) -> GroupPlan:
    """A group written only by blocking layers (a grouped transposed conv): its zeroed filters stay, with the reason."""
    root = modules.get(group.root)
    shrinker = shrinker_for(root) if root is not None else None
    writer = next((m for m in group.layers(OUT) if m.name == group.root), None)
    if shrinker is None or writer is None or shrinker.role_of(root) is not Role.BLOCKING:
        return GroupPlan(group, ())
    dead = _all_zero([writer], modules, group.size, _rows_zero)
    reason = f"{group.root}: {shrinker.why_blocking(root)}"
    return GroupPlan(group, tuple(ChannelFate(r, Fate.KEPT_READ_ELSEWHERE, reason) for r in range(group.size) if dead[r]))


def _norm_forgets(group: ChannelGroup, modules: dict[str, Any]) -> list[bool]:
    """Per root channel: a BatchNorm in the group has weight 0 there, so it emits its bias whatever comes in."""
    result = [False] * group.size
    for member in group.layers(OUT):
        obj = modules.get(member.name)
        if not isinstance(obj, nn.modules.batchnorm._BatchNorm) or obj.weight is None:
            continue
        weight = obj.weight.detach()
        for r, idx in enumerate(member.idxs):
            if idx and all(float(weight[i]) == 0.0 for i in idx):
                result[r] = True
    return result


def _all_zero(members: list[Member], modules: dict[str, Any], size: int, test: Any) -> list[bool]:
    """Per root channel: every member that maps it passes ``test`` (and at least one maps it)."""
    result = [True] * size
    mapped = [False] * size
    for member in members:
        module = modules[member.name]
        shrinker = shrinker_for(module)
        flat = [i for idx in member.idxs for i in idx]
        if not flat:
            continue
        zero = test(shrinker, module, torch.tensor(flat, dtype=torch.long)).tolist()
        pos = 0
        for r, idx in enumerate(member.idxs):
            if idx:
                mapped[r] = True
                result[r] = result[r] and all(zero[pos : pos + len(idx)])
            pos += len(idx)
    return [a and b for a, b in zip(result, mapped)]


_FIXED_SLICES = {"_SplitOp": "split/chunk", "_UnbindOp": "unbind", "_SliceOp": "slice"}


def _blocker(group: ChannelGroup, modules: dict[str, Any], heads: dict[tuple[str, str], str]) -> str | None:
    if group.reaches_output:
        return "the channel is part of a model output"
    for member in group.layers():
        if (member.name, member.side) in heads:  # a single channel cannot leave a head
            return f"{member.name} holds the attention heads of {heads[(member.name, member.side)]}: channels go only as whole heads"
    if group.issues:  # a member was dropped: a plan without it would leave that layer's channels behind
        return group.issues[0]
    for member in group.members:
        if member.op in _FIXED_SLICES:
            return f"the channels pass through a {_FIXED_SLICES[member.op]} whose sizes are fixed in the forward code"
    for member in group.layers():
        obj = modules.get(member.name)
        role = _role(obj)
        if role is None:
            return f"{member.name} ({member.op}) is a layer type compactor does not know"
        if role is Role.BLOCKING:
            return f"{member.name}: {shrinker_for(obj).why_blocking(obj)}"  # type: ignore[union-attr]
    return None


def _unremovable(group: ChannelGroup, modules: dict[str, Any], fates: dict[int, ChannelFate]) -> dict[int, ChannelFate]:
    """Channels planned away that a layer cannot lose: part of a GroupNorm group, or more from one group
    of a grouped conv than from another (checked on this group's channels alone, which is stricter than
    needed where several groups feed one layer, and so safe)."""
    removed = [r for r, f in fates.items() if f.fate.removed]
    pins: dict[int, ChannelFate] = {}
    for member in group.layers():
        obj = modules[member.name]
        shrinker = shrinker_for(obj)
        local = [i for r in removed for i in member.idxs[r]]
        if shrinker is None or not local:
            continue
        ok = set(shrinker.removable(obj, member.side, torch.tensor(local, dtype=torch.long)).tolist())
        for r in removed:
            if r not in pins and not all(i in ok for i in member.idxs[r]):
                pins[r] = ChannelFate(r, Fate.KEPT_LAYOUT, f"{member.name}: {shrinker.why_unremovable(obj)}")
    return pins


def _rounding(group: ChannelGroup, fates: dict[int, ChannelFate], round_to: int) -> dict[int, ChannelFate]:
    """Removable channels to keep so that the surviving count is a multiple of ``round_to``.

    Prefers channels that need no compensation, then folded ones, then merged ones (the next pass
    plans the merges again without them)."""
    removed = [r for r, f in fates.items() if f.fate.removed]
    if round_to <= 1 or not removed:
        return {}
    left = group.size - len(removed)
    target = min(group.size, -(-left // round_to) * round_to)
    order = {Fate.REMOVED: 0, Fate.FOLDED: 1, Fate.MERGED: 2}
    chosen = sorted(removed, key=lambda r: (order[fates[r].fate], r))[: target - left]
    reason = f"kept so that {group.root} keeps a multiple of {round_to} channels"
    return {r: ChannelFate(r, Fate.KEPT_ROUNDING, reason) for r in chosen}


def _compensate(
    group: ChannelGroup,
    consumers: list[Member],
    modules: dict[str, Any],
    constants: dict[int, dict[str, torch.Tensor]],
    fates: dict[int, ChannelFate],
) -> tuple[dict[int, list[Fold]], list[Merge]]:
    """Folds per root channel, and merges into one carrier per group where zero padding needs it."""
    folds: dict[int, list[Fold]] = defaultdict(list)
    padded = [c for c in consumers if not shrinker_for(modules[c.name]).can_fold(modules[c.name])]  # type: ignore[union-attr]
    needs_carrier = [r for r in constants if any(_nonzero(constants[r].get(c.name)) for c in padded)]
    by_unit: dict[tuple[int, ...], list[int]] = defaultdict(list)  # one carrier per group of a grouped conv
    for r in needs_carrier:
        by_unit[_units(r, padded, modules)].append(r)
    carriers = {unit: _choose_carrier(rs, constants, padded) for unit, rs in by_unit.items()}
    # (layer, carrier input index) -> [(merged input index, ratio)]. A channel read at several inputs of
    # one layer (``cat([x, x])``) merges its j-th input into the carrier's j-th: any two constant inputs of
    # the same conv see the same zero padding.
    merge_parts: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in sorted(constants):
        carrier = carriers.get(_units(r, padded, modules))
        if r == carrier:
            fates[r] = ChannelFate(r, Fate.CARRIER, "kept to carry the merged constant channels")
            continue
        parts = _merge_parts(r, carrier, padded, constants)
        if parts is None:
            fates[r] = ChannelFate(r, Fate.KEPT_VARYING, "constant into a zero-padded layer with no carrier")
            continue
        merged = bool(parts)
        for name, into, idx, ratio in parts:
            merge_parts[(name, into)].append((idx, ratio))
        for c in consumers:
            if c in padded or c.name not in constants[r]:
                continue
            k = constants[r][c.name]
            if _nonzero(k):
                folds[r].append(_fold(group, modules, c.name, tuple(c.idxs[r]), k))
        if merged:
            fates[r] = ChannelFate(r, Fate.MERGED, f"constant merged into channel {carrier}")
        else:
            fates[r] = ChannelFate(r, Fate.FOLDED, "constant folded into the next layer's bias")
    merges = []
    for (name, into), pairs in merge_parts.items():
        idx, ratio = zip(*pairs)
        merges.append(Merge(name, into, tuple(idx), tuple(ratio)))
    return folds, merges


def _units(r: int, padded: list[Member], modules: dict[str, Any]) -> tuple[int, ...]:
    """Where root channel ``r`` enters each padded consumer (0 everywhere but in grouped convs)."""
    return tuple(shrinker_for(modules[c.name]).merge_unit(modules[c.name], i) for c in padded for i in c.idxs[r])  # type: ignore[union-attr]


def _merge_parts(
    r: int, carrier: int | None, padded: list[Member], constants: dict[int, dict[str, torch.Tensor]]
) -> list[tuple[str, int, int, float]] | None:
    """(layer, carrier input, input of ``r``, ratio) for every padded layer where ``r`` is not zero;
    None if some cannot be merged (no carrier, or it is zero or read differently there)."""
    parts = []
    for c in padded:
        k = constants[r].get(c.name)
        if not _nonzero(k):
            continue
        kc = constants[carrier].get(c.name) if carrier is not None else None
        if kc is None or len(c.idxs[r]) != len(c.idxs[carrier]) or bool((kc == 0).any()):  # type: ignore[index]
            return None
        for j, (idx, into) in enumerate(zip(c.idxs[r], c.idxs[carrier])):  # type: ignore[index]
            parts.append((c.name, into, idx, float(k[j]) / float(kc[j])))  # type: ignore[index]
    return parts


def _nonzero(k: torch.Tensor | None) -> bool:
    return k is not None and bool((k != 0).any())


def _choose_carrier(candidates: list[int], constants: dict[int, dict[str, torch.Tensor]], padded: list[Member]) -> int | None:
    """The candidate whose smallest constant at the padded layers is largest (best conditioned)."""
    best, best_score = None, 0.0
    for r in candidates:
        ks = [constants[r].get(c.name) for c in padded]
        if any(k is None for k in ks):
            continue
        score = min(float(k.abs().min()) for k in ks)  # type: ignore[union-attr]
        if score > best_score:
            best, best_score = r, score
    return best


def _keep_one(group: ChannelGroup, fates: dict[int, ChannelFate], folds: dict[int, list[Fold]]) -> None:
    """Never remove every channel of a group: keep one, preferring one that needs no compensation."""
    removed = [r for r, f in fates.items() if f.fate.removed]
    if len(removed) < group.size:
        return
    plain = [r for r in removed if fates[r].fate is Fate.REMOVED]
    folded = [r for r in removed if fates[r].fate is Fate.FOLDED]
    if plain:
        keep = plain[0]
    elif folded:
        keep = folded[0]
        folds.pop(keep, None)
    else:
        return  # every channel merged into a carrier: the carrier is kept
    fates[keep] = ChannelFate(keep, Fate.KEPT_MIN_ONE, "a layer needs at least one channel")
