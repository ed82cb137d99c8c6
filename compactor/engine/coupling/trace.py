"""What the label tracer records (:class:`_Trace`), and the labels it keeps beside tensors
(:class:`_LabelStore`, the base of the tracer's op handlers)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import CouplingUnfollowed, first_line
from ...layers import Side
from .groups import Kind, SizeSource
from .ops import Labels, _UnionFind, _unique


@dataclass
class _Read:
    """Where a layer or op meets labelled channels: per local index, the labels found there."""

    name: str
    op: str
    side: Side
    kind: Kind
    dim: int
    labels: list[set[int]]
    pieces: tuple[int, ...] = ()
    why: str = ""
    source: SizeSource | None = None  # the module attribute a split's sizes come from


@dataclass
class _Trace:
    uf: _UnionFind = field(default_factory=_UnionFind)
    reads: list[_Read] = field(default_factory=list)
    producers: list[tuple[str, list[int]]] = field(default_factory=list)  # mixing layer, its out labels
    opaque: dict[int, str] = field(default_factory=dict)  # label -> why its channel must stay
    sized: dict[int, str] = field(default_factory=dict)  # label -> the reduction whose size it depends on
    outputs: set[int] = field(default_factory=set)
    uses: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # id(tensor) -> times read
    written_by: dict[int, str] = field(default_factory=dict)  # id(tensor) -> the layer that wrote it
    feeds: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # layer -> ids it wrote
    read_by: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # id -> layers
    params: dict[str, Labels] = field(default_factory=dict)  # bare parameters used: element labels
    owner: dict[int, str] = field(default_factory=dict)  # a mixing layer's fresh label -> that layer
    catted: set[int] = field(default_factory=set)  # labels that went through a concatenation
    joins: list[tuple[str, list[set[int]]]] = field(default_factory=list)  # (op, labels per operand)
    ops: int = 0


def _replay(name: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    """``func`` run on label tensors as the op ran on the data (the op replayed, or the labels shaped as
    its output). The op ran already, so what this raises is the op's, on a form the tracer does not follow
    (:class:`CouplingUnfollowed`, which the tracer catches), not a bug of compactor's."""
    try:
        return func(*args, **kwargs)
    except Exception as e:  # the op raises anything from RuntimeError to IndexError
        raise CouplingUnfollowed(f"{name} fails on the labels ({first_line(e, with_type=True)})") from e


class _LabelStore:
    """A label tensor beside every tensor the forward makes (by ``id``, the tensor kept alive with it), and
    the trace those labels build."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.trace = _Trace()
        self.labels: dict[int, tuple[torch.Tensor, Labels]] = {}  # id(tensor) -> (tensor, labels)
        self.params = {id(p): (n, p) for n, p in model.named_parameters()}
        self.names = {id(m): n for n, m in model.named_modules()}
        self.calls: list[nn.Module] = []  # the model's modules whose forward is running, innermost last

    def labels_of(self, t: Any) -> Labels | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self.labels.get(id(t))
        if hit is not None and hit[0] is t and hit[1].shape == t.shape:
            return hit[1]
        if id(t) in self.params:  # a bare parameter used in the forward: one label per element
            name, p = self.params[id(t)]
            lab = torch.tensor([self.trace.uf.new() for _ in range(p.numel())], dtype=torch.float64)
            lab = lab.reshape(p.shape)
            self._set(t, lab)
            self.trace.params[name] = lab
            return lab
        return None

    def _set(self, t: torch.Tensor, lab: Labels) -> None:
        self.labels[id(t)] = (t, lab)

    def _blank(self, t: torch.Tensor) -> Labels:
        return torch.full(t.shape, -1.0, dtype=torch.float64)

    def _add_read(
        self,
        name: str,
        op: str,
        kind: Kind,
        dim: int,
        per: list[set[int]],
        pieces: tuple[int, ...],
        source: SizeSource | None = None,
    ) -> None:
        self.trace.reads.append(_Read(name, op, Side.IN, kind, dim, per, pieces, source=source))

    def _opaque(self, lab: Labels, why: str) -> None:
        for v in _unique(lab):
            if v >= 0:
                self.trace.opaque.setdefault(int(v), why)
