"""``.pt2``: a ``torch.export`` program, which loads with ``torch.export.load(path).module()`` without the
model's class, transformers or compactor: it returns plain tensors, tuples and dicts, and runs at any batch
size (and sequence length) unless exported with ``static=True`` (:mod:`compactor.io.shapes`)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, InputFileError, first_line
from ..inputs import ExampleInputs
from ..outputs import Outputs, reference_outputs
from .check import CallableModule, expect_same
from .pt2_members import check_members
from .shapes import (
    ExportShapes,
    PlainOutputs,
    asked_dims,
    export_spec,
    fixed_dims,
    input_names,
    kind_of_outputs,
    plain_outputs,
    quiet_loggers,
    second_inputs,
    trace_inputs,
)


def write_pt2(
    model: nn.Module,
    tmp: Path,
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float,
    *,
    static: bool = False,
    keep_example_inputs: bool = False,
) -> ExportShapes:
    """Export ``model`` to ``tmp`` with a dynamic batch (and sequence) dimension unless ``static``, reload
    it and check it on every run and at a second batch size (and sequence length). The program returns
    plain tensors, tuples and dicts, and holds no example inputs unless ``keep_example_inputs``."""
    example = runs[0]
    wrapped = plain_outputs(model, example)
    program, shapes = _export(wrapped, example, static)
    try:
        if not keep_example_inputs:
            program._example_inputs = None  # a 600 KB batch of tokens has no place in a 400 KB model
        buffer = io.BytesIO()  # torch.export wants a path ending in .pt2 or a buffer; ours is a .tmp path
        torch.export.save(program, buffer)
        tmp.write_bytes(buffer.getvalue())
        reloaded = read_pt2(tmp)
    except Exception as e:  # torch.export raises many types for unsupported code
        raise _failed(model, e) from e
    shapes.outputs = kind_of_outputs(
        program.call_spec.out_spec.type
    )  # read from the program: no extra forward
    second = second_inputs(example, shapes.dynamic, torch.Generator().manual_seed(1))
    if second is not None:
        runs, references = [*runs, second], [*references, *reference_outputs(model, [second])]
    expect_same(reloaded, runs, references, tolerance, tmp, "pt2")
    return shapes


def _export(wrapped: nn.Module, example: ExampleInputs, static: bool) -> tuple[Any, ExportShapes]:
    """The exported program and its shapes: dynamic where asked and possible, else static, saying why."""
    asked = asked_dims(example, static)
    sizes = {
        n: tuple(t.shape) for n, t in zip(input_names(example), [*example.args, *example.kwargs.values()])
    }
    traced = trace_inputs(example, asked)
    try:
        with quiet_loggers():  # a failed dynamic trace logs its error before raising it
            program = torch.export.export(
                wrapped, traced.args, traced.kwargs, dynamic_shapes=export_spec(example, asked)
            )
        return program, ExportShapes(static, asked, fixed_dims(program, example, asked), sizes)
    except Exception as e:  # torch.export raises many types for unsupported code
        if not any(asked.values()):
            raise _failed(wrapped, e) from e
        reason = first_line(e, with_type=True)
    try:
        program = torch.export.export(wrapped, example.args, example.kwargs)
    except Exception as e:
        raise _failed(wrapped, e) from e
    return program, ExportShapes(static, asked, dict(asked), sizes, fallback=reason)


def _failed(model: nn.Module, e: Exception) -> ExportError:
    inner = model.model if isinstance(model, PlainOutputs) else model
    return ExportError(
        f"torch.export failed for {type(inner).__name__} ({type(e).__name__}: {first_line(e)}); "
        f"save as .pt or .safetensors instead, or make the forward exportable"
    )


def read_pt2(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> nn.Module:
    """The module of a ``.pt2`` program, callable like the model it was exported from. Members the
    archive would unpickle must be tensors only (:func:`~compactor.io.pt2_members.check_members`) unless
    ``trust_pickle``."""
    file = Path(path)
    if not file.is_file():
        raise InputFileError(f"{file} does not exist or is not a file; check the path")
    data = file.read_bytes()  # read once: the bytes checked are the bytes loaded
    if not trust_pickle:
        check_members(file, data)
    try:
        module = torch.export.load(io.BytesIO(data)).module()
    except Exception as e:  # torch.export raises many types for files it cannot read
        raise InputFileError(
            f"{file} is not a torch.export program ({first_line(e, with_type=True)}); give a .pt2 written by compact"
        ) from e
    return CallableModule(module)
