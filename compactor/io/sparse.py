"""Sparse storage: a file that shrinks with the number of non-zero weights, for unstructured masks.

Unstructured pruning zeroes single weights, not whole channels, so :func:`compactor.compact` cannot
remove anything; the zeros still cost 4 bytes each in a dense file. Here each tensor is stored as its
non-zero values plus a bitmask of where they go (``numpy.packbits``: one bit per entry), whenever that
is smaller than the dense tensor (float32: below about 97% density, counting the extra header entry).
The file is a safetensors file: no pickle is written or read.

Reloading is bit-exact, NaN and infinities included. One subtlety: a baked mask computes
``weight_orig * mask``, so every pruned negative weight becomes ``-0.0``. The signs of the zeros are kept
in a second bitmask over the zero entries (about 1 bit per pruned weight) when any zero is negative;
``keep_zero_signs=False`` drops it and stores every zero as ``+0.0`` (``torch.equal`` still holds, and
so does every output except the sign of an exactly-zero result).

Layout (safetensors keys and metadata):

* ``<name>::values`` (the non-zeros, flattened, in the tensor's dtype), ``<name>::mask`` (uint8
  packed bits, one per entry) and, where a zero is negative, ``<name>::zero_signs`` (one bit per zero
  entry) for a tensor stored sparse; ``<name>`` for one stored dense;
* metadata ``compactor.storage = "sparse"``, ``compactor.sparse`` (JSON: shape of each sparse tensor,
  which have zero signs, and tied names), and ``compactor.manifest`` (the layer shapes of :mod:`compactor.io.safetensors`, so a
  compacted *and* sparse model also loads into its dense architecture).

Load with ``compactor.load(path, arch=...)`` (or :func:`load_sparse`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, InputFileError, StateDictError, first_line
from ..modules import baked
from .arch import Arch, build_arch
from .atomic import write_atomically
from .manifest import check_sparse_parts, parse_sparse_index
from .safetensors import (
    MANIFEST_KEY,
    fit_to_manifest,
    load_safetensors,
    manifest,
    read_manifest,
    read_metadata,
)

STORAGE_KEY = "compactor.storage"
SPARSE_KEY = "compactor.sparse"
VALUES = "::values"
MASK = "::mask"
ZERO_SIGNS = "::zero_signs"
_ENTRY_BYTES = 96  # the second header entry (name, dtype, shape, offsets) a sparse tensor costs
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class LayerSparsity:
    """Zeros of one weight tensor (two or more dimensions), and how many output rows are entirely zero."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    total: int
    zero_rows: int

    @property
    def sparsity(self) -> float:
        return self.zeros / max(1, self.total)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shape": list(self.shape), "sparsity": round(self.sparsity, 6)}


def sparsity_report(model: nn.Module) -> tuple[LayerSparsity, ...]:
    """Per weight tensor (masks baked): zeros, total, and whole zero output rows (``compact`` removes those)."""
    rows = []
    for name, tensor in baked(model, copy=False).state_dict().items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2 or tensor.is_quantized:
            continue  # quantized modules' packed params hold dtypes and packed weights
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        zero = tensor.detach() == 0
        rows.append(
            LayerSparsity(
                name=name,
                shape=tuple(tensor.shape),
                zeros=int(torch.count_nonzero(zero)),
                total=tensor.numel(),
                zero_rows=int(zero.reshape(tensor.shape[0], -1).all(dim=1).sum()),
            )
        )
    return tuple(rows)


@dataclass(frozen=True)
class SparseStorageReport:
    """What sparse storage bought: the dense safetensors size against the sparse file's size."""

    dense_bytes: int
    sparse_bytes: int
    sparse_tensors: int
    dense_tensors: int
    zero_signs: int  # sparse tensors that also store the signs of their zeros (-0.0 from baked masks)
    layers: tuple[LayerSparsity, ...]

    @property
    def ratio(self) -> float:
        return self.sparse_bytes / max(1, self.dense_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_bytes": self.dense_bytes,
            "sparse_bytes": self.sparse_bytes,
            "ratio": round(self.ratio, 6),
            "sparse_tensors": self.sparse_tensors,
            "dense_tensors": self.dense_tensors,
            "zero_signs": self.zero_signs,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    def summary(self) -> str:
        return (
            f"sparse storage: {self.sparse_bytes:,} bytes instead of {self.dense_bytes:,} dense "
            f"({self.ratio:.1%}); {self.sparse_tensors} tensors stored sparse, {self.dense_tensors} dense"
        )


def save_sparse(
    model: nn.Module, path: str | os.PathLike[str], *, keep_zero_signs: bool = True
) -> SparseStorageReport:
    """Write ``model``'s weights (masks baked) with sparse tensors compressed; checked before it lands.

    The check is bit for bit; with ``keep_zero_signs=False`` it treats ``-0.0`` as ``+0.0``.
    """
    from safetensors.torch import save as to_bytes
    from safetensors.torch import save_file

    plain = baked(model, copy=False)
    state = plain.state_dict()
    tensors, info = encode(state, keep_zero_signs=keep_zero_signs)
    metadata = {
        "format": "pt",
        STORAGE_KEY: "sparse",
        SPARSE_KEY: json.dumps(info, separators=(",", ":")),
        MANIFEST_KEY: json.dumps(manifest(plain), separators=(",", ":")),
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=metadata)
        _check_exact(state, decode_file(tmp), exact_zeros=keep_zero_signs)

    sparse_bytes = write_atomically(path, write)
    dense, _ = encode(state, sparse=False)
    dense_metadata = {k: v for k, v in metadata.items() if k not in (STORAGE_KEY, SPARSE_KEY)}
    return SparseStorageReport(
        dense_bytes=len(to_bytes(dense, metadata=dense_metadata)),
        sparse_bytes=sparse_bytes,
        sparse_tensors=len(info["sparse"]),
        dense_tensors=len(tensors) - 2 * len(info["sparse"]) - len(info["zero_signs"]),
        zero_signs=len(info["zero_signs"]),
        layers=sparsity_report(plain),
    )


def load_sparse(path: str | os.PathLike[str], arch: Arch) -> nn.Module:
    """Rebuild the model of a :func:`save_sparse` file, every tensor bit-exact; no pickle is read.

    ``arch``: a builder of the dense model (class or function of no arguments), a ``"module:callable"``
    string, or a module to load into (in place). Layers are rebuilt to the file's manifest first.
    """
    file = Path(path)
    spec = read_manifest(file)
    state = decode_file(file)  # checked against its index first: sizes bounded by the file's bytes
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    model = fit_to_manifest(build_arch(arch), spec, str(file), shapes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise StateDictError(
            f"{file} does not fit the model ({first_line(e)}); build the model the file was written from"
        ) from e
    _check_untied(model, state, file)
    return model


def load_written(path: str | os.PathLike[str], arch: Arch) -> nn.Module:
    """A ``.safetensors`` file compactor wrote, dense or sparse storage, rebuilt into ``arch``."""
    file = Path(path)
    if is_sparse(read_metadata(file)):
        return load_sparse(file, arch)
    return load_safetensors(file, arch)


def _check_untied(model: nn.Module, state: dict[str, torch.Tensor], file: Path) -> None:
    """Two entries of the file loaded into one tied tensor: the later one overwrote the earlier."""
    loaded = model.state_dict()
    for name, tensor in state.items():
        if _bit_equal(loaded[name], tensor):
            continue
        ptr = loaded[name].untyped_storage().data_ptr()
        partner = next(
            (k for k, v in loaded.items() if k != name and v.untyped_storage().data_ptr() == ptr), "?"
        )
        raise StateDictError(
            f"{file}: {name} and {partner} are one tied tensor in the architecture but differ in the file; "
            f"build the model without the tie, or tie them before saving"
        )


# --- encoding --------------------------------------------------------------------------------------
def encode(
    state: dict[str, torch.Tensor], *, sparse: bool = True, keep_zero_signs: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """safetensors-ready tensors (no shared storage) and the JSON that says how to decode them."""
    tensors: dict[str, torch.Tensor] = {}
    info: dict[str, Any] = {"sparse": {}, "zero_signs": [], "tied": {}}
    seen: dict[tuple[Any, ...], str] = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in seen:  # tied weights: stored once
            info["tied"][name] = seen[key]
            continue
        seen[key] = name
        encoded = _encode_sparse(t, keep_zero_signs) if sparse else None
        if encoded is not None:
            for suffix, part in encoded.items():
                tensors[name + suffix] = part
            info["sparse"][name] = list(t.shape)
            if ZERO_SIGNS in encoded:
                info["zero_signs"].append(name)
        else:
            shared = t.untyped_storage().data_ptr() in _ptrs(tensors)  # safetensors refuses shared storage
            tensors[name] = t.contiguous().clone() if shared else t.contiguous()
    return tensors, info


def _encode_sparse(t: torch.Tensor, keep_zero_signs: bool) -> dict[str, torch.Tensor] | None:
    """Values + bitmask (+ the signs of the zeros, where any is -0.0); None where dense is smaller."""
    if t.numel() == 0 or t.dtype == torch.bool or t.is_complex() or t.is_quantized:
        return None
    flat = t.reshape(-1)
    nonzero = flat != 0
    if t.is_floating_point():
        nonzero |= torch.isnan(flat)
    size = t.element_size()
    count = int(nonzero.sum())
    zeros = flat[~nonzero]
    negative = torch.signbit(zeros) if t.is_floating_point() and keep_zero_signs else None
    signs = negative is not None and bool(negative.any())
    stored = count * size + math.ceil(t.numel() / 8) + _ENTRY_BYTES
    if signs:
        stored += math.ceil(zeros.numel() / 8) + _ENTRY_BYTES
    if stored >= t.numel() * size:
        return None
    parts = {VALUES: flat[nonzero].contiguous(), MASK: _pack(nonzero)}
    if signs:
        assert negative is not None
        parts[ZERO_SIGNS] = _pack(negative)
    return parts


def decode(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The dense state_dict back from :func:`encode`'s output."""
    state: dict[str, torch.Tensor] = {}
    signed = set(info.get("zero_signs", []))
    for name, shape in info["sparse"].items():
        values = tensors[name + VALUES]
        count = math.prod(shape)
        nonzero = _unpack(tensors[name + MASK], count)
        dense = torch.zeros(count, dtype=values.dtype)
        dense[nonzero] = values
        if name in signed:
            zero_at = (~nonzero).nonzero().squeeze(1)
            negative = _unpack(tensors[name + ZERO_SIGNS], zero_at.numel())
            dense[zero_at[negative]] = torch.tensor(-0.0, dtype=values.dtype)
        state[name] = dense.reshape(shape)
    for name, tensor in tensors.items():
        if not name.endswith((VALUES, MASK, ZERO_SIGNS)):
            state[name] = tensor
    for name, source in info["tied"].items():
        state[name] = state[source]
    return state


def _pack(bits: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.packbits(bits.numpy()))


def _unpack(packed: torch.Tensor, count: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool))


def decode_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    metadata = read_metadata(file)
    if not is_sparse(metadata):
        raise InputFileError(
            f"{file} is not a compactor sparse-storage file (no {STORAGE_KEY!r} metadata); load a dense "
            f".safetensors with compactor.load"
        )
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise InputFileError(
            f"{file} is not a safetensors file ({e}); give a file written by save_sparse"
        ) from e
    try:
        raw = json.loads(metadata[SPARSE_KEY])
    except json.JSONDecodeError as e:
        raise InputFileError(f"{file}: the sparse index is not valid JSON ({e}); write the file again") from e
    index = parse_sparse_index(raw, str(file))
    check_sparse_parts(index, tensors, (VALUES, MASK, ZERO_SIGNS), str(file))
    return decode(
        tensors, {"sparse": index.sparse, "zero_signs": sorted(index.zero_signs), "tied": index.tied}
    )


def is_sparse(metadata: dict[str, str]) -> bool:
    """Whether safetensors ``metadata`` is that of a sparse-storage file."""
    return metadata.get(STORAGE_KEY) == "sparse" and SPARSE_KEY in metadata


def _ptrs(tensors: dict[str, torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors.values()}


def _check_exact(
    expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], *, exact_zeros: bool
) -> None:
    for name, tensor in expected.items():
        other = got.get(name)
        same = (
            other is not None
            and other.dtype == tensor.dtype
            and other.shape == tensor.shape
            and (_bit_equal(tensor, other) if exact_zeros else _equal_nan(tensor, other))
        )
        if not same:
            raise ExportError(
                f"sparse storage does not reproduce {name} exactly; nothing was written: report this, "
                f"and save dense (-o x.safetensors) meanwhile"
            )


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    as_int = _INT_OF_SIZE.get(a.element_size())
    if a.is_floating_point() and as_int is not None:
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


def _equal_nan(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().cpu(), b.detach().cpu()
    if a.is_floating_point():
        return bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())
    return torch.equal(a, b)


__all__ = [
    "LayerSparsity",
    "SparseStorageReport",
    "decode",
    "encode",
    "load_sparse",
    "save_sparse",
    "sparsity_report",
]
