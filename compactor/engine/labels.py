"""Channel coupling derived by compactor itself: every channel gets a label, and labels travel with the data.

Torch-Pruning's index mappings are wrong or missing for the ops that move channels around: ``chunk`` and
``split`` (C2f, CSP, gated MLPs), ``permute``/``transpose`` to channels-last and back, a flatten after a
permute, a channel shuffle (``view -> transpose -> reshape``), a literal slice. Here nothing is mapped by
rule. The forward runs once under a :class:`~torch.overrides.TorchFunctionMode`; beside every tensor it
keeps a *label tensor* of the same shape (float64, exact integers; -1: no channel). A layer that writes
channels gives each output channel a fresh label; an op that only moves data (view, reshape, permute,
cat, chunk, getitem, pad, roll...) is replayed on the label tensors, so the index map of any chain of such
ops is exact by construction. Elementwise ops (``add``, ``mul``, ``where``) unite the labels that meet at
the same element (a residual add couples two layers' channels), and so does a layer reading one input
channel (a Linear after a flatten reads spatial copies of one channel). Labels are unioned with a
union-find, so the analysis always settles, in one pass.

What is not understood is never passed through: an op that reads across a dimension where labels vary (a
mean over channels, a matmul, a softmax over channels, any op not listed here) marks those labels
*opaque*, and their channels are kept with the op's name. Verification stays the judge.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..inputs import ExampleInputs, flatten_outputs
from ..layers import Role, Side, shrinker_for
from ..util import eval_mode_restored
from .groups import ChannelGroup, Join, Kind, Member

Labels = torch.Tensor  # float64, the shape of the tensor it labels; -1 where no channel


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


def _unique_t(t: torch.Tensor) -> torch.Tensor:
    found: torch.Tensor = torch.unique(t)
    return found


def _broadcast(shapes: list[torch.Size]) -> torch.Size:
    size: torch.Size = torch.broadcast_shapes(*shapes)  # type: ignore[no-untyped-call]
    return size


def _unique(t: torch.Tensor) -> list[float]:
    values: list[float] = _unique_t(t).tolist()
    return values


def _unique_rows(t: torch.Tensor) -> list[list[float]]:
    rows: list[list[float]] = torch.unique(t, dim=0).tolist()
    return rows


# Ops that only move or copy elements: replayed on the label tensors.
_MOVE = _words(
    "view reshape permute transpose t flatten unflatten movedim moveaxis swapaxes swapdims contiguous "
    "chunk split tensor_split unbind cat concat concatenate stack hstack vstack __getitem__ narrow select "
    "expand expand_as repeat tile roll flip squeeze unsqueeze pixel_shuffle pixel_unshuffle channel_shuffle "
    "native_channel_shuffle pad clone detach view_as reshape_as index_select __setitem__ unfold_copy "
    "diagonal"
)
# Ops whose output element depends on the same element of each input (after broadcasting).
_ELEMENTWISE = _words(
    "add sub mul div true_divide floor_divide rsub __add__ __radd__ __iadd__ __sub__ __rsub__ __isub__ "
    "__mul__ __rmul__ __imul__ __truediv__ __rtruediv__ __itruediv__ __floordiv__ __pow__ __rpow__ pow "
    "add_ sub_ mul_ div_ where maximum minimum fmax fmin addcmul addcdiv lerp masked_fill masked_fill_ "
    "relu relu_ relu6 hardtanh hardtanh_ gelu silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ "
    "hardsigmoid hardsigmoid_ leaky_relu leaky_relu_ elu elu_ selu celu mish softplus softsign logsigmoid "
    "exp exp_ log log1p expm1 abs abs_ neg __neg__ __pos__ sqrt rsqrt square reciprocal sign erf erfc sin cos "
    "clamp clamp_ clip clip_ clamp_min clamp_max dropout dropout_ dropout1d dropout2d dropout3d "
    "alpha_dropout feature_alpha_dropout threshold threshold_ float half double bfloat16 to type type_as "
    "__and__ __or__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ eq ne lt le gt ge logical_not isnan isinf "
    "nan_to_num floor ceil round trunc frac __abs__ sinh cosh atan tan asin acos"
)
_NORMS = frozenset({"norm", "linalg_vector_norm", "vector_norm"})
# Reductions whose value on a constant depends on how many elements they reduce (a sum is ``k * n``, a
# softmax ``1 / n``): a constant channel through them is a constant at the example's size only.
_SIZED = _words(
    "sum nansum prod norm linalg_vector_norm vector_norm logsumexp softmax log_softmax cumsum cumprod"
)
_JOIN_WORDS = {"add": "add", "sub": "subtract", "mul": "multiply", "div": "divide"}
# Ops that reduce or normalise along the dimensions they are given (``dim``): fine across positions that
# hold one label, opaque across channels.
_REDUCE = _words(
    "mean sum amax amin max min std var norm logsumexp prod all any softmax log_softmax cumsum cumprod "
    "std_mean var_mean argmax argmin linalg_vector_norm vector_norm"
)
# Pooling and resizing: channels stay on dim 1, every other dimension but the batch may change.
_SPATIAL = _words(
    "avg_pool1d avg_pool2d avg_pool3d max_pool1d max_pool2d max_pool3d adaptive_avg_pool1d "
    "adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d "
    "lp_pool1d lp_pool2d interpolate upsample upsample_nearest upsample_bilinear max_pool2d_with_indices "
    "fractional_max_pool2d"
)
# Bookkeeping calls that compute nothing on the data.
_IGNORE = _words(
    "size dim numel __len__ shape __get__ __set__ is_floating_point is_contiguous requires_grad_ "
    "data_ptr element_size stride storage_offset __format__ __repr__ __bool__ __index__ __int__ __float__ "
    "item tolist numpy new_zeros new_ones new_empty new_full new_tensor zeros_like ones_like empty_like "
    "full_like rand_like randn_like dtype device get_device is_complex untyped_storage _is_view"
)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


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


def label_groups(model: nn.Module, inputs: ExampleInputs, *, train: bool = False) -> list[ChannelGroup]:
    """Trace ``model`` on ``inputs`` with channel labels and return one group per mixing layer's channels
    not already in an earlier group (the same shape of answer as :func:`~.graph.build_groups`)."""
    tracer = _LabelMode(model)
    with torch.no_grad(), eval_mode_restored(model), tracer.hooks():
        model.train(train)
        with tracer:
            out = model(*inputs.args, **inputs.kwargs)
    for _, t in flatten_outputs(out):
        lab = tracer.labels_of(t)
        if lab is not None:
            tracer.trace.outputs.update(int(v) for v in _unique(lab) if v >= 0)
    return _groups(model, tracer.trace)


class _LabelMode(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.trace = _Trace()
        self.labels: dict[int, tuple[torch.Tensor, Labels]] = {}  # id(tensor) -> (tensor, labels)
        self.params = {id(p): (n, p) for n, p in model.named_parameters()}
        self.depth = 0  # > 0 inside a layer compactor knows: its own ops are not traced
        self.first_read: dict[str, list[set[int]]] = {}  # layer -> labels per input index, first call
        self.written: dict[str, list[int]] = {}  # mixing layer -> the labels of its output channels

    # --- labels kept beside tensors ---------------------------------------------------------------
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

    # --- layers compactor knows: hooks ------------------------------------------------------------
    @contextmanager
    def hooks(self) -> Iterator[None]:
        handles = []
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

    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self.depth == 0:
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                if x is not None:
                    self._count_use(x, name)
                    self._layer_input(name, module, x)
            self.depth += 1

        return hook

    def _leave(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            self.depth -= 1
            if self.depth == 0:
                x = next((a for a in args if isinstance(a, torch.Tensor)), None)
                self._layer_output(name, module, x, out)

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
        out = func(*args, **kwargs)
        if self.depth > 0:
            return out
        name = getattr(func, "__name__", str(func))
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
        except Exception as e:  # an op replay that fails: its channels stay, the trace goes on
            for lab in labelled.values():
                self._opaque(lab, f"{name} (could not follow its channels: {type(e).__name__})")
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

    def _substitute(self, value: Any) -> Any:
        """The op's arguments with every tensor replaced by its labels (-1 for unlabelled data)."""

        def swap(a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            lab = self.labels_of(a)
            return lab if lab is not None else self._blank(a)

        return tree_map(swap, value)

    def _move(
        self, name: str, func: Any, args: Any, kwargs: Any, out: Any, labelled: dict[int, Labels]
    ) -> None:
        if name == "__setitem__":
            target = args[0]
            before = self.labels_of(target)
            before = before if before is not None else self._blank(target)
            lab = before.clone()
            value = args[2]
            vlab = self.labels_of(value) if isinstance(value, torch.Tensor) else None
            lab[args[1]] = vlab if vlab is not None else -1.0  # the index stays as it is
            self._set(target, lab)
            mask = self.labels_of(args[1])  # x[x < 0] = 0: a mask of x's own channels, element by element
            elementwise = mask is not None and args[1].dtype == torch.bool and torch.equal(mask, before)
            if target.dim() > 0 and not elementwise:  # the positions written are fixed in the code
                self._note_index(f"{name}@{self.trace.ops}", target, before, args[1], lab)
            return
        if name in ("__getitem__", "index_select"):  # the data becomes labels, the index stays as it is
            sargs, skwargs = (self._substitute(args[0]), *args[1:]), kwargs
        else:
            sargs, skwargs = self._substitute(args), self._substitute(kwargs)
        if name == "pad":
            skwargs = dict(skwargs)
            if len(sargs) > 3 or "value" in skwargs or (skwargs.get("mode", "constant") == "constant"):
                sargs = tuple(sargs[:3])
                skwargs.pop("value", None)
                skwargs["value"] = -1.0
        replayed = func(*sargs, **skwargs)
        for t, lab in zip(_tensors(out), _tensors(replayed)):
            self._set(t, lab if lab.dtype == torch.float64 else lab.to(torch.float64))
        if name in ("view", "reshape", "unflatten", "view_as", "reshape_as"):
            x, y = self.labels_of(args[0]), self.labels_of(_tensors(out)[0]) if _tensors(out) else None
            if x is not None and y is not None:
                _unite_split(self.trace.uf, x, y)
        if name in ("channel_shuffle", "native_channel_shuffle"):
            self._shuffle(args, kwargs)
        if name == "roll":
            self._roll(args, kwargs)
        if name in ("cat", "concat", "concatenate", "stack", "hstack", "vstack"):
            for t in _tensors(out):
                self.trace.catted.update(
                    int(v) for v in _unique(self.labels.get(id(t), (t, self._blank(t)))[1]) if v >= 0
                )
        self._note_cut(name, func, args, kwargs, labelled)

    def _shuffle(self, args: Any, kwargs: Any) -> None:
        """``channel_shuffle(x, g)`` is ``view(b, g, c // g, ...) -> transpose -> reshape``: channel
        ``a * (c // g) + j`` goes to ``j * g + a``, which stays right only if every block loses the same
        ``j`` (see :func:`_unite_split`)."""
        x, groups = args[0], int(_arg(args, kwargs, 1, "groups", 1))
        lab = self.labels_of(x)
        if lab is not None and x.dim() >= 2 and groups > 1 and x.shape[1] % groups == 0:
            split = lab.reshape(x.shape[0], groups, x.shape[1] // groups, *x.shape[2:])
            _unite_split(self.trace.uf, lab, split)

    def _roll(self, args: Any, kwargs: Any) -> None:
        """``roll`` along channels wraps the last ``s`` (or, rolled back, the first ``s``) round: those
        move when a channel goes, so they stay (a slice member); the others keep their places."""
        x = args[0]
        lab = self.labels_of(x)
        if lab is None or x.dim() == 0:
            return
        shifts, dims = _arg(args, kwargs, 1, "shifts", 0), _arg(args, kwargs, 2, "dims", None)
        shifts = list(shifts) if isinstance(shifts, (tuple, list)) else [shifts]
        dims = list(dims) if isinstance(dims, (tuple, list)) else ([] if dims is None else [dims])
        if not dims:  # rolled flat: every position moves with any channel that goes
            if any(_varies(_per_index(lab, d)) for d in range(x.dim())):
                self._opaque(lab, "roll over the flattened tensor moves them")
            return
        for shift, dim in zip(shifts, dims):
            dim, n = int(dim) % x.dim(), x.shape[int(dim) % x.dim()]
            per, k = _per_index(lab, dim), int(shift)
            if not k or not _varies(per):
                continue
            if abs(k) >= n:  # wraps more than once: the wrap moves with the size
                wrapped = per
            else:
                wrapped = [p if (i >= n - k if k > 0 else i < -k) else set() for i, p in enumerate(per)]
            self._add_read(f"roll@{self.trace.ops}", "roll", Kind.SLICE, dim, wrapped, ())

    def _note_cut(self, name: str, func: Any, args: Any, kwargs: Any, labelled: dict[int, Labels]) -> None:
        """A chunk, split, slice or index along a dimension where channels vary: a member with its pieces."""
        if name not in (
            "chunk",
            "split",
            "tensor_split",
            "unbind",
            "__getitem__",
            "narrow",
            "select",
            "index_select",
        ):
            return
        x = args[0]
        lab = labelled.get(id(x))
        if lab is None or x.dim() == 0:
            return
        if name == "__getitem__":
            self._note_index(f"{name}@{self.trace.ops}", x, lab, args[1], lab)
            return
        dim = _arg(args, kwargs, 2 if name != "unbind" else 1, "dim", 0)
        if name == "index_select":
            dim = _arg(args, kwargs, 1, "dim", 0)
        dim = int(dim) % x.dim()
        per = _per_index(lab, dim)
        if not _varies(per):
            return  # the cut runs along a dimension that holds no channels
        n = x.shape[dim]
        if name == "chunk":
            chunks = int(_arg(args, kwargs, 1, "chunks", 1))
            size = -(-n // chunks)
            pieces = tuple(min(size, n - s) for s in range(0, n, size))
            self._add_read(f"chunk@{self.trace.ops}", "chunk", Kind.CHUNK, dim, per, pieces)
            return
        what = {"unbind": Kind.UNBIND, "split": Kind.SPLIT, "tensor_split": Kind.SPLIT}.get(name, Kind.SLICE)
        self._add_read(f"{name}@{self.trace.ops}", name, what, dim, per, ())

    def _note_index(self, name: str, x: torch.Tensor, lab: Labels, index: Any, written: Labels) -> None:
        """``x[index]`` read or written: per dimension it cuts where channels vary, a slice member holding
        every channel whose position the index fixes (``written``: the labels after a ``__setitem__``)."""
        cuts = _index_cuts(x, index)
        if cuts is None:
            self._opaque(lab, f"{name.split('@')[0]} indexes them in a way compactor does not follow")
            self._opaque(written, f"{name.split('@')[0]} indexes them in a way compactor does not follow")
            return
        for cut in cuts:
            per = [a | b for a, b in zip(_per_index(lab, cut.dim), _per_index(written, cut.dim))]
            if _varies(per):
                op = name.split("@")[0]
                self._add_read(name, op, Kind.SLICE, cut.dim, _held_positions(per, cut), ())

    def _add_read(
        self, name: str, op: str, kind: Kind, dim: int, per: list[set[int]], pieces: tuple[int, ...]
    ) -> None:
        self.trace.reads.append(_Read(name, op, Side.IN, kind, dim, per, pieces))

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
        x = args[0]
        lab = labelled.get(id(x))
        if lab is None or x.dim() < 3 or any(not _constant_along(lab, d) for d in range(2, x.dim())):
            for other in labelled.values():
                self._opaque(other, f"{name} reads across them")
            for t in outs:
                self._set(t, self._blank(t))
            return
        per_channel = lab.reshape(*lab.shape[:2], -1)[..., :1]
        for t in outs:
            if t.dim() == x.dim() and t.shape[:2] == x.shape[:2]:
                self._set(
                    t, per_channel.reshape(*lab.shape[:2], *([1] * (t.dim() - 2))).expand(t.shape).clone()
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
                cols = lv.narrow(lv.dim() - 2, 0, 1)
                self._set(out, cols.expand(*out.shape[:-2], 1, out.shape[-1]).expand(out.shape).clone())
            else:
                if lv is not None:
                    self._opaque(lv, "scaled_dot_product_attention reads across them")
                self._set(out, self._blank(out))

    def _opaque(self, lab: Labels, why: str) -> None:
        for v in _unique(lab):
            if v >= 0:
                self.trace.opaque.setdefault(int(v), why)


# --- helpers on label tensors -------------------------------------------------------------------------


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _arg(args: Any, kwargs: Any, pos: int, key: str, default: Any) -> Any:
    if key in kwargs:
        return kwargs[key]
    return args[pos] if len(args) > pos else default


def _channel_dim(t: torch.Tensor, preferred: int, width: int) -> int | None:
    """Where ``t`` holds a layer's ``width`` channels: the layer's own dimension, else the last one."""
    if t.dim() == 0:
        return None
    for d in (preferred, 1, -1):
        if -t.dim() <= d < t.dim() and t.shape[d] == width:
            return d % t.dim()
    return None


def _along(t: torch.Tensor, dim: int, values: list[int]) -> Labels:
    shape = [1] * t.dim()
    shape[dim] = len(values)
    return torch.tensor(values, dtype=torch.float64).reshape(shape).expand(t.shape).clone()


def _per_index(lab: Labels, dim: int) -> list[set[int]]:
    """Per index along ``dim``: the labels found there (every position, every batch element)."""
    moved = lab.movedim(dim, 0).reshape(lab.shape[dim], -1)
    uniq = [_unique_t(row) for row in moved]
    return [{int(v) for v in u.tolist() if v >= 0} for u in uniq]


def _varies(per: list[set[int]]) -> bool:
    """Channels run along this dimension: some index holds a label another does not."""
    seen = [frozenset(s) for s in per]
    return any(seen) and len(set(seen)) > 1


def _constant_along(lab: Labels, dim: int) -> bool:
    """Every line along ``dim`` holds one label: reducing over it mixes no two channels."""
    first = lab.narrow(dim, 0, 1)
    return bool((lab == first).all())


def _unite_split(uf: _UnionFind, x: Labels, y: Labels) -> None:
    """A reshape that splits a dimension holding channels into several (``view(b, g, c // g, h, w)``, a
    channel shuffle's first step) maps channel ``a * (c // g) + j`` to ``(a, j)``, and that map moves when
    channels go: it stays right only if every block ``a`` loses the same ``j``. So the channels at one
    ``j`` are united across the blocks (the innermost dimension of the split holds ``j``)."""
    for start, stop in _split_runs(tuple(x.shape), tuple(y.shape)):
        inner = max(d for d in range(start, stop) if y.shape[d] > 1)
        outer = [d for d in range(start, stop) if d != inner and y.shape[d] > 1]
        if not outer or not any(_varies(_per_index(y, d)) for d in range(start, stop)):
            continue
        moved = y.movedim(outer, list(range(y.dim() - len(outer), y.dim())))
        flat = moved.reshape(-1, math.prod(y.shape[d] for d in outer))
        for k in range(1, flat.shape[1]):
            both = (flat[:, 0] >= 0) & (flat[:, k] >= 0) & (flat[:, 0] != flat[:, k])
            if bool(both.any()):
                for a, b in _unique_rows(torch.stack([flat[both, 0], flat[both, k]], 1)):
                    uf.union(int(a), int(b))


def _split_runs(before: tuple[int, ...], after: tuple[int, ...]) -> list[tuple[int, int]]:
    """The runs ``[start, stop)`` of ``after``'s dimensions that one dimension of ``before`` became (a
    reshape's dimension groups with equal products; size-1 dimensions belong to no run)."""
    runs, i, j = [], 0, 0
    while i < len(before) and j < len(after):
        if before[i] == after[j]:
            i, j = i + 1, j + 1
            continue
        if before[i] == 1:
            i += 1
            continue
        if after[j] == 1:
            j += 1
            continue
        start, prod_b, prod_a, i0 = j, before[i], after[j], i
        j += 1
        i += 1
        while prod_a != prod_b and (j < len(after) or i < len(before)):
            if prod_a < prod_b and j < len(after):
                prod_a *= after[j]
                j += 1
            elif i < len(before):
                prod_b *= before[i]
                i += 1
            else:
                break
        if i - i0 == 1 and j - start > 1:  # one dimension split into several
            runs.append((start, j))
    return runs


def _unite(uf: _UnionFind, labels: set[int]) -> None:
    items = sorted(labels)
    for other in items[1:]:
        uf.union(items[0], other)


@dataclass(frozen=True)
class _Cut:
    """What an index does to one dimension: keeps ``kept`` (None: an index tensor or list, whose positions
    are fixed in the code). ``safe``: the side where channels may go without moving the kept ones
    (``"after"``: past the last kept index, for bounds counted from the start; ``"before"``: before the
    first, for bounds counted from the end; ``""``: neither)."""

    dim: int
    kept: tuple[int, ...] | None
    safe: str = ""


def _index_cuts(x: torch.Tensor, index: Any) -> list[_Cut] | None:
    """The dimensions ``x[index]`` cuts (basic slices, integers, index tensors and lists); None for an
    index this cannot read."""
    items = index if isinstance(index, tuple) else (index,)

    def width(item: Any) -> int:
        if item is None or item is Ellipsis:
            return 0
        if isinstance(item, torch.Tensor) and item.dtype == torch.bool:
            return max(item.dim(), 1)
        return 1

    if sum(item is Ellipsis for item in items) > 1 or any(isinstance(item, bool) for item in items):
        return None
    consumed = sum(width(item) for item in items)
    if consumed > x.dim():
        return None
    cuts: list[_Cut] = []
    dim = 0
    for item in items:
        if item is Ellipsis:
            dim += x.dim() - consumed
            continue
        if item is None:
            continue
        n = x.shape[dim]
        if isinstance(item, slice):
            if not all(v is None or isinstance(v, int) for v in (item.start, item.stop, item.step)):
                return None
            idx = tuple(range(n)[item])
            if len(idx) != n:
                cuts.append(_Cut(dim, idx, _safe_side(item)))
        elif isinstance(item, int):
            cuts.append(_Cut(dim, (item % n,), "after" if item >= 0 else "before"))
        elif isinstance(item, (torch.Tensor, list, range)):
            cuts.extend(_Cut(d, None) for d in range(dim, dim + width(item)))
        else:
            return None
        dim += width(item)
    return cuts


def _safe_side(item: slice) -> str:
    """Which channels a literal slice leaves in place when they go: past its end if both bounds count from
    the start, before its start if both count from the end (and it takes every channel between)."""
    start, stop, step = item.start, item.stop, item.step or 1
    if step > 0 and (start is None or start >= 0) and (stop is None or stop >= 0):
        return "after"
    if step == 1 and start is not None and start < 0 and (stop is None or stop < 0):
        return "before"
    return ""


def _held_positions(per: list[set[int]], cut: _Cut) -> list[set[int]]:
    """The labels along a cut dimension whose channels cannot go: every one, but those on the safe side of
    what the cut keeps (channels there go like unread ones)."""
    if cut.kept is None or not cut.kept:
        return per
    first, last = min(cut.kept), max(cut.kept)
    return [
        set() if (cut.safe == "after" and i > last) or (cut.safe == "before" and i < first) else labels
        for i, labels in enumerate(per)
    ]


# --- from labels to groups ----------------------------------------------------------------------------


def _groups(model: nn.Module, trace: _Trace) -> list[ChannelGroup]:
    uf = trace.uf
    members_by_class: dict[int, list[tuple[int, int]]] = defaultdict(list)  # class -> (read number, index)
    reads = list(trace.reads)
    for name, lab in trace.params.items():
        read = _param_read(name, lab, uf)
        if read is None:
            trace.opaque.update(
                {
                    int(v): f"{name} holds them in a layout compactor cannot slice"
                    for v in lab.flatten().tolist()
                }
            )
        else:
            reads.append(read)
    for n, read in enumerate(reads):
        for i, labels in enumerate(read.labels):
            for c in {uf.find(v) for v in labels}:
                members_by_class[c].append((n, i))
    opaque = {uf.find(v): why for v, why in trace.opaque.items()}
    sized = {uf.find(v): why for v, why in trace.sized.items()}
    outputs = {uf.find(v) for v in trace.outputs}
    norms = _norm_after(model, trace)
    joins = [
        (op, [{uf.find(v) for v in operand} for operand in operands], operands)
        for op, operands in trace.joins
    ]
    covered: set[int] = set()
    groups: list[ChannelGroup] = []
    for name, fresh in trace.producers:
        classes = [uf.find(v) for v in fresh]
        if all(c in covered for c in classes) or any(g.root == name for g in groups):
            continue
        roots: list[int | None] = []
        for c in classes:  # a class met twice (a gated MLP's two halves) is the first one's root channel
            roots.append(None if c in covered else c)
            covered.add(c)
        group = _group(name, roots, reads, members_by_class, opaque, outputs, norms, sized)
        groups.append(replace(group, joins=_joins_of(roots, joins, trace)))
    return groups


def _group(
    root: str,
    roots: list[int | None],
    reads: list[_Read],
    members_by_class: dict[int, list[tuple[int, int]]],
    opaque: dict[int, str],
    outputs: set[int],
    norms: dict[str, str],
    sized: dict[int, str],
) -> ChannelGroup:
    idxs: dict[int, list[list[int]]] = {}
    for r, c in enumerate(roots):
        if c is None:
            continue
        for n, i in members_by_class.get(c, []):
            idxs.setdefault(n, [[] for _ in roots])[r].append(i)
    members = []
    for n, per_root in sorted(idxs.items()):
        read = reads[n]
        members.append(
            Member(
                read.name,
                read.op,
                read.side,
                read.kind,
                read.dim,
                tuple(tuple(sorted(set(p))) for p in per_root),
                read.pieces,
            )
        )
    why = {r: opaque[c] for r, c in enumerate(roots) if c is not None and c in opaque}
    reaches = any(c in outputs for c in roots if c is not None)
    at_output = tuple(r for r, c in enumerate(roots) if c is not None and c in outputs)
    layers = {m.name for m in members if m.kind is Kind.LAYER}
    return ChannelGroup(
        root,
        len(roots),
        tuple(_merge_sides(members)),
        reaches,
        (),
        norm_after=tuple((a, b) for a, b in norms.items() if a in layers),
        exact=True,
        opaque=tuple(sorted(why.items())),
        at_output=at_output,
        sized=tuple((r, sized[c]) for r, c in enumerate(roots) if c is not None and c in sized),
    )


def _joins_of(
    roots: list[int | None], joins: list[tuple[str, list[set[int]], list[set[int]]]], trace: _Trace
) -> tuple[Join, ...]:
    """The elementwise ops where this group's channels from two or more operands meet: per operand, the
    group's writing layers whose labels reach it, and which of them came through a concatenation."""
    mine = {c for c in roots if c is not None}
    found = []
    for op, classes, labels in joins:
        hit = [bool(c & mine) for c in classes]
        if sum(hit) < 2:
            continue
        operands = []
        through = set()
        for labs in labels:
            writers = {trace.owner[v] for v in labs if v in trace.owner and trace.uf.find(v) in mine}
            through |= {
                trace.owner[v]
                for v in labs
                if v in trace.owner and v in trace.catted and trace.uf.find(v) in mine
            }
            operands.append(tuple(sorted(writers)))
        join = Join(op, tuple(operands), tuple(sorted(through)))
        if join not in found:
            found.append(join)
    return tuple(sorted(found, key=lambda j: (sum(map(len, j.operands)), j.operands)))


def _merge_sides(members: list[Member]) -> list[Member]:
    """One member per (name, side): a layer read twice (``cat([x, x])``) holds both indices per channel."""
    merged: dict[tuple[str, Side], Member] = {}
    for m in members:
        key = (m.name, m.side)
        if key in merged:
            old = merged[key]
            idxs = tuple(tuple(sorted(set(a) | set(b))) for a, b in zip(old.idxs, m.idxs))
            merged[key] = Member(old.name, old.op, old.side, old.kind, old.pruning_dim, idxs, old.pieces)
        else:
            merged[key] = m
    return list(merged.values())


def _param_read(name: str, lab: Labels, uf: _UnionFind) -> _Read | None:
    """A bare parameter's channels: the one dimension along which its elements' classes change and
    across which they do not (a LayerScale ``gamma``, a class token's features). None if there is none
    (and its elements are coupled to something); a parameter coupled to nothing is not a member."""
    classes = lab.clone()
    flat = classes.view(-1)
    for i, v in enumerate(lab.flatten().tolist()):
        flat[i] = uf.find(int(v))
    for d in range(lab.dim()):
        if lab.shape[d] > 1 and _constant_along_others(classes, d):
            return _Read(
                name, "Parameter", Side.OUT, Kind.LAYER, d, [{int(v)} for v in _first_line(classes, d)]
            )
    if lab.numel() == 1:
        return _Read(name, "Parameter", Side.OUT, Kind.LAYER, 0, [{int(flat[0])}])
    return None


def _constant_along_others(classes: Labels, d: int) -> bool:
    moved = classes.movedim(d, 0).reshape(classes.shape[d], -1)
    return bool((moved == moved[:, :1]).all())


def _first_line(classes: Labels, d: int) -> list[float]:
    return classes.movedim(d, 0).reshape(classes.shape[d], -1)[:, 0].tolist()


def _norm_after(model: nn.Module, trace: _Trace) -> dict[str, str]:
    """Mixing layers whose output goes to exactly one place, a layer of the same width that can absorb a
    constant shift of its input (a BatchNorm: see ``Shrinker.absorb_shift``)."""
    modules = dict(model.named_modules())
    found = {}
    for name, ids in trace.feeds.items():
        if len(ids) != 1 or trace.uses.get(ids[0], 0) != 1 or len(trace.read_by.get(ids[0], [])) != 1:
            continue
        after = trace.read_by[ids[0]][0]
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
