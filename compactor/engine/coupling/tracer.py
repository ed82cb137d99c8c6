"""The label tracer: the forward runs once under a :class:`~torch.overrides.TorchFunctionMode` that keeps a
label tensor beside every tensor (see :mod:`.labels`). Layers compactor knows write fresh labels (mixing)
or pass them on (channelwise); ops that move elements are replayed (:mod:`.moves`); elementwise ops unite
the labels that meet; reductions, pooling, matmul and attention pass channels on where they do not read
across them, and mark them opaque where they do."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from ...errors import CouplingUnfollowed
from ...layers import Role, Side, shrinker_for
from .groups import Kind
from .moves import _Moves
from .ops import (
    _ELEMENTWISE,
    _IGNORE,
    _JOIN_WORDS,
    _MOVE,
    _NORMS,
    _REDUCE,
    _SIZED,
    _SPATIAL,
    Labels,
    _along,
    _arg,
    _broadcast,
    _channel_dim,
    _constant_along,
    _op_name,
    _per_index,
    _tensors,
    _unique,
    _unique_rows,
    _unite,
    _varies,
)
from .trace import _Read, _replay


class _LabelMode(_Moves, TorchFunctionMode):
    """Runs the forward once: layers compactor knows are seen through hooks (their own ops are not traced),
    every other op through ``__torch_function__``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.depth = 0  # > 0 inside a layer compactor knows: its own ops are not traced
        self.first_read: dict[str, list[set[int]]] = {}  # layer -> labels per input index, first call
        self.written: dict[str, list[int]] = {}  # mixing layer -> the labels of its output channels
        self.failed_op: tuple[str, Exception] | None = None  # the last op of the model that raised, and what

    # --- layers compactor knows: hooks ------------------------------------------------------------
    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = [
            nn.modules.module.register_module_forward_pre_hook(self._called),
            nn.modules.module.register_module_forward_hook(self._returned),
        ]
        for name, module in self.model.named_modules():
            if shrinker_for(module) is None or name == "":
                continue
            handles.append(module.register_forward_pre_hook(self._enter(name)))
            handles.append(module.register_forward_hook(self._leave(name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _called(self, module: nn.Module, args: Any) -> None:
        if id(module) in self.names:
            self.calls.append(module)

    def _returned(self, module: nn.Module, args: Any, out: Any) -> None:
        if self.calls and self.calls[-1] is module:
            self.calls.pop()

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.depth == 0:
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if x is not None:
                    self.depth += 1  # the label work below is not the model's: not traced
                    try:
                        self._count_use(x, name)
                        self._layer_input(name, module, x)
                    finally:
                        self.depth -= 1
            self.depth += 1

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.depth -= 1
            if self.depth == 0:
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                self.depth += 1  # the label work below is not the model's: not traced
                try:
                    self._layer_output(name, module, x, out)
                finally:
                    self.depth -= 1

        return hook

    def _layer_input(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        shrinker = shrinker_for(module)
        assert shrinker is not None
        role = shrinker.role_of(module)
        width = shrinker.in_channels(module)
        lab = self.labels_of(x)
        if lab is not None and role is Role.BLOCKING:  # its channels stay whatever its width
            self._opaque(lab, f"{name}: {shrinker.why_blocking(module)}")
        if lab is None or width is None or x.dim() == 0:
            return
        dim = _channel_dim(x, shrinker.input_channel_dim, width)
        if dim is None:
            self._opaque(lab, f"{name} reads its channels from a dimension compactor could not find")
            return
        per_index = _per_index(lab, dim)
        first = self.first_read.setdefault(name, per_index)
        for i, labels in enumerate(per_index):  # a layer treats every copy of its input channel alike,
            _unite(self.trace.uf, labels | (first[i] if i < len(first) else set()))  # in every call
        side = Side.OUT if role is Role.CHANNELWISE else Side.IN
        self.trace.reads.append(_Read(name, type(module).__name__, side, Kind.LAYER, 0, per_index))

    def _layer_output(self, name: str, module: nn.Module, x: torch.Tensor | None, out: Any) -> None:
        shrinker = shrinker_for(module)
        assert shrinker is not None
        role = shrinker.role_of(module)
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        xlab = self.labels_of(x) if x is not None else None
        width = shrinker.out_channels(module)
        for t in tensors:
            self.trace.written_by[id(t)] = name
            self.trace.feeds[name].append(id(t))
            if role is Role.MIXING and width:
                out_dim = shrinker.output_channel_dim
                dim = _channel_dim(t, shrinker.input_channel_dim if out_dim is None else out_dim, width)
                if dim is None:
                    self._set(t, self._blank(t))
                    continue
                fresh = self.written.get(name, [])  # a layer called again writes the same channels
                if len(fresh) != width:
                    fresh = [self.trace.uf.new() for _ in range(width)]
                    self.written[name] = fresh
                    self.trace.owner.update({f: name for f in fresh})
                    self.trace.producers.append((name, fresh))
                    self.trace.reads.append(
                        _Read(name, type(module).__name__, Side.OUT, Kind.LAYER, 0, [{f} for f in fresh])
                    )
                self._set(t, _along(t, dim, fresh))
            elif (
                xlab is not None and t.shape == xlab.shape
            ):  # channelwise, or a blocking layer's same-shape output
                self._set(t, xlab.clone())
            elif xlab is not None and role is Role.CHANNELWISE and t.dim() == xlab.dim() and t.dim() > 1:
                per = _per_index(xlab, 1)
                rep = [min(s) if s else -1 for s in per]
                self._set(t, _along(t, 1, rep))
            else:
                self._set(t, self._blank(t))

    # --- every other op ---------------------------------------------------------------------------

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception as e:  # the model's own op fails: re-raised as it is (the model may handle it),
            self.failed_op = (_op_name(func), e)  # and remembered, to tell it from compactor's own bugs
            raise
        if self.depth > 0:
            return out
        name = _op_name(func)
        if name in _IGNORE:
            return out
        self.trace.ops += 1
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        for a in inputs:
            self._count_use(a, None)
        labelled = {id(a): lab for a in inputs if (lab := self.labels_of(a)) is not None}
        if not labelled:
            return out
        try:
            self._propagate(name, func, args, kwargs, out, labelled)
        except CouplingUnfollowed as e:  # the op fails on the labels: its channels stay, the trace goes on
            cause = e.__cause__ if e.__cause__ is not None else e
            for lab in labelled.values():
                self._opaque(lab, f"{name} (could not follow its channels: {type(cause).__name__})")
            for t in _tensors(out):
                self._set(t, self._blank(t))
        return out

    def _count_use(self, t: torch.Tensor, layer: str | None) -> None:
        hit = self.labels.get(id(t))
        if hit is None or hit[0] is not t:  # only tensors kept alive here: an id is never reused for them
            return
        self.trace.uses[id(t)] += 1
        if layer is not None:
            self.trace.read_by[id(t)].append(layer)

    def _propagate(
        self, name: str, func: Any, args: Any, kwargs: Any, out: Any, labelled: dict[int, Labels]
    ) -> None:
        outs = _tensors(out)
        if name in _MOVE:
            self._move(name, func, args, kwargs, out, labelled)
        elif name in _ELEMENTWISE:
            self._elementwise(name, args, kwargs, outs, labelled)
        elif name in _REDUCE:
            self._reduce(name, args, kwargs, outs, labelled)
        elif name in _SPATIAL:
            self._spatial(name, args, outs, labelled)
        elif name in ("matmul", "bmm", "__matmul__", "__rmatmul__") and len(args) == 2:
            self._matmul(name, args, outs)
        elif name == "scaled_dot_product_attention":
            self._attention(args, kwargs, outs)
        else:
            for lab in labelled.values():
                self._opaque(lab, f"{name} reads them (an op compactor does not follow)")
            for t in outs:
                self._set(t, self._blank(t))

    def _elementwise(
        self, name: str, args: Any, kwargs: Any, outs: list[torch.Tensor], labelled: dict[int, Labels]
    ) -> None:
        data = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in ("to", "type_as"):
            data = data[:1]  # the other tensor gives a dtype and device only
        labs = [self.labels_of(a) for a in data]
        shape = _broadcast([a.shape for a in data])
        full = [lab.expand(shape) if lab is not None else None for lab in labs]
        real = [f for f in full if f is not None]
        merged = real[0].clone()
        for other in real[1:]:
            both = (merged >= 0) & (other >= 0) & (merged != other)
            if bool(both.any()):
                pairs = _unique_rows(torch.stack([merged[both], other[both]], 1))
                for a, b in pairs:
                    self.trace.uf.union(int(a), int(b))
            merged = torch.where(merged >= 0, merged, other)
        self._unsliceable(name, data, full, merged, shape)
        gates = [f for a, f in zip(data, full) if f is not None and id(a) not in self.params]
        if len(gates) > 1 and name in ("mul", "__mul__", "__rmul__", "__imul__", "mul_"):
            self._gate(gates, shape)  # two activations (a squeeze-excite gate), not a LayerScale parameter
        if len(real) > 1:
            word = next((w for key, w in _JOIN_WORDS.items() if key in name), name)
            self.trace.joins.append((word, [{int(v) for v in _unique(r) if v >= 0} for r in real]))
        for t in outs:
            self._set(t, merged.expand(t.shape).clone() if merged.shape != t.shape else merged)

    def _unsliceable(
        self,
        name: str,
        data: list[torch.Tensor],
        full: list[Labels | None],
        merged: Labels,
        shape: torch.Size,
    ) -> None:
        """An operand without channel labels (a buffer, a mask, ``arange``) whose values differ from one
        channel to the next: it holds per-channel values compactor cannot slice, so those channels stay."""
        for a, f in zip(data, full):
            if f is not None and bool((f >= 0).any()):
                continue
            lead = len(shape) - a.dim()
            for d in range(a.dim()):
                if a.shape[d] == 1 or _constant_along(merged, lead + d):
                    continue  # broadcast, or no channels run along it
                if not _constant_along(a, d):
                    self._opaque(
                        merged, f"{name} combines them with per-channel values compactor cannot slice"
                    )
                    return

    def _gate(self, real: list[Labels], shape: torch.Size) -> None:
        """A product of two labelled tensors (squeeze-excite's gate): recorded as a multiply member."""
        for dim in range(len(shape)):
            per = _per_index(real[0].expand(shape), dim)
            if _varies(per):
                self._add_read(f"mul@{self.trace.ops}", "mul", Kind.MULTIPLY, dim, per, ())
                return

    def _reduce(
        self, name: str, args: Any, kwargs: Any, outs: list[torch.Tensor], labelled: dict[int, Labels]
    ) -> None:
        x = args[0]
        lab = labelled.get(id(x))
        if lab is None:
            for other in labelled.values():
                self._opaque(other, f"{name} reads them")
            for t in outs:
                self._set(t, self._blank(t))
            return
        at = 2 if name in _NORMS else 1  # norm(x, p, dim, keepdim): the order comes first
        dims = _arg(args, kwargs, at, "dim", None)
        if dims is None or (name in ("max", "min") and not isinstance(dims, (int, tuple, list))):
            dims = tuple(range(x.dim()))
        dims = tuple(d % x.dim() for d in (dims if isinstance(dims, (tuple, list)) else (dims,)))
        if any(_varies(_per_index(lab, d)) and not _constant_along(lab, d) for d in dims):
            self._opaque(lab, f"{name} reads across them")
            for t in outs:
                self._set(t, self._blank(t))
            return
        if name in _SIZED:
            for v in _unique(lab):
                if v >= 0:
                    self.trace.sized.setdefault(int(v), f"{name} over dimensions {list(dims)}")
        keep = bool(_arg(args, kwargs, at + 1, "keepdim", False)) or name in (
            "softmax",
            "log_softmax",
            "cumsum",
            "cumprod",
        )
        reduced = lab
        for d in sorted(dims, reverse=True):
            reduced = reduced.narrow(d, 0, 1)
            if not keep:
                reduced = reduced.squeeze(d)
        for t in outs:
            if t.shape == reduced.shape:
                self._set(t, reduced.clone())
            elif reduced.dim() == t.dim():
                self._set(t, reduced.expand(t.shape).clone())
            else:
                self._set(t, self._blank(t))

    def _spatial(self, name: str, args: Any, outs: list[torch.Tensor], labelled: dict[int, Labels]) -> None:
        """Pooling and resizing act on each channel alone: the output channel is the input's, where every
        position of an input channel holds that channel's label or none (a border ``F.pad`` filled with a
        constant: a zero channel padded with zeros and max-pooled is still zero)."""
        x = args[0]
        lab = labelled.get(id(x))
        per_channel = _one_per_channel(lab) if lab is not None and x.dim() >= 3 else None
        if per_channel is None:
            for other in labelled.values():
                self._opaque(other, f"{name} reads across them")
            for t in outs:
                self._set(t, self._blank(t))
            return
        for t in outs:
            if t.dim() == x.dim() and t.shape[:2] == x.shape[:2]:
                self._set(
                    t,
                    per_channel.reshape(*per_channel.shape[:2], *([1] * (t.dim() - 2)))
                    .expand(t.shape)
                    .clone(),
                )
            else:
                self._set(t, self._blank(t))

    def _matmul(self, name: str, args: Any, outs: list[torch.Tensor]) -> None:
        """``a @ b`` sums over a's last and b's second-to-last dimension. Channels that run along b's last
        dimension (attention weights times the values) or a's rows pass through one by one, as long as
        the other operand holds no channels; channels summed over are mixed: opaque."""
        a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
        la, lb = self.labels_of(a), self.labels_of(b)
        out = outs[0] if outs else None
        if out is None or a.dim() < 2 or b.dim() < 2:
            for lab in (la, lb):
                if lab is not None:
                    self._opaque(lab, f"{name} reads across them")
            return
        a_free = la is None or not bool((la >= 0).any())
        b_free = lb is None or not bool((lb >= 0).any())
        if a_free and lb is not None and _constant_along(lb, lb.dim() - 2):
            cols = lb.narrow(lb.dim() - 2, 0, 1)  # [..., 1, n]: one label per output column
            self._set(out, cols.expand(*out.shape[:-2], 1, out.shape[-1]).expand(out.shape).clone())
        elif b_free and la is not None and _constant_along(la, la.dim() - 1):
            rows = la.narrow(la.dim() - 1, 0, 1)  # [..., m, 1]: one label per output row
            self._set(out, rows.expand(*out.shape[:-1], 1).expand(out.shape).clone())
        else:
            for lab in (la, lb):
                if lab is not None:
                    self._opaque(lab, f"{name} reads across them")
            self._set(out, self._blank(out))

    def _attention(self, args: Any, kwargs: Any, outs: list[torch.Tensor]) -> None:
        """``softmax(q k^T) v``: q's and k's channels are summed over (opaque); v's pass through one by one,
        as in ``attn @ v``."""
        q, k, v = (_arg(args, kwargs, i, key, None) for i, key in enumerate(("query", "key", "value")))
        for t in (q, k):
            lab = self.labels_of(t)
            if lab is not None:
                self._opaque(lab, "scaled_dot_product_attention reads across them (queries and keys)")
        lv = self.labels_of(v)
        for out in outs:
            if lv is not None and v.dim() >= 2 and _constant_along(lv, lv.dim() - 2):
                cols = lv.narrow(lv.dim() - 2, 0, 1)  # fails where the values have fewer heads (enable_gqa)
                heads = _replay(
                    "scaled_dot_product_attention", cols.expand, *out.shape[:-2], 1, out.shape[-1]
                )
                self._set(out, heads.expand(out.shape).clone())
            else:
                if lv is not None:
                    self._opaque(lv, "scaled_dot_product_attention reads across them")
                self._set(out, self._blank(out))


def _one_per_channel(lab: Labels) -> Labels | None:
    """``[N, C, 1]``: each (sample, channel)'s one label over the positions (-1 where it holds none), or None
    where a channel's positions hold two labels (the op would mix channels)."""
    flat = lab.reshape(*lab.shape[:2], -1)
    blank = flat < 0
    high = flat.masked_fill(blank, -1.0).amax(-1, keepdim=True)
    low = flat.masked_fill(blank, float("inf")).amin(-1, keepdim=True)
    if not bool(((low == high) | blank.all(-1, keepdim=True)).all()):
        return None
    return high
