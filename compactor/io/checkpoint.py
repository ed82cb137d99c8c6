"""A Hugging Face checkpoint's tensors, read one part at a time without holding the rest.

:class:`Checkpoint` opens a directory's weights: one ``model.safetensors``, shards named by
``model.safetensors.index.json``, or ``pytorch_model*.bin`` (unpickled ``weights_only``, after the same
archive checks as any model file). Opening reads headers only: every shard's tensor names, shapes and dtypes,
each checked against the bytes the file really holds (a truncated shard is one line here, not a crash
later). :meth:`Checkpoint.read` reads the tensors of one part (the embeddings, one decoder block), opening
and closing each shard it needs, so that mapped pages do not pile up across parts.

``torch.nn.utils.prune`` keys (``X.weight_orig`` + ``X.weight_mask``) are read as ``X.weight``, the
product a pruned forward computes: :attr:`Checkpoint.names` lists them so.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputFileError, first_line

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
ORIG, MASK = "_orig", "_mask"
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on a header's size

DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


@dataclass(frozen=True)
class Stored:
    """Where one tensor lives and what it is, from the file's header."""

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0  # safetensors: where its bytes start in the file

    @property
    def nbytes(self) -> int:
        return nbytes_of(self.shape, self.dtype)


def nbytes_of(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """The bytes a tensor of ``shape`` and ``dtype`` holds."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class Checkpoint:
    """The tensors of a checkpoint directory by name (prune pairs under their baked name)."""

    folder: Path
    format: str  # "safetensors" or "bin"
    stored: dict[str, Stored]  # every key as the files hold it
    pruned: dict[str, tuple[str, str]]  # "X.weight" -> ("X.weight_orig", "X.weight_mask")
    shard_bytes: int  # the largest weight file's size: the shard size an output keeps by default

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        files, fmt = _weight_files(folder)
        stored: dict[str, Stored] = {}
        for file, keys in files.items():
            found = read_header(file) if fmt == "safetensors" else _bin_header(file)
            if keys is not None:
                missing = sorted(set(keys) - set(found))
                if missing:
                    raise InputFileError(
                        f"{folder}: the index places {missing[0]!r} in {file.name}, which does not hold it "
                        f"({len(missing)} such); the index or the shard is damaged: write the directory again"
                    )
            for key, info in found.items():
                if keys is None or key in keys:
                    stored[key] = info
        pruned = {
            key[: -len(ORIG)]: (key, key[: -len(ORIG)] + MASK)
            for key in stored
            if key.endswith(ORIG) and key[: -len(ORIG)] + MASK in stored
        }
        for orig, mask in pruned.values():
            if stored[orig].shape != stored[mask].shape:
                raise InputFileError(
                    f"{folder}: {orig} has shape {list(stored[orig].shape)} but {mask} "
                    f"{list(stored[mask].shape)}; the prune mask does not fit its weight: write the checkpoint again"
                )
        return cls(folder, fmt, stored, pruned, max(f.stat().st_size for f in files))

    @property
    def names(self) -> list[str]:
        """Every tensor as the model names it: prune pairs as the weight they compute."""
        hidden = {k for pair in self.pruned.values() for k in pair}
        return [k for k in self.stored if k not in hidden] + list(self.pruned)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._first(name).shape

    def _first(self, name: str) -> Stored:
        """The stored tensor a name reads (a prune pair's ``weight_orig``, which its mask matches)."""
        return self.stored[self.pruned[name][0] if name in self.pruned else name]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors ``names`` (prune pairs multiplied out), each read from its shard into memory of its own."""
        wanted = list(names)
        keys = [k for n in wanted for k in self.pruned.get(n, (n,))]
        by_file: dict[Path, list[Stored]] = {}
        for key in keys:
            by_file.setdefault(self.stored[key].file, []).append(self.stored[key])
        raw: dict[str, torch.Tensor] = {}
        for entries in by_file.values():
            raw.update(_read_file(entries, self.format))
        out = {}
        for name in wanted:
            if name in self.pruned:
                orig, mask = self.pruned[name]
                out[name] = raw.pop(orig) * raw.pop(mask).to(self.stored[orig].dtype)
            else:
                out[name] = raw.pop(name)
        return out


def _weight_files(folder: Path) -> tuple[dict[Path, set[str] | None], str]:
    """The weight files and, for shards, the keys the index places in each."""
    for index_name, single, fmt in ((SAFE_INDEX, SAFE_SINGLE, "safetensors"), (BIN_INDEX, BIN_SINGLE, "bin")):
        index = folder / index_name
        if index.is_file():
            return _indexed(folder, index), fmt
        if (folder / single).is_file():
            return {folder / single: None}, fmt
    raise InputFileError(
        f"{folder} holds no model weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}); "
        f"write the model with save_pretrained"
    )


def _indexed(folder: Path, index: Path) -> dict[Path, set[str] | None]:
    try:
        spec = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputFileError(
            f"{index} is not readable JSON ({first_line(e)}); write the directory again"
        ) from e
    weight_map = spec.get("weight_map") if isinstance(spec, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputFileError(f"{index} has no weight_map; write the directory again with save_pretrained")
    files: dict[Path, set[str] | None] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise InputFileError(f"{index} places {key!r} in {name!r}, not a file of the directory")
        file = folder / name
        if not file.is_file():
            raise InputFileError(
                f"{index} names {name}, which is not in {folder} (a missing shard); copy the whole directory"
            )
        keys = files.setdefault(file, set())
        assert keys is not None
        keys.add(str(key))
    return files


def read_header(file: Path) -> dict[str, Stored]:
    """Names, shapes and dtypes from the header, checked against the file's size (truncated, damaged)."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise _damaged(file, "no safetensors header")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _damaged(file, f"its header is not JSON ({e})") from e
    if not isinstance(header, dict):
        raise _damaged(file, "its header is not a JSON object")
    found, end = {}, 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _damaged(file, f"tensor {key!r} has no dtype, shape and offsets it can read") from e
        stored = Stored(file, key, shape, dtype, 8 + n + start)
        if min(shape, default=1) < 0 or stop - start != stored.nbytes:
            raise _damaged(file, f"tensor {key!r} of shape {list(shape)} spans {stop - start} bytes")
        found[key], end = stored, max(end, stop)
    if 8 + n + end > size:
        raise _damaged(file, f"it holds {size} bytes but its header needs {8 + n + end} (a truncated copy)")
    return found


def _bin_header(file: Path) -> dict[str, Stored]:
    state = _load_bin(file)
    return {
        k: Stored(file, k, tuple(v.shape), v.dtype) for k, v in state.items() if isinstance(v, torch.Tensor)
    }


def _load_bin(file: Path) -> dict[str, Any]:
    """A ``pytorch_model.bin``: the archive checks of any model file, then ``weights_only`` (memory-mapped)."""
    import zipfile

    from .safe_globals import check_archive, check_calls

    try:
        if zipfile.is_zipfile(file):
            check_archive(file)
            check_calls(file, {})
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except InputFileError:
        raise
    except Exception as e:  # torch raises many types for a damaged or hostile file
        raise _damaged(file, first_line(e, with_type=True)) from e
    if not isinstance(state, dict):
        raise _damaged(file, f"it holds a {type(state).__name__}, not a state_dict")
    return state


def _read_file(entries: list[Stored], fmt: str) -> dict[str, torch.Tensor]:
    """The tensors ``entries`` (all of one file, as its header gave them when the checkpoint was opened)."""
    if fmt == "bin":
        state = _load_bin(entries[0].file)
        return {s.key: state[s.key].clone() for s in entries}
    return {s.key: read_stored(s) for s in entries}


def read_stored(stored: Stored) -> torch.Tensor:
    """One safetensors tensor, read with plain file reads into memory of its own.

    Not through ``safe_open``'s memory map: a mapped tensor keeps the whole mapping alive, and with it every
    page another tensor of the same read touched (a final norm read with the embeddings held the 1 GB of an
    8B-shape embedding matrix resident through every block)."""
    size = stored.nbytes
    buffer = bytearray(size)
    try:
        with stored.file.open("rb") as f:
            f.seek(stored.offset)
            got = f.readinto(buffer)
    except OSError as e:
        raise _damaged(stored.file, first_line(e)) from e
    if got != size:
        raise _damaged(stored.file, f"tensor {stored.key!r} ends after {got} of its {size} bytes")
    if not size:
        return torch.empty(stored.shape, dtype=stored.dtype)
    return torch.frombuffer(buffer, dtype=stored.dtype).reshape(stored.shape)


def _damaged(file: Path, why: str) -> InputFileError:
    return InputFileError(f"{file} cannot be read as model weights: {why}; copy or write it again")


__all__ = [
    "BIN_INDEX",
    "BIN_SINGLE",
    "SAFE_INDEX",
    "SAFE_SINGLE",
    "Checkpoint",
    "Stored",
    "nbytes_of",
    "read_header",
    "read_stored",
]
