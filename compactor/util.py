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


_CAPTURE_MODULE = "transformers.utils.output_capturing"  # where transformers 5 defines its capturing hooks
_CAPTURE_FLAG = "_output_capturing_hooks_installed"


@contextmanager
def picklable(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` without transformers' output-capturing hooks while inside (``torch.save`` of it, say).

    transformers 5 installs them lazily, as local functions that pickle cannot store, the first time a forward
    asks for hidden states (every backbone does); with its installed flag cleared, a saved and reloaded model
    installs them again when it needs them. Everything is put back on exit."""
    hooks = {
        m: dict(m._forward_hooks) for m in model.modules() if any(map(_capturing, m._forward_hooks.values()))
    }
    flags = [m for m in model.modules() if m.__dict__.get(_CAPTURE_FLAG) is True]
    for m in hooks:
        for key in [k for k, hook in m._forward_hooks.items() if _capturing(hook)]:
            del m._forward_hooks[key]
    for m in flags:
        del m.__dict__[_CAPTURE_FLAG]
    try:
        yield model
    finally:
        for m, saved in hooks.items():
            m._forward_hooks.clear()
            m._forward_hooks.update(saved)
        for m in flags:
            m.__dict__[_CAPTURE_FLAG] = True


def _capturing(hook: object) -> bool:
    return getattr(hook, "__module__", None) == _CAPTURE_MODULE and "<locals>" in getattr(
        hook, "__qualname__", ""
    )
