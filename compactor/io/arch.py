"""The dense architecture a weights file loads into: one builder, :func:`build_arch`, for every source.

``arch`` is a ``"module:callable"`` string (``--arch``, imported from the current directory as with
``python -m``), a callable of no arguments (a class or function) that builds the dense model, or a module
(used as it is).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ArchitectureError, StateDictError

Arch = Callable[[], nn.Module] | str | nn.Module


def make_cwd_importable() -> None:
    """The current directory last on ``sys.path`` (as ``python -m`` would make it importable, but never
    first: a ``secrets.py`` or ``profile.py`` beside the model must not shadow a module torch imports)."""
    cwd = os.getcwd()
    sys.path[:] = [p for p in sys.path if p not in ("", cwd)] + [cwd]


def import_qualified(module_name: str, qualname: str) -> Any:
    """``module_name`` imported, then ``qualname`` looked up in it.

    Raises ``ImportError`` when the module does not import (any exception its code raises is chained) and
    ``AttributeError`` when it has no ``qualname``; callers turn these into their own one-line errors.
    """
    make_cwd_importable()
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # the user's module: whatever its import raises is theirs to see
        raise ImportError(f"module {module_name!r} cannot be imported ({type(e).__name__}: {e})") from e
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"module {module_name!r} has no {qualname!r}")
        obj = getattr(obj, part)
    return obj


def _resolve(spec: str) -> Callable[[], nn.Module]:
    """``"pkg.module:build"`` -> a callable that builds the dense architecture (imported from the cwd).

    Checked now (the module imports, the name is callable), so that a bad ``--arch`` fails before any work."""
    module_name, sep, qualname = spec.partition(":")
    if not sep or not module_name or not qualname:
        raise ArchitectureError(
            f"--arch {spec!r} is not module:callable; write e.g. --arch mymodels:resnet18 or mypkg.nets:Net"
        )
    try:
        obj = import_qualified(module_name, qualname)
    except ImportError as e:
        raise ArchitectureError(
            f"--arch {spec}: {e}; run from the directory that holds it or add it to PYTHONPATH"
        ) from e
    except AttributeError as e:
        raise ArchitectureError(f"--arch {spec}: {e}; name a class or function defined there") from e
    if not callable(obj):
        raise ArchitectureError(
            f"--arch {spec}: {qualname} is a {type(obj).__name__}, not callable; name a class or a function "
            f"that builds the model with no arguments"
        )

    def build() -> nn.Module:
        try:
            model = obj()
        except Exception as e:  # the user's constructor
            raise ArchitectureError(
                f"--arch {spec}: calling {qualname}() failed ({type(e).__name__}: {e}); it must build the "
                f"dense model with no arguments (wrap it in a function that passes them)"
            ) from e
        if not isinstance(model, nn.Module):
            raise ArchitectureError(
                f"--arch {spec}: {qualname}() returned a {type(model).__name__}, not an nn.Module; it must "
                f"return the dense model"
            )
        return model

    return build


def build_arch(arch: Arch) -> nn.Module:
    """The dense model from a ``"module:callable"`` string, a builder, or a module (used as it is)."""
    if isinstance(arch, nn.Module):
        return arch
    if isinstance(arch, str):
        return _resolve(arch)()
    model = arch()
    if not isinstance(model, nn.Module):
        raise StateDictError(f"the architecture builder returned a {type(model).__name__}, not an nn.Module")
    return model
