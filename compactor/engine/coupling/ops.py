"""The label tracer's tables of ops and its helpers on label tensors.

Every op the tracer follows is named in one word set here, by what it does to channels: it moves elements
(replayed on the labels), works element by element (labels meet), reduces along given dimensions, pools
over positions, or computes nothing on the data. An op in none of them is not followed: the channels that
reach it stay.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

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
    """The distinct rows of ``t`` ([n, 2] of labels >= 0): each pair packed into one int64 and sorted, far
    faster than ``unique(dim=0)`` on the millions of positions of a feature map."""
    pairs = t.to(torch.int64)
    base = int(pairs.max().item()) + 1 if pairs.numel() else 1
    packed = _unique_t(pairs[:, 0] * base + pairs[:, 1])
    rows: list[list[float]] = torch.stack([packed // base, packed % base], 1).tolist()
    return rows


# Ops that only move or copy elements: replayed on the label tensors.
_MOVE = _words(
    "view reshape permute transpose t flatten unflatten movedim moveaxis swapaxes swapdims contiguous "
    "chunk split tensor_split unbind cat concat concatenate stack hstack vstack __getitem__ narrow select "
    "expand expand_as repeat tile roll flip squeeze unsqueeze pixel_shuffle pixel_unshuffle channel_shuffle "
    "native_channel_shuffle pad clone detach view_as reshape_as index_select __setitem__ unfold_copy "
    "diagonal Tensor.unfold"
)
# Methods told apart from a function of the same name: ``Tensor.unfold`` is a sliding-window view (HaloNet's
# overlapping key/value blocks), replayed exactly; ``F.unfold`` (im2col) is not followed (its zero padding
# would read as a channel label).
_METHOD_NAMES: tuple[tuple[Any, str], ...] = ((torch.Tensor.unfold, "Tensor.unfold"),)


def _op_name(func: Any) -> str:
    named = next((name for method, name in _METHOD_NAMES if func is method), None)
    return named if named is not None else str(getattr(func, "__name__", func))


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
    if moved.shape[1] == 0:
        return [set() for _ in range(moved.shape[0])]
    first = moved[:, 0]
    constant = (moved == first[:, None]).all(1).tolist()  # the common case: one label per index
    values = first.tolist()
    return [
        ({int(values[i])} if values[i] >= 0 else set())
        if constant[i]
        else {int(v) for v in _unique_t(moved[i]).tolist() if v >= 0}
        for i in range(moved.shape[0])
    ]


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
