"""``.pt``: read a pickled ``nn.Module`` without running arbitrary code from the file, and write one.

``torch.load(weights_only=True)`` refuses every global it was not told about. We tell it about the globals
the file names that are safe to construct, judged from their names and source before anything is imported
(:mod:`compactor.io.safe_globals`): ``nn.Module`` subclasses, ``torch.nn.utils.prune`` methods, Hugging
Face configs, enums, plain containers, torch's pure operators, ``functools.partial`` of a module class or
operator. Anything else (``os.system``, ``getattr``, a user function...) is refused with its name, unless the
caller opts in with ``trust_pickle``.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputFileError, UnsafePickleError, first_line
from ..inputs import ExampleInputs
from ..outputs import Outputs
from ..util import picklable
from .arch import make_cwd_importable
from .atomic import write_atomically
from .check import expect_same
from .kernel_funcs import kernel_classes, reconcile_kernel_funcs
from .safe_globals import allowed_globals, check_archive, check_calls, check_tensors


def read_module(
    path: str | os.PathLike[str], *, trust_pickle: bool = False, notes: list[str] | None = None
) -> nn.Module:
    """Load a module saved with ``torch.save(model)`` onto the CPU (in the mode it was saved in).

    ``notes`` (where given) gets a line for each thing the safe loader rebuilt rather than read: the
    transformers hub-kernel wrappers (:mod:`compactor.io.kernel_funcs`)."""
    file = Path(path)
    check_torch_file(file, kind="model", fix="re-save the model", save_call="torch.save(model, path)")
    make_cwd_importable()  # as with ``python -m``: the user's model class resolves (after everything else)
    kernels: list[str] = []
    if trust_pickle:
        obj = _torch_load(file, weights_only=False)
    else:
        check_archive(file)
        allowed = allowed_globals(_globals_in(file), file)
        kernels = check_calls(file, allowed)
        told = [(obj, name) for name, obj in allowed.items()] + kernel_classes(kernels)
        with torch.serialization.safe_globals(told):
            obj = _torch_load(file, weights_only=True)
    if isinstance(obj, nn.Module):
        _check_complete(obj, file)
        if not trust_pickle:
            check_tensors(obj, file)
        dropped, added = reconcile_kernel_funcs(obj)
        if notes is not None:
            notes += _kernel_notes(kernels, dropped, added)
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputFileError(
            f"{file} holds a state_dict ({len(obj)} tensors), not a model; save the module itself with "
            f"torch.save(model, '{file.name}'), or pass --arch module:callable to build the architecture"
        )
    if isinstance(obj, dict) and "state_dict" in obj:
        raise InputFileError(
            f"{file} holds a checkpoint (a dict with a 'state_dict'), not a model; pass --arch module:callable to "
            f"build the architecture its weights belong to"
        )
    raise InputFileError(
        f"{file} holds a {type(obj).__name__}, not an nn.Module; save the model with torch.save(model, path), "
        f"or pass --arch module:callable if it holds the model's weights"
    )


def _kernel_notes(kernels: list[str], dropped: int, added: int) -> list[str]:
    """What the loader did about transformers' hub-kernel wrappers (:mod:`compactor.io.kernel_funcs`)."""
    notes = []
    if kernels:
        names = ", ".join(sorted({k.rpartition(".")[2] for k in kernels}))
        how = (
            f"left out: kernels is not installed here, so transformers calls {names} directly"
            if dropped
            else "rebuilt from the installed transformers and kernels"
        )
        notes.append(
            f"{len(kernels)} hub-kernel wrapper(s) of {names} (transformers' use_kernel_forward_from_hub) {how}; "
            f"nothing the file names was imported or fetched for them, and verification compares the model"
        )
    if added:
        notes.append(
            f"{added} module(s) saved without the kernels package given the hub-kernel wrappers that the installed "
            f"transformers reads in their forward (as its constructor makes them)"
        )
    return notes


def _check_complete(model: nn.Module, file: Path) -> None:
    """Every module carries the state ``torch.save`` writes (a pickle can build one with ``__new__`` alone)."""
    state = ("_parameters", "_buffers", "_modules")
    broken = next((n for n, m in _modules(model) if not all(a in vars(m) for a in state)), None)
    if broken is not None:
        raise InputFileError(
            f"{file}: module {broken or '(the root)'} was stored without its state, which torch.save(model) "
            f"always writes; the file is damaged or hand-made: save the model again with torch.save(model, path)"
        )


def _modules(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every module under ``root``, read without ``named_modules`` (which needs the state being checked)."""
    found, todo = [], [("", root)]
    while todo:
        name, module = todo.pop()
        found.append((name, module))
        children = vars(module).get("_modules") or {}
        todo += [(f"{name}.{k}".lstrip("."), c) for k, c in children.items() if isinstance(c, nn.Module)]
    return found


def check_torch_file(file: Path, *, kind: str, fix: str, save_call: str) -> None:
    """One line for each way ``file`` can fail to be a readable ``torch.save`` file.

    ``kind`` names the file ("model", "weights"); ``fix`` and ``save_call`` say how to write a good one
    ("re-save the model", "torch.save(model, path)").
    """
    if not file.exists():
        raise InputFileError(f"{kind} file {file} does not exist; check the path")
    if file.is_dir():
        raise InputFileError(f"{file} is a directory; give the file written by {save_call}")
    if not os.access(file, os.R_OK):
        raise InputFileError(f"{kind} file {file} is not readable; check its permissions")
    if not zipfile.is_zipfile(file) and not _is_legacy_pickle(file):
        raise InputFileError(
            f"{file} is not a PyTorch file (expected the zip archive written by torch.save); {fix} with {save_call}"
        )


def _is_legacy_pickle(file: Path) -> bool:
    with file.open("rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] in (2, 3, 4, 5)  # pickle protocol marker


def _globals_in(file: Path) -> list[str]:
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception as e:  # torch raises several types for corrupt archives
        raise InputFileError(f"{file} could not be read as a PyTorch file ({type(e).__name__}: {e})") from e


def _torch_load(file: Path, *, weights_only: bool) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        raise UnsafePickleError(
            f"{file} could not be loaded safely ({first_line(e)}); pass --trust-pickle only if you trust the file"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as e:
        raise InputFileError(f"{file} could not be read as a PyTorch file ({type(e).__name__}: {e})") from e


def write_pt(
    model: nn.Module, path: str | os.PathLike[str], runs: list[ExampleInputs], references: list[Outputs]
) -> int:
    """Pickle ``model`` to ``path`` (``torch.save``), reloaded and run before it lands; return the bytes written.

    The reload is of the file this process just wrote from ``model``, whose classes are already imported:
    it unpickles with ``weights_only=False`` and must reproduce ``references`` within float rounding."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as f, picklable(model):  # a file object: the archive is named "archive"
            torch.save(model, f)
        expect_same(torch.load(tmp, weights_only=False), runs, references, 0.0, tmp, "pt")

    return write_atomically(path, write)
