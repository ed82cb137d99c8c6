"""Stage 1, load: every file compactor reads or writes, read back without running code from it.

:func:`load` is ``compactor.load``, the one loader for users: it takes the PyTorch outputs of ``compact``
(``.pt``, ``.pt2``, ``.safetensors`` dense or sparse) and the inputs it accepts (a pickled model; a
state_dict or Lightning checkpoint given the architecture), and returns the model in eval mode. (An
``.onnx`` output runs in ONNX Runtime.) :func:`read_model` reads a model to compact: the same files but
``.pt2``, in the mode they were saved in.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CompactorError, ExampleInputError, InputFileError
from ..inputs import ExampleInputs
from ..util import run_deep
from .arch import Arch
from .hf import is_hf_dir, load_hf
from .pt import read_module
from .pt2 import read_pt2
from .safe_globals import check_archive, check_calls, check_tensors
from .state_dict import load_state_dict_model


def load(
    path: str | os.PathLike[str],
    arch: Arch | None = None,
    *,
    trust_pickle: bool = False,
    prefix: str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a model file, in eval mode.

    ``path``: ``.pt`` (a pickled module, read with the same safe unpickling as the CLI; or, with ``arch``,
    a state_dict or Lightning ``.ckpt``), ``.pt2`` (a ``torch.export`` program; runs without the class),
    or ``.safetensors`` (written by compactor, dense or sparse storage, or a plain state_dict: needs ``arch``).
    ``arch``: what builds the DENSE model: a class or function of no arguments, a ``"module:callable"``
    string, or a module to load into. ``trust_pickle``: unpickle ``.pt`` files with full pickle (runs code
    from the file; only for files you trust). ``prefix``: the key prefix of a checkpoint to strip.
    ``trust_remote_code``: let a Hugging Face directory whose ``config.json`` has ``auto_map`` run its own
    code (refused otherwise).
    """
    file = Path(path)
    if file.suffix.lower() == ".pt2":
        return read_pt2(file, trust_pickle=trust_pickle).eval()
    if is_hf_dir(file):
        return load_hf(file, trust_remote_code=trust_remote_code).eval()
    return read_model(file, arch, trust_pickle=trust_pickle, prefix=prefix).eval()


DEEP_RETRY = 2000  # the nesting a load retried after a RecursionError is given room for (util.run_deep)


def read_model(
    path: str | os.PathLike[str],
    arch: Arch | None = None,
    *,
    trust_pickle: bool = False,
    prefix: str | None = None,
    notes: list[str] | None = None,
) -> nn.Module:
    """A model to compact, in the mode it was saved in: :func:`load`'s files but ``.pt2``. ``notes`` gets
    a line for what the safe loader rebuilt rather than read (:func:`compactor.io.pt.read_module`)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix in (".pt2", ".onnx"):
        what = "a torch.export program" if suffix == ".pt2" else "an ONNX model"
        raise InputFileError(
            f"{file} is {what}, which cannot be compacted or loaded as a module; give the model it was exported "
            f"from (torch.save(model) or its state_dict with --arch)"
            + ("; run it with onnxruntime.InferenceSession(path)" if suffix == ".onnx" else "")
        )
    if suffix == ".ckpt" and arch is None:
        raise InputFileError(
            f"{file} is a checkpoint (weights and training state, not a model); say which architecture the "
            f"weights belong to: --arch module:callable (Python: compactor.load(path, arch=MyModel))"
        )
    if suffix == ".safetensors" and arch is None:
        raise InputFileError(
            f"{file} holds weights only; say which architecture they belong to: --arch module:callable "
            f"(Python: compactor.load(path, arch=MyModel)), the function that builds the dense model"
        )

    def read() -> nn.Module:
        if arch is not None:
            return load_state_dict_model(file, arch, prefix=prefix)
        return read_module(file, trust_pickle=trust_pickle, notes=notes)

    try:
        try:
            return read()
        except RecursionError:  # a model nested deeper than the interpreter's limit: again, on a big stack
            return run_deep(read, DEEP_RETRY)
    except OSError as e:  # the file went away or became unreadable while it was read
        raise InputFileError(
            f"{file} could not be read ({e.strerror or e}); check that it exists and stays in place while "
            f"compact runs"
        ) from e


def read_example_inputs(path: str | os.PathLike[str]) -> ExampleInputs:
    """Example inputs saved with ``torch.save`` (a tensor, a tuple/list, or a dict of keyword tensors), read
    with the same checks as a model file (no archive bombs, no calls ``torch.save`` never makes) and
    ``weights_only`` unpickling: ``--example-inputs`` and anything else that takes them from a file."""
    path = Path(path)
    if not path.is_file():
        raise ExampleInputError(
            f"--example-inputs {path} does not exist; save one with torch.save(x, '{path}')"
        )

    try:
        if zipfile.is_zipfile(
            path
        ):  # the same checks as a model file: no bombs, no calls torch.save never makes
            check_archive(path)
            check_calls(path, {})
        value = torch.load(path, map_location="cpu", weights_only=True)
        check_tensors(value, path)
    except CompactorError:
        raise
    except Exception as e:  # torch raises many types for non-torch files
        raise ExampleInputError(
            f"--example-inputs {path} is not a torch.save'd tensor, tuple/list or dict of tensors ({type(e).__name__})"
        ) from e
    return ExampleInputs.of(value)
