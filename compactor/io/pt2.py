"""``.pt2``: a ``torch.export`` program, which loads with ``torch.export.load(path).module()`` without the
model's class or compactor."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

from ..engine.verify import Outputs
from ..errors import ExportError, InputFileError, first_line
from ..inputs import ExampleInputs
from .check import CallableModule, expect_same


def write_pt2(
    model: nn.Module, tmp: Path, runs: list[ExampleInputs], references: list[Outputs], tolerance: float
) -> None:
    """Export ``model`` on the first run's inputs to ``tmp``, reload it and check it on every run."""
    example = runs[0]
    try:
        program = torch.export.export(model, example.args, example.kwargs)
        buffer = io.BytesIO()  # torch.export wants a path ending in .pt2 or a buffer; ours is a .tmp path
        torch.export.save(program, buffer)
        tmp.write_bytes(buffer.getvalue())
        reloaded = read_pt2(tmp)
    except Exception as e:  # torch.export raises many types for unsupported code
        raise ExportError(
            f"torch.export failed for {type(model).__name__} ({type(e).__name__}: {first_line(e)}); "
            f"save as .pt or .safetensors instead, or make the forward exportable"
        ) from e
    expect_same(reloaded, runs, references, tolerance, tmp, "pt2")


def read_pt2(path: str | os.PathLike[str]) -> nn.Module:
    """The module of a ``.pt2`` program, callable like the model it was exported from."""
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"{file} does not exist or is not a file; check the path")
    try:
        module = torch.export.load(io.BytesIO(file.read_bytes())).module()
    except Exception as e:  # torch.export raises many types for files it cannot read
        raise InputFileError(
            f"{file} is not a torch.export program ({first_line(e, with_type=True)}); give a .pt2 written by compact"
        ) from e
    return CallableModule(module)
