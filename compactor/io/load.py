"""Stage 1, load: every file compactor reads or writes, read back without running code from it.

:func:`load` is ``compactor.load``, the one loader for users: it takes any output of ``compact``
(``.pt``, ``.pt2``, ``.safetensors`` dense or sparse) and the inputs it accepts (a pickled model; a
state_dict or Lightning checkpoint given the architecture), and returns the model in eval mode.
:func:`read_model` is the same without the mode change, for the CLI, which keeps the mode it was saved in.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from ..errors import InputFileError
from .arch import Arch
from .pt import read_module
from .pt2 import read_pt2
from .safetensors import MANIFEST_KEY, read_metadata
from .sparse import load_written
from .state_dict import load_state_dict_model


def load(
    path: str | os.PathLike[str],
    arch: Arch | None = None,
    *,
    trust_pickle: bool = False,
    prefix: str | None = None,
) -> nn.Module:
    """Load a model file, in eval mode.

    ``path``: ``.pt`` (a pickled module, read with the same safe unpickling as the CLI; or, with ``arch``,
    a state_dict or Lightning ``.ckpt``), ``.pt2`` (a ``torch.export`` program; runs without the class),
    or ``.safetensors`` (written by compactor, dense or sparse storage, or a plain state_dict: needs ``arch``).
    ``arch``: what builds the DENSE model: a class or function of no arguments, a ``"module:callable"``
    string, or a module to load into. ``trust_pickle``: unpickle ``.pt`` files with full pickle (runs code
    from the file; only for files you trust). ``prefix``: the key prefix of a checkpoint to strip.
    """
    return read_model(path, arch, trust_pickle=trust_pickle, prefix=prefix).eval()


def read_model(
    path: str | os.PathLike[str],
    arch: Arch | None = None,
    *,
    trust_pickle: bool = False,
    prefix: str | None = None,
) -> nn.Module:
    """:func:`load` without switching to eval mode."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".pt2":
        return read_pt2(file)
    if suffix == ".safetensors":
        if arch is None:
            raise InputFileError(
                f"{file} holds weights only; say which architecture they belong to: --arch module:callable "
                f"(Python: compactor.load(path, arch=MyModel)), the function that builds the dense model"
            )
        if MANIFEST_KEY in read_metadata(file):
            return load_written(file, arch)
    if arch is not None:
        return load_state_dict_model(file, arch, prefix=prefix)
    return read_module(file, trust_pickle=trust_pickle)
