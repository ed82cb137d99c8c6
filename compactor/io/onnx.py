"""ONNX: export a (compacted) model, prove ONNX Runtime computes what torch computes, time it.

``export_onnx`` tries ``torch.onnx.export``'s default dynamo exporter (it needs the ``onnxscript`` package)
and falls back to the TorchScript exporter (``dynamo=False``), saying which one wrote the file and why the
first failed. ``check_onnx`` runs ``onnx.checker`` and compares every ONNX Runtime output with torch,
collecting all failures before raising one :class:`~compactor.errors.ExportError`.
"""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, first_line
from ..inputs import ExampleInputs, flatten_outputs
from ..outputs import DEFAULT_TOLERANCE, compare_outputs, runtime_tolerance
from .shapes import (
    ExportShapes,
    asked_dims,
    export_spec,
    input_names,
    plain_outputs,
    quiet_loggers,
    second_inputs,
    trace_inputs,
)


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    seconds: float
    fallback_reason: str | None = None  # why the dynamo exporter was not used
    shapes: ExportShapes | None = None  # which dimensions are dynamic


def export_onnx(
    model: nn.Module,
    inputs: Any,
    path: str | Path,
    *,
    opset: int | None = None,
    dynamo: bool | None = None,
    dynamic: bool = False,
) -> OnnxExport:
    """Export ``model`` called on ``inputs`` to ``path``.

    ``dynamo=None`` tries the dynamo exporter, then the TorchScript one; ``True``/``False`` forces one.
    ``dynamic``: a dynamic batch dimension (and sequence length of integer inputs), where the model allows
    it (:mod:`compactor.io.shapes`); the returned :class:`OnnxExport` says which stayed static. Raises
    :class:`ExportError` naming both failures when no exporter succeeds.
    """
    example = ExampleInputs.of(inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    asked = asked_dims(example, static=not dynamic)
    reason = None
    if dynamo is not False:
        start = time.perf_counter()
        try:
            fallback = _export_dynamic_or_static(model, example, path, opset, asked, dynamo=True)
            shapes = _shapes_of(path, example, asked, fallback)
            return OnnxExport(path, "dynamo", time.perf_counter() - start, shapes=shapes)
        except Exception as e:  # the exporter's failures have no common type; keep the first line
            reason = first_line(e, with_type=True)
            if dynamo is True:
                raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {reason}") from e
    start = time.perf_counter()
    try:
        fallback = _export_dynamic_or_static(model, example, path, opset, asked, dynamo=False)
    except Exception as e:
        raise ExportError(
            f"ONNX export of {type(model).__name__} to {path} failed with both exporters: "
            f"dynamo: {reason}; torchscript: {first_line(e, with_type=True)}"
        ) from e
    shapes = _shapes_of(path, example, asked, fallback)
    return OnnxExport(path, "torchscript", time.perf_counter() - start, reason, shapes)


def _export_dynamic_or_static(
    model: nn.Module,
    example: ExampleInputs,
    path: Path,
    opset: int | None,
    asked: dict[str, tuple[int, ...]],
    *,
    dynamo: bool,
) -> str | None:
    """Export with the ``asked`` dynamic dimensions; if that fails, at the example's shapes. Returns why
    the dynamic export failed (None when it did not, or none was asked)."""
    if not any(asked.values()):
        _export(model, example, path, opset, dynamo=dynamo, asked=asked)
        return None
    try:
        _export(model, example, path, opset, dynamo=dynamo, asked=asked)
        return None
    except Exception as e:  # the exporter's failures have no common type
        reason = first_line(e, with_type=True)
    _export(model, example, path, opset, dynamo=dynamo, asked={k: () for k in asked})
    return reason


def _export(
    model: nn.Module,
    inputs: ExampleInputs,
    path: Path,
    opset: int | None,
    *,
    dynamo: bool,
    asked: dict[str, tuple[int, ...]],
) -> None:
    names = [f"input_{i}" for i in range(len(inputs.args))] + list(inputs.kwargs)
    traced = trace_inputs(inputs, asked)
    quiet = io.StringIO()  # the dynamo exporter prints progress lines and logs optimiser chatter
    dynamic = any(asked.values())
    axes = {
        onnx_name: {d: f"{onnx_name}_dim{d}" for d in dims}
        for onnx_name, dims in zip(names, asked.values())
        if dims
    }
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), quiet_loggers(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            plain_outputs(model, inputs),
            traced.args,
            str(path),
            kwargs=dict(traced.kwargs) or None,
            input_names=None if dynamo else names,
            opset_version=opset,
            dynamo=dynamo,
            dynamic_shapes=export_spec(inputs, asked) if dynamo and dynamic else None,
            dynamic_axes=axes if not dynamo and dynamic else None,
            verbose=False,
        )


def _shapes_of(
    path: Path, example: ExampleInputs, asked: dict[str, tuple[int, ...]], fallback: str | None
) -> ExportShapes:
    """Which asked dimensions the ONNX graph's inputs left fixed."""
    import onnx

    sizes = {
        n: tuple(t.shape) for n, t in zip(input_names(example), [*example.args, *example.kwargs.values()])
    }
    if fallback is not None:
        return ExportShapes(not any(asked.values()), asked, dict(asked), sizes, fallback=fallback)
    if not any(asked.values()):  # nothing to look up: do not read a file as large as the model again
        return ExportShapes(True, asked, dict(asked), sizes)
    graph = onnx.load(str(path), load_external_data=False).graph
    fixed = {}
    for name, value in zip(input_names(example), graph.input):
        dims = value.type.tensor_type.shape.dim
        fixed[name] = tuple(d for d in asked[name] if d < len(dims) and not dims[d].dim_param)
    return ExportShapes(not any(asked.values()), asked, fixed, sizes)


def ort_session(path: str | Path | bytes, *, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with a fixed number of intra-op threads (and one inter-op thread), from a
    file or a serialised model."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        source = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        what = "a serialised model" if isinstance(path, bytes) else path
        raise ExportError(f"ONNX Runtime cannot load {what}: {first_line(e, with_type=True)}") from e


def ort_feed(session: Any, inputs: ExampleInputs) -> dict[str, Any]:
    """Map the example inputs onto the session's inputs: keywords by name, positionals in order."""
    wanted = [i.name for i in session.get_inputs()]
    positional = list(inputs.args)
    feed = {}
    for name in wanted:
        if name in inputs.kwargs:
            tensor = inputs.kwargs[name]
        elif positional:
            tensor = positional.pop(0)
        else:
            raise ExportError(
                f"the ONNX model wants input {name!r} that the example inputs [{inputs.describe()}] do not provide"
            )
        feed[name] = tensor.detach().cpu().numpy()
    return feed


def check_onnx(
    path: str | Path,
    model: nn.Module,
    inputs: Any,
    tolerance: float = DEFAULT_TOLERANCE,
    *,
    threads: int = 1,
    full_check: bool = True,
) -> float:
    """Check ``path`` with ``onnx.checker`` and compare ONNX Runtime's outputs with ``model``'s.

    Returns the max abs error over all outputs; raises :class:`ExportError` (one line, every failing output
    named with its error and the tolerance) when an output differs by more than
    ``tolerance * max(1, max|torch output|)`` or has another shape.
    """
    import onnx

    example = ExampleInputs.of(inputs)
    try:
        if full_check:
            onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:  # onnx.checker.ValidationError, or a shape-inference error
        raise ExportError(f"{path} is not a valid ONNX model: {first_line(e, with_type=True)}") from e
    with torch.inference_mode():
        expected = flatten_outputs(model.eval()(*example.args, **example.kwargs))
    session = ort_session(path, threads=threads)
    got = session.run(None, ort_feed(session, example))
    if len(got) != len(expected):
        raise ExportError(
            f"{path}: ONNX Runtime returns {len(got)} outputs, torch returns {len(expected)} "
            f"({', '.join(n for n, _ in expected)})"
        )
    actual = [(name, torch.from_numpy(value)) for (name, _), value in zip(expected, got)]
    worst, problems = compare_outputs([(n, t.cpu()) for n, t in expected], actual, tolerance, sep=": ")
    if problems:
        raise ExportError(
            f"{path}: ONNX Runtime differs from torch (tolerance {tolerance:g}): " + "; ".join(problems)
        )
    return worst


def write_onnx(
    model: nn.Module, tmp: Path, example: ExampleInputs, tolerance: float, *, static: bool = False
) -> ExportShapes:
    """Export and check, keeping the weights inside the one file; the check runs at the example's shape and,
    where the export is dynamic, at a second batch size (and sequence length), and allows ONNX Runtime the
    float rounding torch itself has on this model (:func:`compactor.engine.verify.runtime_tolerance`)."""
    sidecar = tmp.with_name(tmp.name + ".data")  # the dynamo exporter's default external-data file
    try:
        done = export_onnx(model, example, tmp, dynamic=not static)
        _inline_external_data(tmp, sidecar)
        assert done.shapes is not None
        allowed = runtime_tolerance(model, example, tolerance)
        check_onnx(tmp, model, example, allowed)
        second = second_inputs(example, done.shapes.dynamic, torch.Generator().manual_seed(1))
        if second is not None:
            check_onnx(tmp, model, second, allowed, full_check=False)
    finally:
        sidecar.unlink(missing_ok=True)
    return done.shapes


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
