"""What a ``.pt2`` archive would make ``torch.export.load`` unpickle, checked before it runs.

``torch.export.load`` reads most of an archive as JSON and raw tensor bytes, but some members with full
pickle (``torch.load(..., weights_only=False)``, ``pickle.loads``): a weight or constant whose entry in
``data/weights|constants/<model>_*_config.json`` says ``use_pickle``, the sample inputs
(``data/sample_inputs/<model>.pt``), the legacy ``data/weights|constants/<model>.pt`` and top-level
``serialized_*.pt`` files, and custom (torchbind, opaque) objects. A hostile archive hides code there.

:func:`check_members` finds every such member from the archive's own configs and names, and lets the file
through only where each loads with torch's weights-only unpickler (tensors, containers, numbers: then full
unpickling of the same bytes builds the same objects and runs nothing else); custom objects are refused
outright. The bytes checked are the bytes ``torch.export.load`` is given afterwards (read once).
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import InputFileError, UnsafePickleError, first_line

_CONFIG_DIRS = ("data/weights/", "data/constants/")
_OBJECT_PREFIXES = ("custom_obj_", "opaque_obj_")
_LEGACY = ("serialized_state_dict.pt", "serialized_constants.pt", "serialized_example_inputs.pt")
FIX = (
    "re-export it with torch.export.save (compact -o model.pt2 writes tensors only), or pass "
    "trust_pickle=True only if you trust the file"
)


def check_members(file: Path, data: bytes) -> None:
    """Refuse ``data`` (the archive ``file``) in one line if a member it would unpickle needs more than
    torch's weights-only unpickler allows; a malformed config is an :class:`InputFileError`."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e:
        raise InputFileError(
            f"{file} is not a torch.export program ({e}); give a .pt2 written by compact"
        ) from e
    with archive:
        names = set(archive.namelist())
        for name in sorted(pickled_members(file, archive, names)):
            _check_pickle(file, name, archive.read(name))


def pickled_members(file: Path, archive: zipfile.ZipFile, names: set[str]) -> set[str]:
    """The members ``torch.export.load`` would unpickle."""
    found = {n for n in names if posixpath.basename(n) in _LEGACY}
    for name in names:
        root, _, rest = name.partition("/")
        if rest.startswith("data/sample_inputs/") and rest.endswith(".pt"):
            found.add(name)
        for base in _CONFIG_DIRS:
            if not rest.startswith(base):
                continue
            leaf = rest[len(base) :]
            if leaf.endswith(".pt") and "/" not in leaf:  # the legacy weights and constants files
                found.add(name)
            if leaf.endswith("_config.json"):
                found |= {f"{root}/{base}{p}" for p in _pickled_entries(file, name, archive.read(name))}
    return found


def _pickled_entries(file: Path, member: str, raw: bytes) -> list[str]:
    """The payload files of one weights/constants config that are pickled; custom objects are refused."""
    try:
        entries = json.loads(raw)["config"]
        if not isinstance(entries, dict):
            raise TypeError("config is not an object")
        paths = {name: meta["path_name"] for name, meta in entries.items()}
        if not all(isinstance(p, str) for p in paths.values()):
            raise TypeError("a path_name is not a string")
        pickled = [paths[n] for n, meta in entries.items() if meta.get("use_pickle") is True]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputFileError(
            f"{file}: {member} is not a torch.export payload config ({first_line(e, with_type=True)}); "
            f"give a .pt2 written by torch.export.save"
        ) from e
    custom = next((n for n, p in paths.items() if p.startswith(_OBJECT_PREFIXES)), None)
    if custom is not None:
        raise UnsafePickleError(
            f"{file} holds a custom object {custom} ({member}), which torch.export.load unpickles and "
            f"rebuilds with its class's own code; refusing to load it: {FIX}"
        )
    return pickled + [p for p in paths.values() if p.endswith(".pt")]


def _check_pickle(file: Path, member: str, raw: bytes) -> None:
    if not raw:  # no sample inputs: torch reads nothing
        return
    try:
        loaded: Any = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:  # the weights-only unpickler refuses what it does not know, by raising
        raise UnsafePickleError(
            f"{file}: its member {member} is a pickle that needs more than tensors "
            f"({_why(e)}); refusing to load it, since unpickling it could run "
            f"code from the file: {FIX}"
        ) from e
    del loaded


def _why(e: Exception) -> str:
    """What torch's weights-only refusal refused (``unsupported global posix.system``), in a few words."""
    text = str(e)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"unsupported global {found.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines or [type(e).__name__])[0][:160]
