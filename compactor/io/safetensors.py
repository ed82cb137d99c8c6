"""``.safetensors``: the weights with no pickle, plus a shape manifest so that a compacted model loads into
the dense architecture it came from.

A compacted model has the dense model's structure with smaller layers, so a state_dict alone does not
load into the class it came from. The manifest, stored as JSON under the metadata key
``"compactor.manifest"`` (one file, nothing beside it to lose), lists every layer the shrinker registry
knows (:mod:`compactor.layers`) with its type, channel counts and the shape attributes its shrinker names
(``Shrinker.shape_attrs``), plus the shapes of bare parameters and buffers (LayerScale).
:func:`load_safetensors` builds the dense model, rebuilds each listed layer to those shapes with its
shrinker, and loads the weights with ``strict=True``. Example::

    {"version": 1,
     "layers": {"conv1": {"type": "Conv2d", "out": 5, "in": 3, "bias": null,
                          "attrs": {"in_channels": 3, "out_channels": 5, "groups": 1}}, ...},
     "tensors": {"gamma": [5, 1, 1]}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import nn

from ..errors import ExportError, InputFileError, StateDictError, first_line
from ..inputs import ExampleInputs
from ..layers import Side, shrinker_for
from ..outputs import Outputs
from ..util import OWN_CONFIG, get_count, set_count, set_submodule
from .arch import Arch, build_arch
from .check import expect_same
from .manifest import HEAD_COUNTS, LayerEntry, Shape, parse_manifest

MANIFEST_KEY = "compactor.manifest"
MANIFEST_VERSION = 1


# --- writing ---------------------------------------------------------------------------------------
def write_safetensors(
    model: nn.Module, tmp: Path, runs: list[ExampleInputs], references: list[Outputs], arch: Arch | None
) -> None:
    """Write ``model``'s weights and manifest to ``tmp``, then rebuild it from there (into ``arch`` where
    given, else into a copy of ``model``) and check it reproduces ``references`` exactly."""
    from safetensors.torch import save_model

    metadata = {"format": "pt", MANIFEST_KEY: json.dumps(manifest(model), separators=(",", ":"))}
    try:
        save_model(model, str(tmp), metadata=metadata)
    except ValueError as e:
        raise ExportError(f"safetensors could not save {type(model).__name__}: {first_line(e)}") from e
    target: Arch = arch if arch is not None else _same_model(model)
    expect_same(load_safetensors(tmp, target), runs, references, 0.0, tmp, "safetensors")


def _same_model(model: nn.Module) -> Arch:
    from ..modules import clone_module

    return lambda: clone_module(model)


def manifest(model: nn.Module) -> dict[str, Any]:
    """Shapes and constructor attributes of every registered layer and of every bare tensor."""
    layers: dict[str, Any] = {}
    owned: set[str] = set()
    for name, module in model.named_modules():
        shrinker = shrinker_for(module)
        if shrinker is None:
            continue
        bias = getattr(module, "bias", None)
        layers[name] = {
            "type": type(module).__name__,
            "out": shrinker.out_channels(module),
            "in": shrinker.in_channels(module),
            "bias": list(bias.shape) if isinstance(bias, torch.Tensor) else None,
            "attrs": {
                a: getattr(module, a)
                for a in shrinker.shape_attrs
                if isinstance(getattr(module, a, None), int)
            },
        }
        owned.update(_join(name, t) for t, _ in module.named_parameters(recurse=True))
        owned.update(_join(name, t) for t, _ in module.named_buffers(recurse=True))
    tensors = {
        name: list(t.shape)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if name not in owned
    }
    modules = {name: _counts(module, model) for name, module in model.named_modules()}
    modules = {name: attrs for name, attrs in modules.items() if attrs}
    spec = {"version": MANIFEST_VERSION, "layers": layers, "tensors": tensors}
    return {**spec, "modules": modules} if modules else spec


def _counts(module: nn.Module, model: nn.Module) -> dict[str, int]:
    """The head counts of ``module`` (:data:`HEAD_COUNTS`); a config's only where it has a config of its own
    (the model's config, and every layer's that shares it, is the one ``config.json`` holds)."""
    shared = getattr(module, "config", None) is getattr(model, "config", None)
    return {
        a: value
        for a in HEAD_COUNTS
        if _is_count(value := get_count(module, a)) and not (shared and a.startswith(OWN_CONFIG))
    }


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# --- reading ---------------------------------------------------------------------------------------
def read_metadata(file: Path) -> dict[str, str]:
    """The metadata of a safetensors file (one line naming the file if it is not one)."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise InputFileError(f"{file} does not exist or is not a file; check the path")
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InputFileError(
            f"{file} is not a safetensors file ({first_line(e)}); give a file written with -o x.safetensors"
        ) from e


def read_manifest(path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest of a safetensors file written by compactor."""
    file = Path(path)
    text = (metadata if metadata is not None else read_metadata(file)).get(MANIFEST_KEY)
    if text is None:
        raise InputFileError(
            f"{file} has no compactor manifest (metadata key {MANIFEST_KEY!r}); it was not written by "
            f"compactor: load it with safetensors.torch.load_model into a model of the right shapes"
        )
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(
            f"{file}: the compactor manifest is not valid JSON ({e}); write the file again"
        ) from e
    if not isinstance(spec, dict) or spec.get("version") != MANIFEST_VERSION:
        raise InputFileError(
            f"{file}: compactor manifest version {spec.get('version') if isinstance(spec, dict) else '?'} is not "
            f"{MANIFEST_VERSION}; use the compactor version that wrote it"
        )
    return spec


def load_safetensors(path: str | os.PathLike[str], arch: Arch) -> nn.Module:
    """Rebuild a model saved as dense ``.safetensors`` by compactor: no pickle is read.

    ``arch`` builds the DENSE model (see :func:`compactor.io.arch.build_arch`). The layers listed in the
    file's manifest are rebuilt to its shapes, then the weights are loaded with ``strict=True``. The model
    comes back in the mode the builder leaves it (``compactor.load`` puts it in eval mode).
    """
    file = Path(path)
    spec = read_manifest(file)
    model = fit_to_manifest(build_arch(arch), spec, str(file), stored_shapes(file))
    _load_weights(model, file)
    return model


def stored_shapes(file: Path) -> dict[str, Shape]:
    """The shape of every tensor the file holds, from its header (nothing is read into memory)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118  (safe_open is not iterable)
    except (SafetensorError, OSError) as e:
        raise InputFileError(f"{file} is not a safetensors file ({first_line(e)}); write it again") from e


def fit_to_manifest(
    model: nn.Module, spec: dict[str, Any], where: str, stored: dict[str, Shape]
) -> nn.Module:
    """Rebuild the layers and bare tensors of the dense ``model`` to the shapes in ``spec``; return the root.
    ``stored``: the shapes the file holds, which bound every tensor made here (a manifest cannot ask for
    more than the file has)."""
    manifest = parse_manifest(spec, where)
    for name, entry in manifest.layers.items():
        model = _fit_layer(model, name, entry, where, stored)
    for name, shape in manifest.tensors.items():
        _fit_tensor(model, name, shape, where, stored)
    for name, attrs in manifest.modules.items():
        _fit_counts(model, name, attrs, where)
    return model


def _fit_counts(root: nn.Module, name: str, attrs: dict[str, int], where: str) -> None:
    """Set the head counts the manifest records (:data:`HEAD_COUNTS`): never above the dense model's."""
    try:
        module = root.get_submodule(name)
    except AttributeError as e:
        raise StateDictError(
            f"{where} has module {name!r} but the architecture has none; build the model the file was written from"
        ) from e
    for attr, value in attrs.items():
        dense = get_count(module, attr)
        if not _is_count(dense) or not 1 <= value <= dense:
            raise StateDictError(
                f"{where}: module {name!r} has {attr}={value} in the file but {dense} in the architecture; build the "
                f"model the file was written from"
            )
        set_count(module, attr, value)


def _held(stored: dict[str, Shape], name: str, shape: Shape, where: str) -> Shape:
    if stored.get(name) != shape:
        raise InputFileError(
            f"{where}: the manifest gives {name!r} the shape {list(shape)} but the file holds "
            f"{list(stored[name]) if name in stored else 'no such tensor'}; the file is damaged: write it again"
        )
    return shape


def _fit_layer(
    root: nn.Module, name: str, entry: LayerEntry, where: str, stored: dict[str, Shape]
) -> nn.Module:
    try:
        module = root.get_submodule(name)
    except AttributeError as e:
        raise StateDictError(
            f"{where} has layer {name!r} ({entry.type}) but the architecture has none; build the model "
            f"the file was written from"
        ) from e
    shrinker = shrinker_for(module)
    if type(module).__name__ != entry.type or shrinker is None:
        raise StateDictError(
            f"{where}: layer {name!r} is {entry.type} in the file but {type(module).__name__} in the "
            f"architecture; build the model the file was written from"
        )
    try:
        keep_out = _keep(module, shrinker.out_channels(module), entry.out, name, Side.OUT, where)
        keep_in = _keep(module, shrinker.in_channels(module), entry.in_, name, Side.IN, where)
        new = module if keep_out is None and keep_in is None else shrinker.shrink(module, keep_out, keep_in)
    except StateDictError:
        raise
    except ValueError as e:
        raise StateDictError(
            f"{where}: layer {name!r} cannot be rebuilt to its saved shape ({e}); build the model the file was written from"
        ) from e
    bias = entry.bias if entry.bias is None else _held(stored, _join(name, "bias"), entry.bias, where)
    _fit_bias(new, bias)
    for attr, value in entry.attrs.items():
        if getattr(new, attr, None) != value:
            raise StateDictError(
                f"{where}: layer {name!r} has {attr}={getattr(new, attr, None)} after rebuilding but the file "
                f"says {value}; build the model the file was written from"
            )
    return root if new is module else set_submodule(root, name, new)


def _keep(
    module: nn.Module, dense: int | None, want: int | None, name: str, side: Side, where: str
) -> torch.Tensor | None:
    """``want`` of the ``dense`` channels, laid out as the layer can hold them (the file's values come next)."""
    if dense == want or dense is None or want is None:
        return None
    if want > dense:
        raise StateDictError(
            f"{where}: layer {name!r} has {want} {'output' if side is Side.OUT else 'input'} channels but the "
            f"architecture only {dense}; --arch must build the dense model the compacted one came from"
        )
    shrinker = shrinker_for(module)
    assert shrinker is not None
    return shrinker.layout(module, side, want)


def _fit_bias(module: nn.Module, shape: Shape | None) -> None:
    """A folded constant can give a layer a bias it was built without (see ``layers.add_to_bias``)."""
    bias = getattr(module, "bias", None)
    if shape is None and isinstance(bias, torch.Tensor):
        module.register_parameter("bias", None)
    elif shape is not None and bias is None:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        module.bias = nn.Parameter(
            torch.zeros(shape, dtype=weight.dtype, device=weight.device), weight.requires_grad
        )


def _fit_tensor(root: nn.Module, name: str, shape: Shape, where: str, stored: dict[str, Shape]) -> None:
    """Give the tensor ``name`` the manifest's shape: the shape the file holds for it (a buffer the file
    does not hold, such as a non-persistent one, must already have it)."""
    parent_name, _, attr = name.rpartition(".")
    try:
        owner: nn.Module | None = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        owner = None
    if owner is None or (attr not in owner._parameters and attr not in owner._buffers):
        raise StateDictError(
            f"{where} has tensor {name!r} but the architecture has none; build the right model"
        )
    old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if old is None or tuple(old.shape) == shape:
        return
    _held(stored, name, shape, where)
    fresh = torch.zeros(shape, dtype=old.dtype, device=old.device)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(fresh, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = fresh


def _load_weights(model: nn.Module, file: Path) -> None:
    from safetensors.torch import load_model

    try:
        load_model(model, str(file), strict=True)
    except RuntimeError as e:
        raise StateDictError(
            f"{file} does not fit the rebuilt model ({first_line(e)}); build the model the file was written from"
        ) from e


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
