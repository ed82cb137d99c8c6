"""The model of a checkpoint's config with no weights: parameters on the meta device, filled one part at a time.

:func:`compactor.io.hf.build_skeleton` builds the architecture from ``config.json`` with every parameter on the meta device
(buffers the constructor computes, such as rotary frequencies, stay real: the checkpoint does not hold them).
:func:`decoder_blocks` finds the stack of decoder blocks; :func:`fill` gives a part its tensors from the
checkpoint (each shape checked against the config), :func:`release` takes them away again.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import InputFileError, ModelStructureError
from .checkpoint import Checkpoint

META = torch.device("meta")


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device as it is registered: a constructor's
    ``torch.empty`` is never touched (initialisation runs on the meta tensor), so it costs no memory."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device != META:
            self._parameters[name] = nn.Parameter(param.to(META), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the list of the model's decoder blocks: its longest ``ModuleList`` of one block type."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) and len({type(b) for b in m}) == 1
    ]
    if not lists:
        raise ModelStructureError(
            f"{type(model).__name__} has no list of decoder blocks (an nn.ModuleList of one block type); "
            f"a checkpoint is streamed block by block: load it with compactor.load and compact the model"
        )
    return max(lists, key=lambda item: len(item[1]))


def module_name(root: nn.Module, module: nn.Module) -> str:
    """The name ``root`` gives ``module`` (one line where it is not one of its modules)."""
    found = next((str(n) for n, m in root.named_modules() if m is module), None)
    if found is None:
        raise ModelStructureError(
            f"{type(module).__name__} is not one of the model's modules; it cannot be streamed"
        )
    return found


def tensor_names(root: nn.Module, prefix: str) -> list[str]:
    """The state_dict names of the part at ``prefix`` ("" for everything), as the root names them."""
    module = root.get_submodule(prefix) if prefix else root
    dot = f"{prefix}." if prefix else ""
    return [dot + k for k in module.state_dict(keep_vars=True)]


def aliases(root: nn.Module) -> dict[str, list[str]]:
    """Each state_dict name and every name of the same tensor (tied embeddings), the name itself first."""
    by_tensor: dict[int, list[str]] = {}
    for name, t in root.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(t), []).append(name)
    return {name: [name, *(n for n in names if n != name)] for names in by_tensor.values() for name in names}


def fill(root: nn.Module, names: list[str], checkpoint: Checkpoint, ties: dict[str, list[str]]) -> int:
    """Give the tensors ``names`` their values from the checkpoint (a tied name from its twin's key);
    returns the bytes read. A non-persistent buffer is left as the constructor computed it."""
    stored = set(checkpoint.names)
    keys: dict[str, str] = {}
    for name in names:
        key = next((n for n in ties.get(name, [name]) if n in stored), None)
        if key is None:
            if _current(root, name).device != META:
                continue
            raise InputFileError(
                f"{checkpoint.folder} holds no tensor {name!r}, which the config's {type(root).__name__} "
                f"needs; the checkpoint is incomplete or of another architecture"
            )
        keys[name] = key
    values = checkpoint.read(sorted(set(keys.values())))
    for name, key in keys.items():
        want = tuple(_current(root, name).shape)
        got = values[key]
        if tuple(got.shape) != want:
            raise InputFileError(
                f"{checkpoint.folder}: {key} has shape {list(got.shape)} but config.json builds "
                f"{list(want)}; the config and the weights disagree: give the config the weights were saved with"
            )
        shared = nn.Parameter(got, requires_grad=False) if _is_parameter(root, name) else got
        for alias in ties.get(name, [name]):
            _assign(root, alias, shared)  # one tensor object for every tied name: the tie survives
    return sum(t.numel() * t.element_size() for t in values.values())


def release(root: nn.Module, names: list[str], ties: dict[str, list[str]]) -> None:
    """The tensors ``names`` (and their tied twins) back on the meta device: their memory freed."""
    for name in names:
        for alias in ties.get(name, [name]):
            owner, attr = _owner(root, alias)
            if attr in owner._parameters and owner._parameters[attr] is not None:
                owner._parameters[attr] = nn.Parameter(_current(root, alias).to(META), requires_grad=False)
            elif attr in owner._buffers and attr not in owner._non_persistent_buffers_set:
                owner._buffers[attr] = _current(root, alias).to(META)


def _current(root: nn.Module, name: str) -> torch.Tensor:
    owner, attr = _owner(root, name)
    t = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    assert t is not None, name
    return t


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return (root.get_submodule(parent) if parent else root), attr


def _is_parameter(root: nn.Module, name: str) -> bool:
    owner, attr = _owner(root, name)
    return attr in owner._parameters


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, attr = _owner(root, name)
    if attr in owner._parameters:
        assert isinstance(value, nn.Parameter)
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value


__all__ = [
    "aliases",
    "decoder_blocks",
    "fill",
    "module_name",
    "parameters_on_meta",
    "release",
    "tensor_names",
]
