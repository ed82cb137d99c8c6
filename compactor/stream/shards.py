"""The output directory of a streamed compaction: sharded safetensors with an index, written a tensor at a time.

Each compacted part is first saved as a file of its own in the (temporary) output directory
(:func:`save_part`). :func:`assemble` then lays the parts' tensors out in shards of at most ``max_bytes``
(``model-00001-of-00004.safetensors``, or one ``model.safetensors`` when all fit) and writes them one tensor
at a time (:func:`write_shard`: the header first, from the shapes alone, then each tensor's bytes), so no
more than one tensor is in memory; the index (``model.safetensors.index.json``) names each tensor's shard.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from ..io.checkpoint import DTYPES, SAFE_INDEX, SAFE_SINGLE, Stored, nbytes_of, read_header, read_stored

PART = "part-{:05d}.compactor-part"
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
SIDE_FILES = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
    "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "preprocessor_config.json",
)  # fmt: skip


def save_part(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> Path:
    """One part's tensors, as a safetensors file of its own (joined into shards by :func:`assemble`)."""
    path = folder / PART.format(index)
    write_shard(path, [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()], lambda n: tensors[n])
    return path


def write_shard(
    path: Path,
    layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
    tensor: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """A safetensors file of the tensors ``layout`` names, each asked of ``tensor`` as it is written."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for name, dtype, shape in layout:
        size = nbytes_of(shape, dtype)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dtype, shape in layout:
            t = tensor(name)
            assert t.dtype == dtype and tuple(t.shape) == shape, name
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)  # no copy
    return 8 + len(text) + offset


def assemble(
    folder: Path,
    parts: list[Path],
    max_bytes: int,
    reshape: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict[str, str]:
    """Join the part files into shards of at most ``max_bytes``; returns the index's weight map.
    ``reshape``/``shapes``: a tensor's final form and shape where it changes (``--uniform``'s padding)."""
    entries: list[Stored] = [s for p in parts for s in read_header(p).values()]
    final = shapes or {}

    def nbytes(s: Stored) -> int:
        return nbytes_of(final.get(s.key, s.shape), s.dtype)

    shards: list[list[Stored]] = [[]]
    size = 0
    for s in entries:
        if shards[-1] and size + nbytes(s) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes(s)
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = SAFE_SINGLE if total == 1 else f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        by_key = {s.key: s for s in shard}

        def tensor(key: str, by_key: dict[str, Stored] = by_key) -> torch.Tensor:
            t = read_stored(by_key[key])
            return reshape(key, t) if reshape is not None else t

        layout = [(s.key, s.dtype, final.get(s.key, s.shape)) for s in shard]
        write_shard(folder / name, layout, tensor)
        weight_map.update({s.key: name for s in shard})
    for p in parts:
        p.unlink()
    if total > 1:
        total_size = sum(nbytes(s) for s in entries)
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return weight_map


def read_part(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one part file."""
    return {k: read_stored(s) for k, s in read_header(path).items()}


def copy_side_files(source: Path, folder: Path) -> list[str]:
    """The tokenizer and generation files, copied as they are."""
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
            copied.append(name)
    return copied


__all__ = ["PART", "SIDE_FILES", "assemble", "copy_side_files", "read_part", "save_part", "write_shard"]
