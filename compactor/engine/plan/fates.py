"""Decide the fate of every zeroed channel of every group (see the package docstring)."""

from __future__ import annotations

import torch
from torch import nn

from ...inputs import ExampleInputs
from ...layers import Role, Side, own_forward, role_of, shrinker_for
from ...util import check_time
from ..coupling import ChannelGroup, Kind, Member
from ..heads import head_layers
from .base import (
    IGNORED,
    ChannelFate,
    Fate,
    Fold,
    GroupPlan,
    InputStats,
    Modules,
    WidthTarget,
    all_zero,
    cols_zero,
    mixing,
    rows_zero,
)
from .compensate import compensate, share_carriers
from .observe import dead_rows, proved_independent
from .varying import GATED_HINT, Maps, plan_varying, varying_maps
from .widths import at_least, round_layers, rounding, uniform_target, uniform_widths, unremovable


def plan_groups(
    model: nn.Module,
    groups: list[ChannelGroup],
    stats: InputStats,
    *,
    round_to: int = 1,
    runs: list[ExampleInputs] | None = None,
    uniform: bool = False,
    widths: dict[int, WidthTarget] | None = None,
) -> list[GroupPlan]:
    """One plan per group. ``round_to``: keep each group's surviving channel count a multiple of it.
    ``runs``: inputs to prove gated zeros with (see :func:`~.observe.gated_zeros`); without them none are.
    ``uniform``: every group of a kind (``layer.*.intermediate.dense``) keeps the same width, the largest.
    ``widths``: per group index, the least width to keep (``--round-to auto``'s choice)."""
    return Planner(model, groups, stats, runs).plans(round_to=round_to, uniform=uniform, widths=widths)


class Planner:
    """Plans the groups of one model, all at once (:meth:`plans`) or one at a given width (:meth:`plan`):
    ``--round-to auto`` asks for the plan of a group at each candidate width before it chooses."""

    def __init__(
        self,
        model: nn.Module,
        groups: list[ChannelGroup],
        stats: InputStats,
        runs: list[ExampleInputs] | None = None,
    ) -> None:
        self.model = model
        self.groups = groups
        self.stats = stats
        self.modules: Modules = dict(model.named_modules())
        self.modules.update(dict(model.named_parameters()))
        self.heads = head_layers(model)
        self.gated = proved_independent(model, groups, self.modules, stats, runs) if runs else {}
        self.zeroed = {
            i: _zeroed(g, self.modules, self.gated.get(i))
            for i, g in enumerate(groups)
            if mixing(g.layers(Side.OUT), self.modules)
        }
        candidates = _candidates(groups, self.modules, self.zeroed, self.heads)
        self.maps: dict[int, Maps] = (
            varying_maps(model, groups, self.modules, stats, runs, candidates) if runs else {}
        )

    def plan(self, i: int, *, round_to: int = 1, target: WidthTarget | None = None) -> GroupPlan:
        """Group ``i`` alone (no carrier shared with another group), keeping at least ``target.width``."""
        return _plan_group(
            self.groups[i],
            self.modules,
            self.stats,
            round_to,
            self.gated.get(i),
            self.heads,
            target,
            self.maps.get(i),
            self.zeroed.get(i),
        )

    def plans(
        self, *, round_to: int = 1, uniform: bool = False, widths: dict[int, WidthTarget] | None = None
    ) -> list[GroupPlan]:
        if round_to < 1:
            raise ValueError(f"round_to must be a positive integer, found {round_to}")
        widths = dict(widths or {})
        plans = []
        for i, group in enumerate(self.groups):
            check_time(f"the channel group of {group.root}")
            plans.append(self.plan(i, round_to=round_to, target=widths.get(i)))
        if uniform:
            for i, width in uniform_widths(plans).items():
                target = uniform_target(self.groups[i].root, width)
                if i not in widths or widths[i].width < width:
                    widths[i] = target
                    plans[i] = self.plan(i, round_to=round_to, target=target)
        if round_to == 1:  # with rounding, a carrier that goes would only be pinned back
            # a group held at a width keeps its own carrier: sharing it would leave one channel fewer
            plans = share_carriers(plans, self.modules, self.stats, fixed=set(widths))
        return round_layers(self.model, plans, round_to)


def _plan_group(
    group: ChannelGroup,
    modules: Modules,
    stats: InputStats,
    round_to: int = 1,
    gated: set[int] | None = None,
    heads: dict[tuple[str, Side], str] | None = None,
    target: WidthTarget | None = None,
    maps: Maps | None = None,
    flags: tuple[list[bool], list[bool]] | None = None,
) -> GroupPlan:
    producers = mixing(group.layers(Side.OUT), modules)
    consumers = mixing(group.layers(Side.IN), modules)
    if not producers:
        return _blocked_writer(group, modules)
    indep, ignored = flags if flags is not None else _zeroed(group, modules, gated)
    behind_gate = _behind_gate(group, modules, indep, ignored)
    zeroed = [r for r in range(group.size) if indep[r] or ignored[r] or r in behind_gate]
    if not zeroed:
        return GroupPlan(group, ())
    blocker = _blocker(group, modules, heads or {})
    if blocker:
        return GroupPlan(group, tuple(ChannelFate(r, Fate.KEPT_READ_ELSEWHERE, blocker) for r in zeroed))

    base: dict[int, ChannelFate] = {
        r: ChannelFate(r, Fate.KEPT_READ_ELSEWHERE, why)
        for r, why in _held_channels(group).items()
        if r in zeroed
    }
    all_constants: dict[int, dict[str, torch.Tensor]] = {}  # root channel -> consumer -> constants at its idx
    varying: list[int] = []  # profiled over the border patterns (see .varying)
    sized = dict(group.sized)
    for r in zeroed:
        if r in base:
            continue
        if ignored[r]:
            base[r] = ChannelFate(r, Fate.REMOVED, IGNORED)
            continue
        if r in behind_gate:
            base[r] = ChannelFate(r, Fate.KEPT_VARYING, behind_gate[r])
            continue
        if r in sized and not _zero_at(consumers, stats, r):
            why = f"its value depends on the input's size ({sized[r]}): no constant stands for it"
            base[r] = ChannelFate(r, Fate.KEPT_VARYING, why)
            continue
        if maps is not None and r in maps.kept:
            base[r] = ChannelFate(r, Fate.KEPT_VARYING, maps.kept[r])
            continue
        if maps is not None and r in maps.profiles:
            varying.append(r)
            continue
        seen = {
            c.name: stats.constant(c.name, c.idxs[r]) for c in consumers if c.idxs[r] and c.name in stats.lo
        }
        constants = {n: k for n, k in seen.items() if k is not None}
        if len(constants) != len(seen):
            where = next(n for n in seen if n not in constants)
            base[r] = ChannelFate(r, Fate.KEPT_VARYING, f"input-independent but not constant at {where}")
        elif all(bool((k == 0).all()) for k in constants.values()):
            base[r] = ChannelFate(r, Fate.REMOVED, "emits exactly zero")
        else:
            all_constants[r] = constants

    # Decide, check what the layers can lose, pin what they cannot, decide again. Pins only grow, so
    # this ends; a GroupNorm that would lose part of a group or a count off the rounding adds pins.
    pinned: dict[int, ChannelFate] = {}
    while True:
        fates = {**base, **pinned}
        kept_constants = {r: k for r, k in all_constants.items() if r not in pinned}
        folds, merges = compensate(group, consumers, modules, kept_constants, fates)
        if maps is not None and varying:
            more_fates, more_folds, more_merges = plan_varying(
                group, consumers, modules, maps, [r for r in varying if r not in pinned]
            )
            fates.update(more_fates)
            folds.update(more_folds)
            merges = merges + more_merges
        _keep_one(group, fates, folds)
        more = (
            unremovable(group, modules, fates)
            or rounding(group, fates, round_to)
            or at_least(group, fates, target)
        )
        if not more:
            break
        pinned.update(more)
    return GroupPlan(
        group,
        tuple(fates[r] for r in sorted(fates)),
        tuple(f for r in sorted(folds) for f in folds[r]),
        tuple(merges),
    )


def _zero_at(consumers: list[Member], stats: InputStats, r: int) -> bool:
    """Every reader of root channel ``r`` sees exactly zero there (on every input it was run on)."""
    for c in consumers:
        if c.idxs[r] and c.name in stats.lo:
            k = stats.constant(c.name, c.idxs[r])
            if k is None or not bool((k == 0).all()):
                return False
    return True


def _zeroed(group: ChannelGroup, modules: Modules, gated: set[int] | None) -> tuple[list[bool], list[bool]]:
    """Per root channel: input-independent (every writer dead, or a channelwise layer after the one writer
    forgets it, or a proved constant behind a join), and ignored (every reader's weight column zero)."""
    producers = mixing(group.layers(Side.OUT), modules)
    consumers = mixing(group.layers(Side.IN), modules)
    indep = all_zero(producers, modules, group.size, rows_zero)
    if len(producers) == 1:  # one writer: a norm with weight 0 after it forgets its input too
        indep = [a or b for a, b in zip(indep, _forgotten(group, modules))]
    indep = [a or r in (gated or set()) for r, a in enumerate(indep)]
    ignored = all_zero(consumers, modules, group.size, cols_zero) if consumers else [False] * group.size
    return indep, ignored


def _behind_gate(
    group: ChannelGroup, modules: Modules, indep: list[bool], ignored: list[bool]
) -> dict[int, str]:
    """Root channels a dead writer (or a channelwise layer that forgets its input) writes and a live one
    multiplies (a squeeze-excite gate) and that are not a proved constant: the product varies with the
    input, so they stay, and the reason names which factor is dead and which lives."""
    if not any(m.kind is Kind.MULTIPLY for m in group.members):
        return {}
    dead = dead_rows(group, modules)
    writers = [p.name for p in mixing(group.layers(Side.OUT), modules)]
    found = {}
    for r in range(group.size):
        if indep[r] or ignored[r] or not any(d[r] for d in dead.values()):
            continue
        live = [w for w in writers if not dead[w][r]]
        if live:
            found[r] = gated_reason([n for n, d in dead.items() if d[r]], live)
    return found


def gated_reason(dead: list[str], live: list[str]) -> str:
    """Why a channel with a dead factor and a live one stays: the product varies with the input."""
    dead, live = sorted(dead), sorted(live)
    return (
        f"{_names(dead)} {'is' if len(dead) == 1 else 'are'} zero there but {_names(live)} "
        f"{'lives' if len(live) == 1 else 'live'}, and the product varies with the input ({GATED_HINT})"
    )


def _names(names: list[str]) -> str:
    return ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")


def _candidates(
    groups: list[ChannelGroup],
    modules: Modules,
    zeroed: dict[int, tuple[list[bool], list[bool]]],
    heads: dict[tuple[str, Side], str],
) -> dict[int, list[int]]:
    """Per group index: the input-independent channels no reader ignores, in groups nothing holds whole."""
    found = {}
    for i, group in enumerate(groups):
        if i not in zeroed or _blocker(group, modules, heads):
            continue
        indep, ignored = zeroed[i]
        rs = [r for r in range(group.size) if indep[r] and not ignored[r]]
        if rs:
            found[i] = rs
    return found


def _blocked_writer(group: ChannelGroup, modules: Modules) -> GroupPlan:
    """A group written only by blocking layers (a grouped transposed conv): its zeroed filters stay, with the reason."""
    root = modules.get(group.root)
    shrinker = shrinker_for(root) if root is not None else None
    writer = next((m for m in group.layers(Side.OUT) if m.name == group.root), None)
    if shrinker is None or writer is None or shrinker.role_of(root) is not Role.BLOCKING:
        return GroupPlan(group, ())
    dead = all_zero([writer], modules, group.size, rows_zero)
    reason = f"{group.root}: {shrinker.why_blocking(root)}"
    return GroupPlan(
        group, tuple(ChannelFate(r, Fate.KEPT_READ_ELSEWHERE, reason) for r in range(group.size) if dead[r])
    )


def _forgotten(group: ChannelGroup, modules: Modules) -> list[bool]:
    """Per root channel: a channelwise layer of the group ignores its input there (``Shrinker.forgets_input``:
    a BatchNorm with weight 0 emits its bias, a zero depthwise filter its bias, whatever comes in)."""
    writers = {p.name for p in mixing(group.layers(Side.OUT), modules)}
    forgetting = [d for n, d in dead_rows(group, modules).items() if n not in writers]
    return [any(d[r] for d in forgetting) for r in range(group.size)]


def _held_channels(group: ChannelGroup) -> dict[int, str]:
    """In a group from compactor's own labels (exact index maps), the root channels that must stay and why:
    a model output holds them, an op reads across them, or they pass an op that cuts at fixed sizes (a
    ``split`` with sizes written in the code, a literal slice). The group's other channels go on."""
    if not group.exact:
        return {}
    held = dict(group.opaque)
    for r in group.at_output:
        held.setdefault(r, "the channel is part of a model output")
    for member in group.members:
        if member.kind.fixed_sizes and member.source is None:  # a source: the rebuild rewrites the sizes
            why = f"the channel passes through a {member.kind.value} whose sizes are fixed in the forward code ({member.op})"
            for r, idx in enumerate(member.idxs):
                if idx:
                    held.setdefault(r, why)
    return held


def _blocker(group: ChannelGroup, modules: Modules, heads: dict[tuple[str, Side], str]) -> str | None:
    if group.reaches_output and not group.exact:
        return "the channel is part of a model output"
    for member in group.layers():
        if (member.name, member.side) in heads:  # a single channel cannot leave a head
            return f"{member.name} holds the attention heads of {heads[(member.name, member.side)]}: channels go only as whole heads"
    if group.held:
        return group.held[0]
    if group.issues:  # a member was dropped: a plan without it would leave that layer's channels behind
        return group.issues[0]
    for member in group.members:
        if member.kind.fixed_sizes and not group.exact:
            return (
                f"the channels pass through a {member.kind.value} whose sizes are fixed in the forward code"
            )
    for member in group.layers():
        obj = modules.get(member.name)
        role = role_of(obj)
        if role is None:
            return f"{member.name} ({member.op}) is a layer type compactor does not know"
        unlike = own_forward(obj)
        if unlike is not None:
            return f"{member.name}: {unlike}"
        if role is Role.BLOCKING:
            shrinker = shrinker_for(obj)
            assert shrinker is not None
            return f"{member.name}: {shrinker.why_blocking(obj)}"
    return None


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
