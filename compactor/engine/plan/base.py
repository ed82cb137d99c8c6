"""The plan's data (fates, folds, merges, one plan per group) and the helpers every planning step shares.

A plan is data: the rebuild stage applies it to a copy of the model, the verify stage decides whether it
ships. Compensation is recorded in the original index space (:class:`Fold`, :class:`Merge`) and applied by
:func:`compactor.engine.plan.compensate.apply_compensation`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ...layers import Role, Shrinker, role_of, shrinker_for
from ..coupling import ChannelGroup, Member

Modules = dict[str, Any]  # name -> module, or bare parameter (LayerScale)


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
    KEPT_UNIFORM = "kept: --uniform"  # kept so that every layer of a kind has the same width
    KEPT_AUTO = "kept: --round-to auto"  # kept because the target ran the wider layers faster

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
class WidthTarget:
    """Keep at least ``width`` channels of a group, the extra ones with ``fate`` and ``reason`` (``--uniform``,
    ``--round-to auto``)."""

    width: int
    fate: Fate
    reason: str


@dataclass(frozen=True)
class Fold:
    """Add the effect of constants ``k`` on input indices ``idx`` of ``layer`` to its bias; or, where
    ``layer`` has no bias and feeds only ``norm`` (a BatchNorm), let that layer absorb it
    (``Shrinker.absorb_shift``: the same function, and the architecture keeps ``bias=False``)."""

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


SIZE_ROUNDING = 1e-5  # relative: one constant at two input sizes, apart by the rounding of a reduction only


@dataclass
class InputStats:
    """Per consumer layer, per input index: the smallest and largest value seen over all inputs."""

    lo: dict[str, torch.Tensor] = field(default_factory=dict)
    hi: dict[str, torch.Tensor] = field(default_factory=dict)
    # the same over the runs at the example's size alone, where a run at another size counts too (merged)
    example: InputStats | None = None

    def merged(self, other: InputStats) -> InputStats:
        """These and ``other``'s (a run at another size) together, with these as ``example``. An index that is
        a constant in both, equal but for rounding (a mean over more positions, in float32), stays this one:
        a size-dependent constant (``1 / W``, ``k * H * W``) differs by far more, and verification at that
        size still judges the fold."""
        lo, hi = dict(other.lo), dict(other.hi)
        for n, a in self.lo.items():
            b = self.hi[n]
            if n not in other.lo:
                lo[n], hi[n] = a, b
                continue
            c, d = other.lo[n], other.hi[n]
            same = (a == b) & (c == d) & ((a - c).abs() <= SIZE_ROUNDING * a.abs().clamp(min=1.0))
            lo[n] = torch.where(same, a, torch.minimum(a, c))
            hi[n] = torch.where(same, b, torch.maximum(b, d))
        return InputStats(lo, hi, example=self)

    def constant(self, layer: str, idx: Iterable[int]) -> torch.Tensor | None:
        """The constants at ``idx`` (float64), or None if any of them varied."""
        i = torch.tensor(list(idx), dtype=torch.long)
        lo, hi = self.lo[layer][i], self.hi[layer][i]
        if not torch.equal(lo, hi):
            return None
        return lo


def shrinker_at(modules: Modules, name: str) -> Shrinker[Any]:
    """The shrinker of a group member (members are known layers: the coupling stage checked)."""
    shrinker = shrinker_for(modules[name])
    if shrinker is None:
        raise KeyError(f"{name} has no shrinker")
    return shrinker


def mixing(members: list[Member], modules: Modules) -> list[Member]:
    return [m for m in members if role_of(modules.get(m.name)) is Role.MIXING]


ZeroTest = Callable[[Shrinker[Any], Any, torch.Tensor], torch.Tensor]


def rows_zero(shrinker: Shrinker[Any], module: Any, idx: torch.Tensor) -> torch.Tensor:
    return shrinker.out_rows_zero(module, idx)


def cols_zero(shrinker: Shrinker[Any], module: Any, idx: torch.Tensor) -> torch.Tensor:
    return shrinker.in_cols_zero(module, idx)


def forgets(shrinker: Shrinker[Any], module: Any, idx: torch.Tensor) -> torch.Tensor:
    return shrinker.forgets_input(module, idx)


def all_zero(members: list[Member], modules: Modules, size: int, test: ZeroTest) -> list[bool]:
    """Per root channel: every member that maps it passes ``test`` (and at least one maps it)."""
    result = [True] * size
    mapped = [False] * size
    for member in members:
        module = modules[member.name]
        flat = [i for idx in member.idxs for i in idx]
        if not flat:
            continue
        zero = test(shrinker_at(modules, member.name), module, torch.tensor(flat, dtype=torch.long)).tolist()
        pos = 0
        for r, idx in enumerate(member.idxs):
            if idx:
                mapped[r] = True
                result[r] = result[r] and all(zero[pos : pos + len(idx)])
            pos += len(idx)
    return [a and b for a, b in zip(result, mapped)]


def nonzero(k: torch.Tensor | None) -> bool:
    return k is not None and bool((k != 0).any())


def same_plans(a: list[GroupPlan], b: list[GroupPlan]) -> bool:
    """The same plan objects, in order: what was built (or timed) from ``a`` is what ``b`` would give."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
