"""Stage 7, save: write the compacted model in the format its path names, checked before it lands.

======================  ======================================================================
suffix / ``format``     what is written
======================  ======================================================================
``.pt`` / ``pt``        the pickled module (``torch.save(model)``); needs the model's class to load
``.pt2`` / ``pt2``      ``torch.export`` program (``torch.export.save``); loads with
                        ``torch.export.load(path).module()`` without the class or compactor
``.onnx`` / ``onnx``    ONNX graph (dynamo exporter), checked by ``onnx.checker`` and ONNX Runtime
``.safetensors``        the weights (no pickle) plus a shape manifest in the safetensors metadata
======================  ======================================================================

Every file is written to a temporary path, reloaded and run on the example inputs (and one fresh
random input of the same shapes), and only then moved into place: a file that does not reproduce the
model never appears. ``.pt`` and ``.safetensors`` must reproduce it to a few units in the last place
(tolerance 0 in :func:`~compactor.engine.verify.compare_outputs`); ``.pt2`` within
``tolerance * max(1, |output|)``; ``.onnx`` within that or torch's own float rounding on the model, if
larger. Exports trace the model in eval mode (inference). Every format loads with ``compactor.load``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedFormatError
from ..inputs import ExampleInputs
from ..modules import baked
from ..outputs import DEFAULT_TOLERANCE, reference_outputs
from ..util import eval_mode_restored
from .arch import Arch
from .atomic import write_atomically
from .hf import write_hf
from .onnx import write_onnx
from .pt import write_pt
from .pt2 import write_pt2
from .safetensors import write_safetensors
from .shapes import ExportShapes

FORMATS: dict[str, str] = {
    ".pt": "pt",
    ".pth": "pt",
    ".pt2": "pt2",
    ".onnx": "onnx",
    ".safetensors": "safetensors",
}


def format_for(path: str | os.PathLike[str], format: str | None = None) -> str:
    """The format named by ``format`` or, when None, by the suffix of ``path``."""
    if format is not None:
        name = format.lower().lstrip(".")
        if name in FORMATS.values() or name == "hf":
            return name
        raise UnsupportedFormatError(f"--format {format!r} is not supported; choose one of {_supported()}")
    suffix = Path(path).suffix.lower()
    if Path(path).is_dir() or str(path).endswith(os.sep) or (not suffix and not Path(path).exists()):
        return "hf"  # a directory, existing or new: config.json + model.safetensors (a transformers model)
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
    static_shapes: bool = False,
    keep_example_inputs: bool = False,
    record: dict[str, Any] | None = None,
) -> int:
    """Write ``model`` to ``path`` in the format of its suffix (or ``format``); return the bytes written.

    ``inputs``: the example inputs (tensor, tuple or dict) used to export and to check the file.
    ``arch`` (safetensors only, optional): the dense model's builder; when given, the check also
    rebuilds the model from it exactly as ``compactor.load`` will. ``.pt2`` and ``.onnx`` get a dynamic
    batch dimension (and sequence length for integer inputs) unless ``static_shapes``; ``record`` (a dict)
    receives what the export gave (``record["export"]``: dynamic and fixed dimensions, output kind).
    ``keep_example_inputs``: keep the example inputs inside a ``.pt2`` (left out by default). Raises
    :class:`~compactor.errors.ExportError` if the file cannot be written or does not reproduce the model.
    """
    kind = format_for(path, format)
    if kind != "pt":  # prune hooks or parametrizations: write plain weights
        model = baked(model, copy=False)
    example = ExampleInputs.of(inputs)
    with eval_mode_restored(model):
        shapes: list[ExportShapes] = []
        if kind == "hf":
            runs = [example, example.fresh(torch.Generator().manual_seed(0))]
            info = write_hf(model, Path(path), runs, reference_outputs(model, runs))
            if record is not None:
                record["hf"] = info
            return int(info["bytes"])
        if kind == "onnx":  # checked against ONNX Runtime on the example inputs
            size = write_atomically(
                path,
                lambda tmp: shapes.append(write_onnx(model, tmp, example, tolerance, static=static_shapes)),
            )
        else:
            runs = [example, example.fresh(torch.Generator().manual_seed(0))]
            references = reference_outputs(model, runs)
            if kind == "pt":
                return write_pt(model, path, runs, references)
            writers: dict[str, Callable[[Path], object]] = {
                "pt2": lambda tmp: shapes.append(
                    write_pt2(
                        model,
                        tmp,
                        runs,
                        references,
                        tolerance,
                        static=static_shapes,
                        keep_example_inputs=keep_example_inputs,
                    )
                ),
                "safetensors": lambda tmp: write_safetensors(model, tmp, runs, references, arch),
            }
            size = write_atomically(path, writers[kind])
    if record is not None and shapes:
        record["export"] = shapes[0].to_dict()
    return size


def _supported() -> str:
    return "|".join([*dict.fromkeys(FORMATS.values()), "hf"])
