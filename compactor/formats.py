"""Output formats: write the compacted model where users deploy it, and check each file before it lands.

======================  ======================================================================
suffix / ``format``     what is written
======================  ======================================================================
``.pt`` / ``pt``        the pickled module (``torch.save(model)``); needs the model's class to load
``.pt2`` / ``pt2``      ``torch.export`` program (``torch.export.save``); loads with
                        ``torch.export.load(path).module()`` without the class or compactor
``.onnx`` / ``onnx``    ONNX graph (dynamo exporter), checked by ``onnx.checker`` and ONNX Runtime
``.safetensors``        the weights (no pickle) plus a shape manifest in the safetensors metadata;
                        loads with :func:`load` given the function that builds the dense model
======================  ======================================================================

Every file is written to a temporary path, reloaded and run on the example inputs (and one fresh
random input of the same shapes), and only then moved into place: a file that does not reproduce the
model never appears. ``.pt`` and ``.safetensors`` must reproduce it bit for bit; ``.pt2`` and ``.onnx``
within ``tolerance * max(1, |output|)``. Exports trace the model in eval mode (inference).

The safetensors manifest
------------------------
A compacted model has the dense model's structure with smaller layers, so a state_dict alone does not
load into the class it came from. The manifest, stored as JSON under the metadata key
``"compactor.manifest"`` (one file, nothing beside it to lose), lists every layer the shrinker registry
knows (:mod:`compactor.layers`) with its type, channel counts and constructor attributes, plus the shapes
of bare parameters and buffers (LayerScale). :func:`load` builds the dense model, rebuilds each listed
layer to those shapes with its shrinker, and loads the weights with ``strict=True``. Example::

    {"version": 1,
     "layers": {"conv1": {"type": "Conv2d", "out": 5, "in": 3, "bias": null,
                          "attrs": {"in_channels": 3, "out_channels": 5, "groups": 1}}, ...},
     "tensors": {"gamma": [5, 1, 1]}}
"""

from __future__ import annotations

import copy
import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import ExportError, InputFileError, StateDictError, UnsupportedFormatError
from .graph import IN, OUT
from .inputs import ExampleInputs
from .layers import shrinker_for
from .masks import bake_masks, clone_module, has_pruning_state
from .save import save_module, write_atomically
from .verify import DEFAULT_TOLERANCE, NOISE_FACTOR, compare, reference_outputs

FORMATS: dict[str, str] = {".pt": "pt", ".pt2": "pt2", ".onnx": "onnx", ".safetensors": "safetensors"}
MANIFEST_KEY = "compactor.manifest"
MANIFEST_VERSION = 1
# Constructor attributes that fix a layer's shape; recorded when the layer has them.
SHAPE_ATTRS = (
    "in_channels",
    "out_channels",
    "groups",
    "in_features",
    "out_features",
    "num_features",
    "num_groups",
    "num_channels",
    "num_parameters",
    "num_embeddings",
    "embedding_dim",
)

Arch = Callable[[], nn.Module] | str  # a builder of the dense model, or "module:callable"


def format_for(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The format named by ``format`` or, when None, by the suffix of ``path``."""
    if format is not None:
        name = format.lower().lstrip(".")
        if name in FORMATS.values():
            return name
        raise UnsupportedFormatError(f"--format {format!r} is not supported; choose one of {_supported()}")
    suffix = Path(path).suffix.lower()
    if suffix in FORMATS:
        return FORMATS[suffix]
    raise UnsupportedFormatError(
        f"-o {path}: unknown suffix {suffix or '(none)'!r}; use one of {', '.join(FORMATS)} or pass --format {_supported()}"
    )


def save_output(
    model: nn.Module,
    path: str | os.PathLike[str],
    inputs: Any,
    *,
    format: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    arch: Arch | None = None,
) -> int:
    """Write ``model`` to ``path`` in the format of its suffix (or ``format``); return the bytes written.

    ``inputs``: the example inputs (tensor, tuple or dict) used to export and to check the file.
    ``arch`` (safetensors only, optional): the dense model's builder; when given, the check also
    rebuilds the model from it exactly as :func:`load` will. Raises
    :class:`~compactor.errors.ExportError` if the file cannot be written or does not reproduce the model.
    """
    kind = format_for(path, format)
    if kind != "pt" and has_pruning_state(model):  # prune hooks or parametrizations: write plain weights
        model = clone_module(model)
        bake_masks(model)
    example = ExampleInputs.of(inputs)
    with _eval_mode(model):
        if kind == "pt":  # the pickle round trip is torch's own and exact: save.save_module writes it
            return save_module(model, path)
        if kind == "onnx":  # checked against ONNX Runtime on the example inputs
            return write_atomically(path, lambda tmp: _write_onnx(model, tmp, example, tolerance))
        runs = [example, example.fresh(torch.Generator().manual_seed(0))]
        references = reference_outputs(model, runs)
        writers: dict[str, Callable[[Path], None]] = {
            "pt2": lambda tmp: _write_pt2(model, tmp, runs, references, tolerance),
            "safetensors": lambda tmp: _write_safetensors(model, tmp, runs, references, arch),
        }
        return write_atomically(path, writers[kind])


# --- writers ---------------------------------------------------------------------------------------
def _write_pt2(
    model: nn.Module, tmp: Path, runs: list[ExampleInputs], references: list[Any], tolerance: float
) -> None:
    example = runs[0]
    try:
        program = torch.export.export(model, example.args, example.kwargs)
        buffer = io.BytesIO()  # torch.export wants a path ending in .pt2 or a buffer; ours is a .tmp path
        torch.export.save(program, buffer)
        tmp.write_bytes(buffer.getvalue())
        reloaded = torch.export.load(io.BytesIO(tmp.read_bytes())).module()
    except Exception as e:  # torch.export raises many types for unsupported code
        raise ExportError(
            f"torch.export failed for {type(model).__name__} ({type(e).__name__}: {_first_line(e)}); "
            f"save as .pt or .safetensors instead, or make the forward exportable"
        ) from e
    _expect_same(_Callable(reloaded), runs, references, tolerance, tmp, "pt2")


def _write_safetensors(
    model: nn.Module, tmp: Path, runs: list[ExampleInputs], references: list[Any], arch: Arch | None
) -> None:
    from safetensors.torch import save_model

    metadata = {"format": "pt", MANIFEST_KEY: json.dumps(manifest(model), separators=(",", ":"))}
    try:
        save_model(model, str(tmp), metadata=metadata)
    except ValueError as e:
        raise ExportError(f"safetensors could not save {type(model).__name__}: {_first_line(e)}") from e
    target = arch if arch is not None else _same_model(model)
    _expect_same(load(target, tmp), runs, references, 0.0, tmp, "safetensors")


def _same_model(model: nn.Module) -> Callable[[], nn.Module]:
    return lambda: copy.deepcopy(model)


# --- the manifest ----------------------------------------------------------------------------------
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
            "attrs": {a: getattr(module, a) for a in SHAPE_ATTRS if isinstance(getattr(module, a, None), int)},
        }
        owned.update(_join(name, t) for t, _ in module.named_parameters(recurse=True))
        owned.update(_join(name, t) for t, _ in module.named_buffers(recurse=True))
    tensors = {
        name: list(t.shape)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if name not in owned
    }
    return {"version": MANIFEST_VERSION, "layers": layers, "tensors": tensors}


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest and metadata of a safetensors file written by compactor."""
    return _parse_manifest(_metadata(Path(path)), Path(path))


def fit_to_manifest(model: nn.Module, spec: dict[str, Any], where: str = "the file") -> nn.Module:
    """Rebuild the layers and bare tensors of the dense ``model`` to the shapes in ``spec``; return the root."""
    for name, entry in spec.get("layers", {}).items():
        model = _fit_layer(model, name, entry, where)
    for name, shape in spec.get("tensors", {}).items():
        _fit_tensor(model, name, shape, where)
    return model


def _fit_layer(root: nn.Module, name: str, entry: dict[str, Any], where: str) -> nn.Module:
    try:
        module = root.get_submodule(name)
    except AttributeError as e:
        raise StateDictError(
            f"{where} has layer {name!r} ({entry['type']}) but the architecture has none; build the model "
            f"the file was written from"
        ) from e
    shrinker = shrinker_for(module)
    if type(module).__name__ != entry["type"] or shrinker is None:
        raise StateDictError(
            f"{where}: layer {name!r} is {entry['type']} in the file but {type(module).__name__} in the "
            f"architecture; build the model the file was written from"
        )
    try:
        keep_out = _keep(module, shrinker.out_channels(module), entry["out"], name, OUT, where)
        keep_in = _keep(module, shrinker.in_channels(module), entry["in"], name, IN, where)
        new = module if keep_out is None and keep_in is None else shrinker.shrink(module, keep_out, keep_in)
    except StateDictError:
        raise
    except ValueError as e:
        raise StateDictError(f"{where}: layer {name!r} cannot be rebuilt to its saved shape ({e}); build the model the file was written from") from e
    _fit_bias(new, entry["bias"])
    for attr, value in entry["attrs"].items():
        if getattr(new, attr, None) != value:
            raise StateDictError(
                f"{where}: layer {name!r} has {attr}={getattr(new, attr, None)} after rebuilding but the file "
                f"says {value}; build the model the file was written from"
            )
    if new is module:
        return root
    if not name:
        return new
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
    return root


def _keep(module: nn.Module, dense: int | None, want: int | None, name: str, side: str, where: str) -> torch.Tensor | None:
    """``want`` of the ``dense`` channels, laid out as the layer can hold them (the file's values come next)."""
    if dense == want or dense is None or want is None:
        return None
    if want > dense:
        raise StateDictError(
            f"{where}: layer {name!r} has {want} {'output' if side == OUT else 'input'} channels but the "
            f"architecture only {dense}; --arch must build the dense model the compacted one came from"
        )
    return shrinker_for(module).layout(module, side, want)  # type: ignore[union-attr]


def _fit_bias(module: nn.Module, shape: list[int] | None) -> None:
    """A folded constant can give a layer a bias it was built without (see ``layers._add_to_bias``)."""
    bias = getattr(module, "bias", None)
    if shape is None and isinstance(bias, torch.Tensor):
        module.register_parameter("bias", None)
    elif shape is not None and bias is None:
        weight = module.weight
        module.bias = nn.Parameter(torch.zeros(shape, dtype=weight.dtype, device=weight.device), weight.requires_grad)


def _fit_tensor(root: nn.Module, name: str, shape: list[int], where: str) -> None:
    parent_name, _, attr = name.rpartition(".")
    try:
        owner = root.get_submodule(parent_name) if parent_name else root
    except AttributeError:
        owner = None
    if owner is None or (attr not in owner._parameters and attr not in owner._buffers):
        raise StateDictError(f"{where} has tensor {name!r} but the architecture has none; build the right model")
    old = owner._parameters.get(attr) if attr in owner._parameters else owner._buffers.get(attr)
    if old is None or list(old.shape) == shape:
        return
    fresh = torch.zeros(shape, dtype=old.dtype, device=old.device)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(fresh, requires_grad=old.requires_grad)
    else:
        owner._buffers[attr] = fresh


# --- loading ---------------------------------------------------------------------------------------
def load(arch: Arch, path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a model saved as ``.safetensors`` (dense or sparse storage): no pickle is read.

    ``arch``: a callable that builds the DENSE model (the class, or a function of no arguments), or the
    ``"module:callable"`` string of ``--arch``. The layers listed in the file's manifest are rebuilt to
    its shapes, then the weights are loaded with ``strict=True``. The model comes back in the mode the
    builder leaves it (usually training): call ``.eval()`` for inference, as after ``load_state_dict``.
    """
    file = Path(path)
    metadata = _metadata(file)
    if metadata.get("compactor.storage") == "sparse":
        from .sparse import load_sparse  # sparse storage builds on this module

        return load_sparse(file, arch)
    spec = _parse_manifest(metadata, file)
    model = fit_to_manifest(build(arch), spec, str(file))
    _load_weights(model, file)
    return model


def build(arch: Arch | nn.Module) -> nn.Module:
    """The dense model from a builder, a ``"module:callable"`` string, or a module (used as is)."""
    if isinstance(arch, nn.Module):
        return arch
    if isinstance(arch, str):
        from .state_dict import build_arch

        return build_arch(arch)
    model = arch()
    if not isinstance(model, nn.Module):
        raise StateDictError(f"the architecture builder returned a {type(model).__name__}, not an nn.Module")
    return model


def _load_weights(model: nn.Module, file: Path) -> None:
    from safetensors.torch import load_model

    try:
        load_model(model, str(file), strict=True)
    except RuntimeError as e:
        raise StateDictError(
            f"{file} does not fit the rebuilt model ({_first_line(e)}); build the model the file was written from"
        ) from e


def _metadata(file: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise InputFileError(f"{file} does not exist or is not a file; check the path")
    try:
        with safe_open(str(file), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise InputFileError(f"{file} is not a safetensors file ({_first_line(e)}); give a file written with -o x.safetensors") from e


def _parse_manifest(metadata: dict[str, str], file: Path) -> dict[str, Any]:
    text = metadata.get(MANIFEST_KEY)
    if text is None:
        raise InputFileError(
            f"{file} has no compactor manifest (metadata key {MANIFEST_KEY!r}); it was not written by "
            f"compactor: load it with safetensors.torch.load_model into a model of the right shapes"
        )
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{file}: the compactor manifest is not valid JSON ({e}); write the file again") from e
    if not isinstance(spec, dict) or spec.get("version") != MANIFEST_VERSION:
        raise InputFileError(
            f"{file}: compactor manifest version {spec.get('version') if isinstance(spec, dict) else '?'} is not "
            f"{MANIFEST_VERSION}; use the compactor version that wrote it"
        )
    return spec


# --- checks ----------------------------------------------------------------------------------------
def _expect_same(
    candidate: nn.Module, runs: list[ExampleInputs], references: list[Any], tolerance: float, file: Path, kind: str
) -> None:
    verdict = compare(candidate, runs, references, tolerance)
    if not verdict.ok:
        raise ExportError(
            f"the {kind} file does not reproduce the model ({verdict.summary()}); nothing was written: "
            f"report this, and save as .pt meanwhile"
        )


class _Callable(nn.Module):
    """Holds a callable that refuses ``.eval()`` (``torch.export``'s module) out of the module tree."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _supported() -> str:
    return "|".join(FORMATS.values())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --- ONNX ------------------------------------------------------------------------------------------
def _write_onnx(model: nn.Module, tmp: Path, example: ExampleInputs, tolerance: float) -> None:
    """Export and check with :mod:`compactor.onnx`, keeping the weights inside the one file."""
    from .onnx import check_onnx, export_onnx

    sidecar = tmp.with_name(tmp.name + ".data")  # the dynamo exporter's default external-data file
    try:
        export_onnx(model, example, tmp)
        _inline_external_data(tmp, sidecar)
        check_onnx(tmp, model, example, _runtime_tolerance(model, example, tolerance))
    finally:
        sidecar.unlink(missing_ok=True)


def _runtime_tolerance(model: nn.Module, example: ExampleInputs, tolerance: float) -> float:
    """The tolerance for another runtime's float kernels: at least ``NOISE_FACTOR`` times torch's own
    rounding error (float32 against a float64 twin, relative to the output's scale), as verification allows.

    ONNX Runtime sums in another order than torch: on a deep network (ResNet-152) the two differ by ~6e-4
    on the dense model too, while an export that computes something else differs by orders of magnitude more.
    """
    if not any(p.is_floating_point() for p in model.parameters()):
        return tolerance
    wide = copy.deepcopy(model).to(torch.float64)
    wide_example = example.widened()
    (narrow_out,), (wide_out,) = reference_outputs(model, [example]), reference_outputs(wide, [wide_example])
    relative = 0.0
    for (_, a), (_, b) in zip(narrow_out, wide_out):
        if a.is_floating_point() and a.numel():
            scale = max(1.0, b.abs().max().item())
            relative = max(relative, (a.double() - b).abs().max().item() / scale)
    return max(tolerance, NOISE_FACTOR * relative)


def _inline_external_data(file: Path, sidecar: Path) -> None:
    """Move external weights into the model file: the sidecar is named after the temporary path."""
    import onnx

    if not sidecar.exists():
        return
    proto = onnx.load(str(file), load_external_data=True)
    if proto.ByteSize() >= 2**31:
        raise ExportError(
            f"the ONNX model is {proto.ByteSize() / 2**30:.1f} GiB, over protobuf's 2 GiB single-file limit; "
            f"save as .pt2 or .safetensors instead"
        )
    onnx.save_model(proto, str(file), save_as_external_data=False)


__all__ = [
    "FORMATS",
    "MANIFEST_KEY",
    "build",
    "fit_to_manifest",
    "format_for",
    "load",
    "manifest",
    "read_manifest",
    "save_output",
]
