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

from .errors import ExportError
from .inputs import ExampleInputs, flatten_outputs

DEFAULT_TOLERANCE = 1e-4  # max|ort - torch| <= tolerance * max(1, max|torch|), as in compactor.verify


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str  # "dynamo" or "torchscript"
    seconds: float
    fallback_reason: str | None = None  # why the dynamo exporter was not used

    def describe(self) -> str:
        why = f" (dynamo exporter failed: {self.fallback_reason})" if self.fallback_reason else ""
        return f"{self.path} written by the {self.exporter} exporter in {self.seconds:.1f} s{why}"


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
            reason = _first_line(e)
            if dynamo is True:
                raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {reason}") from e
    start = time.perf_counter()
    try:
        _export(model, example, path, opset, dynamo=False)
    except Exception as e:
        raise ExportError(
            f"ONNX export of {type(model).__name__} to {path} failed with both exporters: "
            f"dynamo: {reason}; torchscript: {_first_line(e)}"
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
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "torch._export", "torch.export")]
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
        raise ExportError(f"ONNX Runtime cannot load {path}: {_first_line(e)}") from e


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
        raise ExportError(f"{path} is not a valid ONNX model: {_first_line(e)}") from e
    with torch.inference_mode():
        expected = flatten_outputs(model.eval()(*example.args, **example.kwargs))
    session = ort_session(path, threads=threads)
    got = session.run(None, ort_feed(session, example))
    if len(got) != len(expected):
        raise ExportError(
            f"{path}: ONNX Runtime returns {len(got)} outputs, torch returns {len(expected)} "
            f"({', '.join(n for n, _ in expected)})"
        )
    problems, worst = [], 0.0
    for (name, reference), value in zip(expected, got):
        actual = torch.from_numpy(value)
        if tuple(actual.shape) != tuple(reference.shape):
            problems.append(f"{name}: shape {tuple(actual.shape)} != torch {tuple(reference.shape)}")
            worst = float("inf")
            continue
        error = float((actual.double() - reference.double().cpu()).abs().max()) if reference.numel() else 0.0
        worst = max(worst, error)
        bound = tolerance * max(1.0, float(reference.double().abs().max()) if reference.numel() else 1.0)
        if not error <= bound:
            problems.append(f"{name}: max abs error {error:.3g} > {bound:.3g}")
    if problems:
        raise ExportError(f"{path}: ONNX Runtime differs from torch (tolerance {tolerance:g}): " + "; ".join(problems))
    return worst


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
