"""Small helpers on modules that several stages share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode_restored(model: nn.Module, *, eval: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode (unless ``eval=False``) and give every submodule back its own
    train/eval flag afterwards, whatever happens inside (a submodule may differ from its parent)."""
    flags = {m: m.training for m in model.modules()}
    if eval:
        model.eval()
    try:
        yield model
    finally:
        for m, flag in flags.items():
            m.training = flag


def set_submodule(root: nn.Module, name: str, new: nn.Module | nn.Parameter) -> nn.Module:
    """Put ``new`` (a module, or a bare parameter) at dotted ``name`` in ``root``; return the root (``new``
    itself when ``name`` is '', which only a module can be)."""
    if not name:
        if not isinstance(new, nn.Module):
            raise TypeError("only a module can replace the root")
        return new
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root
