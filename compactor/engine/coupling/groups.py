"""The coupling stage's answer in compactor's own terms: groups of coupled channels and where they meet.

Both analyses return these: Torch-Pruning's (``tp_adapter.py``) and compactor's own channel labels
(``labels.py``), and both find the norm layer a producer alone feeds with :func:`norm_after`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, get_args

from torch import nn

from ...layers import Role, Side, shrinker_for

Analysis = Literal["auto", "torch-pruning", "labels"]  # which channel analysis finds the groups
ANALYSES: tuple[str, ...] = get_args(Analysis)


class Kind(str, Enum):
    """What a member of a group is, as far as channels are concerned."""

    LAYER = "layer"  # a module or bare parameter compactor can rebuild
    MULTIPLY = "multiply"  # an elementwise product (a gate: squeeze-excite)
    SPLIT = "split"  # a split: sizes fixed in the forward code
    CHUNK = "chunk"  # a chunk: pieces cut at the runtime size (``pieces``), so each may lose as many
    UNBIND = "unbind"
    SLICE = "slice"  # a slice that may cut the channel dimension
    OUTPUT = "output"  # a model output
    # a layer only train mode runs (GoogLeNet's and Inception's auxiliary heads) reading the group: it loses
    # the channels that go, with no compensation, and plays no part in planning (eval mode never reads it)
    PASSENGER = "passenger"
    OTHER = "other"  # any other op (add, concat, reshape, a slice of another dimension...)

    @property
    def fixed_sizes(self) -> bool:
        """The op cuts channels at sizes the forward code fixes: removing one shifts the others."""
        return self in (Kind.SPLIT, Kind.UNBIND, Kind.SLICE)


def equal_pieces(size: int, n: int) -> tuple[int, ...]:
    """The pieces ``split(x, size)`` cuts ``n`` channels into: ``size`` each, the last what is left."""
    return tuple(min(size, n - s) for s in range(0, n, size))


@dataclass(frozen=True)
class SizeSource:
    """The module attribute a split's sizes come from: ``split(x, self.attr)`` (a tuple, list or int of
    sizes), or with ``per`` > 0 ``split(x, self.attr // per)`` into ``per`` equal pieces."""

    module: str
    attr: str
    per: int = 0

    def __str__(self) -> str:
        name = f"{self.module}.{self.attr}" if self.module else self.attr
        return f"{name} // {self.per}" if self.per else name


@dataclass(frozen=True)
class Member:
    """One place a group's channels meet: a layer (or bare parameter, or functional op) and a side."""

    name: str  # module name, parameter name, or Torch-Pruning's name for a functional op
    op: str  # class name: Conv2d, BatchNorm2d, Parameter, or the traced op's (for messages)
    side: Side  # Side.OUT: the layer writes these channels; Side.IN: the layer reads them
    kind: Kind
    pruning_dim: int  # for bare parameters: the dimension that holds the channels
    idxs: tuple[tuple[int, ...], ...]  # per root channel: the layer-local indices it maps to
    pieces: tuple[int, ...] = ()  # a chunk's or split's piece sizes along its dimension
    # a split whose sizes are a module's attribute (``self.split_indices``, Res2Net's ``self.width``; with
    # ``per``, ``self.attr // per`` equal pieces, a Kind.CHUNK: each loses as many): the rebuild rewrites it
    source: SizeSource | None = None

    def piece_of(self, i: int) -> int:
        """Which piece of a chunk local index ``i`` falls in."""
        end = 0
        for p, size in enumerate(self.pieces):
            end += size
            if i < end:
                return p
        return len(self.pieces)


@dataclass(frozen=True)
class Join:
    """An elementwise op where the group's channels from several writers meet: ``x + y`` (a residual add, a
    sum of branches), ``x * g`` (a gate). Per operand, the group's writing layers whose channels reach it
    (through channelwise layers, other joins and concatenations), and those reached through a concatenation."""

    op: str  # "add", "subtract", "multiply", "divide", or the traced op's name
    operands: tuple[tuple[str, ...], ...]
    through_concat: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be removed together: removing root channel r removes ``idxs[r]`` everywhere."""

    root: str
    size: int
    members: tuple[Member, ...]
    reaches_output: bool
    issues: tuple[str, ...]
    norm_after: tuple[tuple[str, str], ...] = ()  # (member layer, the BatchNorm it alone feeds)
    held: tuple[str, ...] = ()  # why the group must stay whole, found outside this trace (train mode)
    joins: tuple[Join, ...] = ()  # where channels of different writers meet (for the report)
    # From compactor's own channel labels (``labels.py``): the index maps are exact, so an op that cuts
    # channels at fixed sizes keeps only the channels it maps, and ``opaque`` names, per root channel, an
    # op that reads across channels (those channels stay).
    exact: bool = False
    opaque: tuple[tuple[int, str], ...] = ()
    at_output: tuple[int, ...] = ()  # exact groups: the root channels a model output holds
    # exact groups: root channels that pass a reduction whose value on a constant depends on the input's
    # size (a sum over positions, a softmax): a constant there holds at the example's size only, so such a
    # channel goes only where its readers see exactly zero. Per root channel, the reduction.
    sized: tuple[tuple[int, str], ...] = ()

    def layers(self, side: Side | None = None) -> list[Member]:
        return [m for m in self.members if m.kind is Kind.LAYER and (side is None or m.side is side)]


def norm_after(model: nn.Module, edges: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Mixing layers whose output goes to exactly one place, a layer of the same width that can absorb a
    constant shift of its input (a BatchNorm: see ``Shrinker.absorb_shift``): layer -> that layer.

    ``edges``: (layer, the one layer its output goes to), for each layer of ``model`` whose output goes to
    exactly one place, as the analysis sees it (a node of Torch-Pruning's graph with one output node; a
    tensor the label trace saw read once, by a layer)."""
    modules = dict(model.named_modules())
    found = {}
    for name, after in edges:
        module, norm_module = modules.get(name), modules.get(after)
        shrinker, norm = shrinker_for(module), shrinker_for(norm_module)
        if (
            shrinker is not None
            and norm is not None
            and shrinker.role_of(module) is Role.MIXING
            and norm.role_of(norm_module) is Role.CHANNELWISE
            and norm.can_absorb_shift(norm_module)
            and shrinker.out_channels(module) == norm.in_channels(norm_module)
        ):
            found[name] = after
    return found


@dataclass(frozen=True)
class Coupled:
    """The channel groups, and why there are none where the tracer failed (a warning for the report)."""

    groups: list[ChannelGroup]
    untraced: list[str]


class CouplingCache:
    """The coupling stage's answers by model structure, for calls on models built alike (the decoder blocks
    of one LLM, :mod:`compactor.stream`): each structure is traced once. A structure is every module's name
    and class, every parameter's and buffer's name, shape and dtype, the example inputs' shapes and dtypes,
    the layers only train mode runs and the analysis asked for. Groups name layers and channel indices only,
    so another model of the structure has the same ones; the plans made from them are verified as always."""

    def __init__(self) -> None:
        self._answers: dict[tuple[Any, ...], Coupled] = {}
        self.traced = 0  # structures traced (the rest were answered from here)

    def answer(self, key: tuple[Any, ...], trace: Callable[[], Coupled]) -> Coupled:
        found = self._answers.get(key)
        if found is None:
            found = self._answers[key] = trace()
            self.traced += 1
        return found
