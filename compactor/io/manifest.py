"""The JSON a compactor ``.safetensors`` file carries, parsed into typed records before anything is built.

Two documents live in the file's metadata: the **manifest** (``compactor.manifest``: every registered layer's
channel counts, bias shape and shape attributes, and every bare tensor's shape) and, for sparse storage, the
**sparse index** (``compactor.sparse``: which tensors are stored as values + bitmask, which keep the signs of
their zeros, which are tied to another). A hostile or damaged file can put anything there: another JSON
shape, a negative or huge count, a tensor of 2**46 elements. Everything is checked here, and every size is
bounded by the bytes the file really holds (:func:`check_sparse_parts`), so that reading such a file is one
:class:`~compactor.errors.InputFileError` line and never a large allocation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import InputFileError

Shape = tuple[int, ...]
MAX_DIMS = 16
# Module attributes the forwards read as head counts, recorded where present and set again on loading (the only
# attributes a manifest may set, never above the dense model's): grouped-query attention's query heads per
# key/value head; the head counts and head widths that removing attention heads changes (OPT's forward
# views its projections with ``self.num_heads``: left dense, a smaller projection folds into the sequence)
HEAD_COUNTS = (
    "num_key_value_groups",
    "num_heads",
    "num_attention_heads",
    "all_head_size",
    "n_heads",
    "split_size",
    "num_kv_heads",
    "inner_dim",
    "intermediate_dim",
    "num_key_value_heads",
    "config.num_attention_heads",  # Phi-3's attention reads its config's: recorded where a layer has its own
)


@dataclass(frozen=True)
class LayerEntry:
    type: str
    out: int | None
    in_: int | None
    bias: Shape | None
    attrs: dict[str, int]


@dataclass(frozen=True)
class Manifest:
    layers: dict[str, LayerEntry]
    tensors: dict[str, Shape]
    modules: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> head counts (HEAD_COUNTS)


@dataclass(frozen=True)
class SparseIndex:
    sparse: dict[str, Shape]  # name -> dense shape
    zero_signs: frozenset[str]
    tied: dict[str, str]  # name -> the stored name it shares


def _fail(where: str, what: str) -> InputFileError:
    return InputFileError(
        f"{where}: {what}; the file is damaged or was not written by compactor: write it again"
    )


def _object(value: Any, where: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise _fail(where, f"{what} is not a JSON object")
    return value


def _count(value: Any, where: str, what: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(where, f"{what} is {value!r}, not a count")
    return value


def _shape(value: Any, where: str, what: str) -> Shape:
    if not isinstance(value, list) or len(value) > MAX_DIMS:
        raise _fail(where, f"{what} is not a shape (a list of at most {MAX_DIMS} counts)")
    return tuple(_count(v, where, what) or 0 for v in value)


def parse_manifest(spec: dict[str, Any], where: str) -> Manifest:
    """The typed manifest, or one line saying which entry is malformed."""
    layers = {}
    for name, raw in _object(spec.get("layers", {}), where, "the manifest's layers").items():
        entry = _object(raw, where, f"layer {name!r}")
        missing = {"type", "out", "in", "bias", "attrs"} - set(entry)
        if missing:
            raise _fail(where, f"layer {name!r} lacks {sorted(missing)}")
        if not isinstance(entry["type"], str):
            raise _fail(where, f"layer {name!r} has type {entry['type']!r}, not a class name")
        attrs = {
            k: _count(v, where, f"layer {name!r} attribute {k}") or 0
            for k, v in _object(entry["attrs"], where, f"layer {name!r} attrs").items()
        }
        layers[name] = LayerEntry(
            type=entry["type"],
            out=_count(entry["out"], where, f"layer {name!r} out", optional=True),
            in_=_count(entry["in"], where, f"layer {name!r} in", optional=True),
            bias=None if entry["bias"] is None else _shape(entry["bias"], where, f"layer {name!r} bias"),
            attrs=attrs,
        )
    tensors = {
        name: _shape(shape, where, f"tensor {name!r}")
        for name, shape in _object(spec.get("tensors", {}), where, "the manifest's tensors").items()
    }
    modules = {
        name: {
            k: _count(v, where, f"module {name!r} attribute {k}") or 0
            for k, v in _object(raw, where, f"module {name!r}").items()
        }
        for name, raw in _object(spec.get("modules", {}), where, "the manifest's modules").items()
    }
    for name, attrs in modules.items():
        unknown = sorted(set(attrs) - set(HEAD_COUNTS))
        if unknown:
            raise _fail(
                where, f"module {name!r} sets {unknown[0]!r}, which is not a head count compactor records"
            )
    return Manifest(layers, tensors, modules)


def parse_sparse_index(raw: Any, where: str) -> SparseIndex:
    info = _object(raw, where, "the sparse index")
    sparse = {
        name: _shape(shape, where, f"sparse tensor {name!r}")
        for name, shape in _object(info.get("sparse", {}), where, "the sparse index's tensors").items()
    }
    signs = info.get("zero_signs", [])
    if not isinstance(signs, list) or not all(isinstance(s, str) and s in sparse for s in signs):
        raise _fail(where, "the sparse index's zero_signs is not a list of its sparse tensors")
    tied = _object(info.get("tied", {}), where, "the sparse index's tied tensors")
    if not all(isinstance(v, str) for v in tied.values()):
        raise _fail(where, "the sparse index's tied tensors do not each name a tensor")
    return SparseIndex(sparse, frozenset(signs), dict(tied))


def check_sparse_parts(
    index: SparseIndex, tensors: dict[str, torch.Tensor], suffixes: tuple[str, str, str], where: str
) -> None:
    """Every size the index declares, against the tensors the file holds (``suffixes``: values, mask and
    zero-sign suffixes): a mask of exactly ``ceil(numel / 8)`` bytes whose set bits count the values, zero
    signs for exactly the zeros, ties to a tensor the file holds. Nothing is allocated before this passes."""
    values_suffix, mask_suffix, signs_suffix = suffixes
    for name, shape in index.sparse.items():
        values, mask = tensors.get(name + values_suffix), tensors.get(name + mask_suffix)
        if values is None or mask is None:
            raise _fail(where, f"sparse tensor {name!r} has no stored values or mask")
        count = math.prod(shape)
        if mask.dtype != torch.uint8 or mask.dim() != 1 or mask.numel() != math.ceil(count / 8):
            raise _fail(
                where, f"sparse tensor {name!r} of shape {list(shape)} has a mask of {mask.numel()} bytes"
            )
        ones = _set_bits(mask, count)
        if values.dim() != 1 or values.numel() != ones:
            raise _fail(where, f"sparse tensor {name!r} has {values.numel()} values for {ones} mask bits")
        if name in index.zero_signs:
            signs = tensors.get(name + signs_suffix)
            if signs is None or signs.dtype != torch.uint8 or signs.numel() != math.ceil((count - ones) / 8):
                raise _fail(where, f"sparse tensor {name!r} has no zero signs for its {count - ones} zeros")
    stored = set(index.sparse) | {n for n in tensors if not n.endswith(suffixes)}
    for name, source in index.tied.items():
        if source not in stored or name in stored:
            raise _fail(where, f"tied tensor {name!r} names {source!r}, which the file does not hold")


def _set_bits(mask: torch.Tensor, count: int) -> int:
    """Set bits among the first ``count`` of a packed (big-endian) bitmask."""
    bits = torch.stack([(mask >> (7 - i)) & 1 for i in range(8)], dim=1).reshape(-1)[:count]
    return int(bits.sum())
