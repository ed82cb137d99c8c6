"""Import a user's object by ``module`` and ``qualname``, resolving from the current directory as ``python -m``."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def make_cwd_importable() -> None:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)


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
