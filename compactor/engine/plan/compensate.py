"""Where constants are folded and merged: the one place that plans compensation and applies it.

A removed channel that carried a constant ``k`` into a consumer leaves ``k * W[:, c]`` behind:

* a consumer that sees the constant at every position (Linear, a conv without zero padding, anything
  after global pooling) gets it added to its bias (:class:`Fold`); a consumer without a bias that alone
  feeds a BatchNorm lets that norm absorb it in its running mean instead (``Shrinker.absorb_shift``);
* a zero-padded consumer sees it differently at the borders: it is merged into a *carrier* channel of
  the same group that stays (``W[:, carrier] += k_c / k_carrier * W[:, c]``, :class:`Merge`); one
  carrier per group, per group of a grouped conv, and carriers shared across groups where they can be.

The math is in docs/EXACTNESS.md. :func:`apply_compensation` writes a plan's folds and merges into a
model, in the original index space, before the rebuild stage removes anything.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from ...layers import Side
from ..coupling import ChannelGroup, Member
from .base import ChannelFate, Fate, Fold, GroupPlan, InputStats, Merge, Modules, mixing, nonzero, shrinker_at
from .widths import unremovable


def compensate(
    group: ChannelGroup,
    consumers: list[Member],
    modules: Modules,
    constants: dict[int, dict[str, torch.Tensor]],
    fates: dict[int, ChannelFate],
) -> tuple[dict[int, list[Fold]], list[Merge]]:
    """Folds per root channel, and merges into one carrier per group where zero padding needs it."""
    folds: dict[int, list[Fold]] = defaultdict(list)
    padded = [c for c in consumers if not shrinker_at(modules, c.name).can_fold(modules[c.name])]
    needs_carrier = [r for r in constants if any(nonzero(constants[r].get(c.name)) for c in padded)]
    # one carrier per place: per group of a grouped conv, and per set of layers reading (a chunk's pieces
    # go to different layers)
    by_unit: dict[tuple[tuple[str, int], ...], list[int]] = defaultdict(list)
    for r in needs_carrier:
        by_unit[units(r, padded, modules)].append(r)
    carriers = {unit: _choose_carrier(rs, constants, padded) for unit, rs in by_unit.items()}
    # (layer, carrier input index) -> [(merged input index, ratio)]. A channel read at several inputs of
    # one layer (``cat([x, x])``) merges its j-th input into the carrier's j-th: any two constant inputs of
    # the same conv see the same zero padding.
    merge_parts: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for r in sorted(constants):
        carrier = carriers.get(units(r, padded, modules))
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
            if nonzero(k):
                folds[r].append(fold(group, modules, c.name, tuple(c.idxs[r]), k))
        if merged:
            fates[r] = ChannelFate(r, Fate.MERGED, f"constant merged into channel {carrier}")
        else:
            fates[r] = ChannelFate(r, Fate.FOLDED, "constant folded into the next layer's bias")
    merges = []
    for (name, into), pairs in merge_parts.items():
        merges.append(Merge(name, into, tuple(i for i, _ in pairs), tuple(q for _, q in pairs)))
    return folds, merges


def fold(group: ChannelGroup, modules: Modules, layer: str, idx: tuple[int, ...], k: torch.Tensor) -> Fold:
    """Fold constants ``k`` at inputs ``idx`` of ``layer``: into its bias, or into the norm it alone feeds
    when it has no bias."""
    norm = dict(group.norm_after).get(layer) if getattr(modules[layer], "bias", None) is None else None
    return Fold(layer, idx, tuple(float(v) for v in k), norm)


def units(r: int, padded: list[Member], modules: Modules) -> tuple[tuple[str, int], ...]:
    """Where root channel ``r`` enters each padded consumer that reads it: the layer and its part (0
    everywhere but in grouped convs)."""
    return tuple(
        (c.name, shrinker_at(modules, c.name).merge_unit(modules[c.name], i))
        for c in padded
        for i in c.idxs[r]
    )


def _merge_parts(
    r: int, carrier: int | None, padded: list[Member], constants: dict[int, dict[str, torch.Tensor]]
) -> list[tuple[str, int, int, float]] | None:
    """(layer, carrier input, input of ``r``, ratio) for every padded layer where ``r`` is not zero;
    None if some cannot be merged (no carrier, or it is zero or read differently there)."""
    parts = []
    for c in padded:
        k = constants[r].get(c.name)
        if k is None or not nonzero(k):
            continue
        kc = constants[carrier].get(c.name) if carrier is not None else None
        if carrier is None or kc is None or len(c.idxs[r]) != len(c.idxs[carrier]) or bool((kc == 0).any()):
            return None
        for j, (idx, into) in enumerate(zip(c.idxs[r], c.idxs[carrier])):
            parts.append((c.name, into, idx, float(k[j]) / float(kc[j])))
    return parts


def _choose_carrier(
    candidates: list[int], constants: dict[int, dict[str, torch.Tensor]], padded: list[Member]
) -> int | None:
    """The candidate whose smallest constant at the padded layers is largest (best conditioned)."""
    best, best_score = None, 0.0
    for r in candidates:
        ks = [constants[r].get(c.name) for c in padded if c.idxs[r]]
        present = [k for k in ks if k is not None]
        if len(present) != len(ks):
            continue
        score = min(float(k.abs().min()) for k in present)
        if score > best_score:
            best, best_score = r, score
    return best


# --- carriers shared across groups -----------------------------------------------------------------
@dataclass(frozen=True)
class _Carrier:
    """A group's carrier channel as other groups see it: where it sits and what it carries."""

    index: int  # the plan's position
    channel: int  # root channel
    at: dict[str, tuple[int, ...]]  # consumer layer -> its input indices
    k: dict[str, torch.Tensor]  # consumer layer -> the constants there
    padded: frozenset[str]  # the zero-padded consumers
    needs: frozenset[str]  # padded layers where this group merges, or where its carrier is not zero
    units: dict[
        str, tuple[tuple[str, int], ...]
    ]  # consumer layer -> the group of a grouped conv at each input

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


def share_carriers(
    plans: list[GroupPlan], modules: Modules, stats: InputStats, fixed: set[int] | None = None
) -> list[GroupPlan]:
    """One carrier per group is one more than needed where several groups feed the same padded conv:
    any two constant inputs of one conv see the same zero padding, so a group's carrier can itself be
    merged into another group's carrier that every padded layer it needs also reads. Groups in ``fixed``
    (by index: held at a chosen width) may host, never be guests.

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
        if (
            host is None
            or guest.index in (fixed or set())
            or len(out[guest.index].removed) + 1 >= out[guest.index].group.size
        ):
            hosts.append(guest)
            continue
        merged = _merged_into(out[guest.index], guest, host, plans[host.index].group.root, modules)
        if unremovable(
            merged.group, modules, {f.channel: f for f in merged.fates}
        ):  # one more would unbalance a layer
            hosts.append(guest)
            continue
        out[guest.index] = merged
    return out


def _carrier_of(index: int, plan: GroupPlan, modules: Modules, stats: InputStats) -> _Carrier | None:
    carriers = [f.channel for f in plan.fates if f.fate is Fate.CARRIER]
    if len(carriers) != 1:  # none, or one per group of a grouped conv: those stay where they are
        return None
    r = carriers[0]
    consumers = [c for c in mixing(plan.group.layers(Side.IN), modules) if c.idxs[r] and c.name in stats.lo]
    k: dict[str, torch.Tensor] = {}
    for c in consumers:
        seen = stats.constant(c.name, c.idxs[r])
        if seen is None:
            return None
        k[c.name] = seen
    padded = frozenset(
        c.name for c in consumers if not shrinker_at(modules, c.name).can_fold(modules[c.name])
    )
    needs = {m.layer for m in plan.merges} | {n for n in padded if nonzero(k[n])}
    at_units = {c.name: units(r, [c], modules) for c in consumers}
    return _Carrier(
        index, r, {c.name: tuple(c.idxs[r]) for c in consumers}, k, padded, frozenset(needs), at_units
    )


def _merged_into(
    plan: GroupPlan, guest: _Carrier, host: _Carrier, host_root: str, modules: Modules
) -> GroupPlan:
    """``plan`` with its carrier merged into ``host``, and everything it carried re-aimed there."""
    merges = []
    for m in plan.merges:
        j = guest.at[m.layer].index(m.carrier)
        scale = float(guest.k[m.layer][j]) / float(host.k[m.layer][j])
        merges.append(Merge(m.layer, host.at[m.layer][j], m.idx, tuple(x * scale for x in m.ratio)))
    for name in guest.padded:
        if not nonzero(guest.k[name]):
            continue
        for j, (idx, into) in enumerate(zip(guest.at[name], host.at[name])):
            merges.append(Merge(name, into, (idx,), (float(guest.k[name][j]) / float(host.k[name][j]),)))
    folds = list(plan.folds)
    for name, k in guest.k.items():
        if name not in guest.padded and nonzero(k):
            folds.append(fold(plan.group, modules, name, guest.at[name], k))
    reason = f"constant merged into channel {host.channel} of the group of {host_root}"
    fates = tuple(
        ChannelFate(f.channel, Fate.MERGED, reason) if f.channel == guest.channel else f for f in plan.fates
    )
    return GroupPlan(plan.group, fates, tuple(folds), tuple(merges))


# --- applying ---------------------------------------------------------------------------------------
def apply_compensation(plan: GroupPlan, modules: Modules) -> None:
    """Write ``plan``'s folds and merges into ``modules`` (in place, in the original index space)."""
    for f in plan.folds:
        module = modules[f.layer]
        shrinker = shrinker_at(modules, f.layer)
        idx, k = torch.tensor(f.idx, dtype=torch.long), torch.tensor(f.k, dtype=torch.float64)
        if f.norm and modules.get(f.norm) is not None:
            shrinker_at(modules, f.norm).absorb_shift(modules[f.norm], shrinker.fold_delta(module, idx, k))
        else:
            shrinker.fold_constant(module, idx, k)
    for m in plan.merges:
        module = modules[m.layer]
        shrinker_at(modules, m.layer).merge_into(
            module,
            m.carrier,
            torch.tensor(m.idx, dtype=torch.long),
            torch.tensor(m.ratio, dtype=torch.float64),
        )
