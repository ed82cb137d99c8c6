"""ONNX: export a (compacted) model, prove ONNX Runtime computes what torch computes, time it.

``export_onnx`` tries ``torch.onnx.export``'s default dynamo exporter (it needs the ``onnxscript`` package)
and falls back to the TorchScript exporter (``dynamo=False``), saying which one wrote the file and why the
first failed. ``check_onnx`` runs ``onnx.checker`` and compares every ONNX Runtime output with torch,
collecting all failures before raising one :class:`~compactor.errors.ExportError`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..engine.verify import DEFAULT_TOLERANCE, compare_outputs, runtime_tolerance
from ..errors import ExportError, first_line
from ..inputs import ExampleInputs, flatten_outputs


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    seconds: float
    fallback_reason: str | None = None  # why the dynamo exporter was not used


def export_onnx(
    model: nn.Module, inputs: Any, path: str | Path, *, opset: int | None = None, dynamo: bool | None = None
) -> OnnxExport:
    """Export ``model`` called on ``inputs`` to ``path``.

    ``dynamo=None`` tries the dynamo exporter, then the TorchScript one; ``True``/``False`` forces one.
    Raises :class:`ExportError` naming both failures when no exporter succeeds.
    """
    example = ExampleInputs.of(inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    reason = None
    if dynamo is not False:
        start = time.perf_counter()
        try:
            _export(model, example, path, opset, dynamo=True)
            return OnnxExport(path, "dynamo", time.perf_counter() - start)
        except Exception as e:  # the exporter's failures have no common type; keep the first line
            reason = first_line(e, with_type=True)
            if dynamo is True:
                raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {reason}") from e
    start = time.perf_counter()
    try:
        _export(model, example, path, opset, dynamo=False)
    except Exception as e:
        raise ExportError(
            f"ONNX export of {type(model).__name__} to {path} failed with both exporters: "
            f"dynamo: {reason}; torchscript: {first_line(e, with_type=True)}"
        ) from e
    return OnnxExport(path, "torchscript", time.perf_counter() - start, reason)


def _export(model: nn.Module, inputs: ExampleInputs, path: Path, opset: int | None, *, dynamo: bool) -> None:
    names = [f"input_{i}" for i in range(len(inputs.args))] + list(inputs.kwargs)
    quiet = io.StringIO()  # the dynamo exporter prints progress lines and logs optimiser chatter
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), _quiet_loggers(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs.args,
            str(path),
            kwargs=dict(inputs.kwargs) or None,
            input_names=None if dynamo else names,
            opset_version=opset,
            dynamo=dynamo,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_loggers() -> Iterator[None]:
    loggers = [
        logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch._export", "torch.export")
    ]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def ort_session(path: str | Path, *, threads: int = 1) -> Any:
    """A CPU ONNX Runtime session with a fixed number of intra-op threads (and one inter-op thread)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind exception types
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(e, with_type=True)}") from e


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
    path: str | Path, model: nn.Module, inputs: Any, tolerance: float = DEFAULT_TOLERANCE, *, threads: int = 1
) -> float:
    """Check ``path`` with ``onnx.checker`` and compare ONNX Runtime's outputs with ``model``'s.

    Returns the max abs error over all outputs; raises :class:`ExportError` (one line, every failing output
    named with its error and the tolerance) when an output differs by more than
    ``tolerance * max(1, max|torch output|)`` or has another shape.
    """
    import onnx

    example = ExampleInputs.of(inputs)
    try:
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


def write_onnx(model: nn.Module, tmp: Path, example: ExampleInputs, tolerance: float) -> None:
    """Export and check, keeping the weights inside the one file; the check allows ONNX Runtime the float
    rounding torch itself has on this model (:func:`compactor.engine.verify.runtime_tolerance`)."""
    sidecar = tmp.with_name(tmp.name + ".data")  # the dynamo exporter's default external-data file
    try:
        export_onnx(model, example, tmp)
        _inline_external_data(tmp, sidecar)
        check_onnx(tmp, model, example, runtime_tolerance(model, example, tolerance))
    finally:
        sidecar.unlink(missing_ok=True)


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
