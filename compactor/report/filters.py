"""Pruned filters: output rows of mixing layers (Conv, Linear) and depthwise convs that no input can change
(an all-zero weight row, masked or trained to zero), and what became of each.

A channel of a group goes only when every layer that writes it is zero there (it is then *zeroed*, and its
plan says what became of it). A pruned filter whose channel another layer writes live (the two meet at a
residual add, or a gate) stays, and the zeroed-channel count alone would not show it: this module finds
every pruned filter in the model and says, for each one kept, why.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine.coupling import ChannelGroup, Join
from ..engine.plan import Fate, GroupPlan
from ..layers import Role, Side, shrinker_for

COUPLED = "kept: coupled to a live channel"  # another layer writes the same channel, and not zero
UNTRACED = "kept: not traced"  # no channel group holds the row (the tracer failed, or never reached it)


@dataclass(frozen=True)
class PrunedFilter:
    """One all-zero output row of a layer, and its fate: a :class:`~compactor.engine.plan.Fate` value (the
    fate of its zeroed channel), :data:`COUPLED` or :data:`UNTRACED`. ``reason`` names no row, so the kept
    rows of a layer group by it."""

    layer: str
    row: int
    fate: str
    reason: str

    @property
    def removed(self) -> bool:
        return self.fate in (f.value for f in Fate if f.removed)


@dataclass(frozen=True)
class KeptFilters:
    """The kept pruned filters of one layer that share a fate, per reason (a coupled filter's reason names
    the live layer it meets, so one layer can have several)."""

    layer: str
    fate: str
    reasons: tuple[tuple[str, tuple[int, ...]], ...]  # (reason, rows)
    pruned: int  # the layer's pruned filters in all, removed ones included

    @property
    def rows(self) -> tuple[int, ...]:
        return tuple(sorted(row for _, rows in self.reasons for row in rows))

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "fate": self.fate,
            "kept": len(self.rows),
            "pruned": self.pruned,
            "reasons": [{"reason": reason, "rows": list(rows)} for reason, rows in self.reasons],
        }


def pruned_filters(
    model: nn.Module,
    plans: list[GroupPlan],
    *,
    uncalled: frozenset[str] = frozenset(),
    traced: bool = True,
    train_only: frozenset[str] = frozenset(),
) -> tuple[PrunedFilter, ...]:
    """Every all-zero output row of the model's mixing layers, with its fate under ``plans`` (made on this
    model: the same layer names and widths). A row no group holds is :data:`UNTRACED`: its layer is in
    ``uncalled`` (no forward called it), or the tracer failed (``traced=False``), or it never reached it."""
    zero = zero_rows(model)
    place: dict[tuple[str, int], tuple[GroupPlan, int]] = {}
    for plan in plans:
        for member in plan.group.layers(Side.OUT):
            rows = zero.get(member.name)
            if rows:
                for r, idx in enumerate(member.idxs):
                    for i in rows.intersection(idx):
                        place[(member.name, i)] = (plan, r)
    fates = {id(plan): {f.channel: f for f in plan.fates} for plan in plans}
    found = []
    for layer, rows in zero.items():
        for row in sorted(rows):
            where = place.get((layer, row))
            if where is None:
                found.append(
                    PrunedFilter(layer, row, UNTRACED, _untraced(layer, uncalled, traced, train_only))
                )
                continue
            plan, r = where
            fate = fates[id(plan)].get(r)
            if fate is not None:
                found.append(PrunedFilter(layer, row, fate.fate.value, fate.reason))
            else:
                found.append(PrunedFilter(layer, row, COUPLED, coupling(plan.group, layer, r, zero)))
    return tuple(found)


def _untraced(layer: str, uncalled: frozenset[str], traced: bool, train_only: frozenset[str]) -> str:
    if layer in train_only:
        return "the layer runs only in train mode: its own channels are not compacted"
    if layer in uncalled:
        return "no forward on the example inputs called the layer"
    if not traced:
        return "torch-pruning could not trace the model"
    return "no traced channel group holds it"


def zero_rows(model: nn.Module) -> dict[str, set[int]]:
    """Per writing layer (mixing, a grouped transposed conv, or a depthwise conv): the output rows no input
    can change (a depthwise conv's zero filter emits its bias)."""
    rows = {}
    for name, module in model.named_modules():
        shrinker = shrinker_for(module)
        if shrinker is None or shrinker.role is not Role.MIXING:
            continue
        n = shrinker.out_channels(module)
        if n:
            zero = shrinker.out_rows_zero(module, torch.arange(n))
            rows[name] = set(torch.nonzero(zero).flatten().tolist())
    return rows


def coupling(group: ChannelGroup, layer: str, r: int, zero: dict[str, set[int]]) -> str:
    """Why ``layer``'s zero filter at root channel ``r`` of ``group`` stays: the live writer of the same
    channel, and the op where the two meet (the nearest join that has them on different operands)."""
    live = sorted(
        m.name
        for m in group.layers(Side.OUT)
        if m.name in zero and m.idxs[r] and not set(m.idxs[r]) <= zero[m.name]
    )
    others = [name for name in live if name != layer]
    for join in group.joins:
        mine = [i for i, operand in enumerate(join.operands) if layer in operand]
        partner = next(
            (
                name
                for i, operand in enumerate(join.operands)
                if i not in mine
                for name in operand
                if name in others
            ),
            None,
        )
        if mine and partner is not None:
            return f"live in {partner} (through {_through(join, layer, partner)})"
    if others:
        return f"live in {others[0]}"
    return f"live in other rows of {layer}" if live else "its channel is not zeroed"


def _through(join: Join, layer: str, partner: str) -> str:
    op = f"{'an' if join.op[:1] in 'aeiou' else 'a'} {join.op}"
    return f"a concatenation and {op}" if {layer, partner} & set(join.through_concat) else op


def kept_by_layer(filters: tuple[PrunedFilter, ...]) -> list[KeptFilters]:
    """The kept pruned filters, one entry per layer and fate (model order), the most frequent reason first."""
    pruned: dict[str, int] = defaultdict(int)
    kept: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for f in filters:
        pruned[f.layer] += 1
        if not f.removed:
            kept[(f.layer, f.fate)][f.reason].append(f.row)
    return [
        KeptFilters(
            layer,
            fate,
            tuple((reason, tuple(rows)) for reason, rows in sorted(by.items(), key=lambda kv: -len(kv[1]))),
            pruned[layer],
        )
        for (layer, fate), by in kept.items()
    ]


def summary(filters: tuple[PrunedFilter, ...]) -> dict[str, Any]:
    """The counts the report's JSON gives: total, removed, kept, kept per fate, and kept per layer."""
    removed = sum(f.removed for f in filters)
    reasons: dict[str, int] = defaultdict(int)
    for f in filters:
        if not f.removed:
            reasons[f.fate] += 1
    return {
        "total": len(filters),
        "removed": removed,
        "kept": len(filters) - removed,
        "removed_fraction": removed / len(filters) if filters else 1.0,
        "kept_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "kept_by_layer": [k.to_dict() for k in kept_by_layer(filters)],
    }


def spans(rows: tuple[int, ...], most: int = 8) -> str:
    """``0-3, 9, 15``: runs of consecutive rows, the first ``most`` of them."""
    runs: list[list[int]] = []
    for row in sorted(rows):
        if runs and row == runs[-1][1] + 1:
            runs[-1][1] = row
        else:
            runs.append([row, row])
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs[:most])
    return text + (f", ... ({len(runs) - most} more runs)" if len(runs) > most else "")
