"""What widths a layer can take: whole GroupNorm groups, grouped convs balanced across their groups, and
channel counts at multiples of ``round_to``. Each returns the channels to pin (keep) and why."""

from __future__ import annotations

import re
from collections import defaultdict

import torch
from torch import nn

from ...layers import Side, width
from ..coupling import ChannelGroup, Kind
from .base import ChannelFate, Fate, GroupPlan, Modules, WidthTarget, shrinker_at


def unremovable(
    group: ChannelGroup, modules: Modules, fates: dict[int, ChannelFate]
) -> dict[int, ChannelFate]:
    """Channels planned away that a layer cannot lose: part of a GroupNorm group, or more from one group
    of a grouped conv than from another (checked on this group's channels alone, which is stricter than
    needed where several groups feed one layer, and so safe)."""
    removed = [r for r, f in fates.items() if f.fate.removed]
    pins: dict[int, ChannelFate] = _uneven_chunks(group, removed) | _emptied_pieces(group, removed)
    for member in group.layers():
        obj = modules[member.name]
        local = [i for r in removed for i in member.idxs[r]]
        if not local:
            continue
        shrinker = shrinker_at(modules, member.name)
        idx = torch.tensor(local, dtype=torch.long)
        ok = set(shrinker.removable(obj, member.side, idx).tolist())
        if len(ok) == len(set(local)):
            continue
        hint = shrinker.what_would_remove(obj, member.side, idx)
        reason = f"{member.name}: {shrinker.why_unremovable(obj)}" + (f"; {hint}" if hint else "")
        for r in removed:
            if r not in pins and not all(i in ok for i in member.idxs[r]):
                pins[r] = ChannelFate(r, Fate.KEPT_LAYOUT, reason)
    return pins


def _uneven_chunks(group: ChannelGroup, removed: list[int]) -> dict[int, ChannelFate]:
    """A ``chunk`` cuts its input into pieces at the runtime size: it stays right when every piece loses
    as many channels (then ``chunk`` cuts each piece where it now ends). Pins the surplus of the pieces
    that would lose more, latest channels first."""
    pins: dict[int, ChannelFate] = {}
    for member in group.members:
        if member.kind is not Kind.CHUNK:
            continue
        per_piece: dict[int, list[int]] = defaultdict(list)
        for r in removed:
            for i in member.idxs[r]:
                per_piece[member.piece_of(i)].append(r)
        if not per_piece:
            continue
        counts = [len(set(per_piece.get(p, []))) for p in range(len(member.pieces))]
        low = min(min(counts), min(member.pieces) - 1)
        if len(set(member.pieces)) > 1:
            low = 0  # uneven pieces (7 into 3: 3, 3, 1): a piece could vanish; kept as they are
        for rs in per_piece.values():
            for r in sorted(set(rs), reverse=True)[: len(set(rs)) - low]:
                pins.setdefault(
                    r,
                    ChannelFate(
                        r,
                        Fate.KEPT_LAYOUT,
                        f"a {member.op if member.source else 'chunk'} into {len(member.pieces)} pieces (sizes "
                        f"{list(member.pieces)}) stays right only "
                        f"if each piece loses as many channels: {low} can go from each",
                    ),
                )
    return pins


def _emptied_pieces(group: ChannelGroup, removed: list[int]) -> dict[int, ChannelFate]:
    """A split whose sizes the rebuild rewrites (:attr:`Member.source`) keeps one channel in every piece:
    an empty piece would leave the layers that read it with none."""
    pins: dict[int, ChannelFate] = {}
    for member in group.members:
        if member.kind is not Kind.SPLIT or member.source is None:
            continue
        per_piece: dict[int, dict[int, int]] = defaultdict(dict)  # piece -> its removed index -> root
        for r in removed:
            for i in member.idxs[r]:
                per_piece[member.piece_of(i)][i] = r
        for p, gone in per_piece.items():
            if len(gone) >= member.pieces[p]:
                r = max(gone.values())
                why = f"piece {p} of the {member.op} would lose every channel: one stays"
                pins.setdefault(r, ChannelFate(r, Fate.KEPT_LAYOUT, why))
    return pins


def rounding(group: ChannelGroup, fates: dict[int, ChannelFate], round_to: int) -> dict[int, ChannelFate]:
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


def at_least(
    group: ChannelGroup, fates: dict[int, ChannelFate], target: WidthTarget | None
) -> dict[int, ChannelFate]:
    """Removable channels to keep so that the group keeps ``target.width`` channels (``--uniform``,
    ``--round-to auto``); the same preference as :func:`rounding`."""
    removed = [r for r, f in fates.items() if f.fate.removed]
    left = group.size - len(removed)
    if target is None or left >= target.width:
        return {}
    order = {Fate.REMOVED: 0, Fate.FOLDED: 1, Fate.MERGED: 2}
    chosen = sorted(removed, key=lambda r: (order[fates[r].fate], r))[: target.width - left]
    return {r: ChannelFate(r, target.fate, target.reason) for r in chosen}


def uniform_target(root: str, width: int) -> WidthTarget:
    return WidthTarget(
        width, Fate.KEPT_UNIFORM, f"kept so that {root} has the width of the widest layer like it ({width})"
    )


def uniform_widths(plans: list[GroupPlan]) -> dict[int, int]:
    """Per plan index: the width its group must keep so that every group of the same kind (the same layer
    name but for block numbers: ``layer.*.intermediate.dense``) and size keeps the same, the largest."""
    kinds: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, plan in enumerate(plans):
        kinds[(re.sub(r"\.\d+(?=\.|$)", ".*", plan.group.root), plan.group.size)].append(i)
    targets = {}
    for members in kinds.values():
        if len(members) < 2:
            continue
        width = max(plans[i].group.size - len(plans[i].removed) for i in members)
        targets.update({i: width for i in members if plans[i].group.size - len(plans[i].removed) < width})
    return targets


def round_layers(model: nn.Module, plans: list[GroupPlan], round_to: int) -> list[GroupPlan]:
    """Undo the groups that leave a layer with a count off the multiple, until none does.

    Each group keeps a multiple of ``round_to`` on its own; a layer that reads several groups (a
    ``cat``) can still miss it when one of them is untouched and is not a multiple itself. Each pass
    restores at least one group, so this ends.
    """
    if round_to <= 1:
        return plans
    modules: Modules = dict(model.named_modules())
    plans = list(plans)
    while True:
        removed: dict[tuple[str, Side], set[int]] = defaultdict(set)
        touching: dict[tuple[str, Side], set[int]] = defaultdict(set)
        for i, plan in enumerate(plans):
            for member in plan.group.layers():
                idx = {j for r in plan.removed for j in member.idxs[r]}
                if idx:
                    removed[(member.name, member.side)] |= idx
                    touching[(member.name, member.side)].add(i)
        widths = {key: width(modules.get(key[0]), key[1]) for key in removed}
        off = [
            key
            for key, idx in removed.items()
            if (w := widths[key]) is not None and (w - len(idx)) % round_to
        ]
        if not off:
            return plans
        for name, side in off:
            reason = f"kept so that {name} keeps a multiple of {round_to} channels"
            for i in touching[(name, side)]:
                plans[i] = plans[i].restored(reason, Fate.KEPT_ROUNDING)
