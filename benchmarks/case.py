"""One benchmark case (model x sparsity x round_to), run in its own process so its peak memory is its own.

``python -m benchmarks.case SPEC_JSON OUT_JSON``: builds and prunes the model, compacts it (timed, peak RSS
of the compaction alone), then measures params, MACs, file bytes, max abs error and latency per backend
with dense and compacted timed interleaved. Writes one JSON object; a failure is recorded, not raised.
"""

from __future__ import annotations

import gc
import inspect
import io
import json
import os
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import compactor
from compactor.errors import ExportError
from compactor.io.onnx import check_onnx, export_onnx
from compactor.measure.timing import count_macs, latency
from compactor.modules import bake_masks
from compactor.report.report import why_not_faster

from .models import ZOO

# ONNX Runtime fuses conv+BN and reorders sums: on a 152-layer random-weight ResNet its outputs differ from
# torch's by ~7e-4 relative, for the dense model as much as the compacted one. 1e-3 still catches a wrong graph.
ORT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class CaseSpec:
    model: str
    sparsity: float
    round_to: int | str | None = None  # a multiple, or "auto" (widths timed on ``target``)
    quick: bool = False
    backends: tuple[str, ...] = ("torch-cpu", "onnxruntime-cpu", "cuda")
    threads: int = 1
    warmup: int = 3
    repeats: int = 15
    target: str | None = None  # round_to="auto": the backend it times widths on (and the only one timed)
    fold_bn: bool = False  # BatchNorm folded into the convs of dense and compacted alike before timing
    # round_to values compacted from one model and timed together, per backend, in one interleaved run (auto:
    # tuned for the backend it is timed on); the issue-13 comparison without the noise between cases
    side_by_side: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        suffix = f" round_to={self.round_to}" if self.round_to else ""
        suffix += f" ({self.target})" if self.target else ""
        suffix += " BN folded" if self.fold_bn else ""
        suffix += f" round_to {'/'.join(self.side_by_side)} side by side" if self.side_by_side else ""
        return f"{self.model} @{self.sparsity:.0%}{suffix}"


def supports_round_to() -> bool:
    return "round_to" in inspect.signature(compactor.compact).parameters


def run_case(spec: CaseSpec) -> dict[str, Any]:
    result: dict[str, Any] = {"spec": asdict(spec), "label": spec.label}
    if spec.round_to and not supports_round_to():
        result["skipped"] = "compactor.compact() has no round_to parameter yet"
        return result
    try:
        (_side_by_side if spec.side_by_side else _measure)(spec, result)
    except Exception as e:  # a benchmark records a failing model and goes on to the next one
        result["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        result["traceback"] = traceback.format_exc(limit=8)
    return result


def _measure(spec: CaseSpec, result: dict[str, Any]) -> None:
    torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    model, inputs = ZOO[spec.model].make(spec.sparsity, quick=spec.quick)
    result["build_seconds"] = time.perf_counter() - start
    result["inputs"] = inputs.describe()

    gc.collect()
    rss_before = _rss_bytes()
    reset = _reset_peak_rss()
    kwargs: dict[str, Any] = {"round_to": spec.round_to} if spec.round_to else {}
    if spec.round_to == "auto":
        from compactor.measure.probes import BackendTimer

        kwargs["timer"] = BackendTimer(spec.target or "torch-cpu", threads=spec.threads)  # type: ignore[arg-type]
    stages = _StagePeaks(reset)
    start = time.perf_counter()
    small, report = compactor.compact(model, inputs, log=stages, **kwargs)
    result["compact_seconds"] = time.perf_counter() - start
    stages("done")
    peak = stages.peak() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["memory"] = {
        "rss_before_compact": rss_before,
        "peak_rss_during_compact": peak,
        "peak_source": "VmHWM after clear_refs" if reset else "ru_maxrss (includes building the model)",
        **({"stage_peaks": stages.peaks, "peak_rss_analysis": stages.peak(timing=False)} if reset else {}),
    }
    result["stage_seconds"] = report.seconds
    result["max_abs_error"] = report.max_abs_error
    result["channels"] = report.to_dict()["channels"]
    filters = report.to_dict()["pruned_filters"]
    result["pruned_filters"] = {k: filters[k] for k in ("total", "removed", "kept", "kept_by_reason")}
    result["warnings"] = list(report.warnings)
    if "auto" in report.extra:
        result["auto"] = report.extra["auto"]

    dense = model
    bake_masks(dense)  # the dense baseline: same zeros, plain weights, no pruning hooks
    dense.eval()
    small.eval()
    if spec.fold_bn:
        dense, small = fold_batchnorm(dense), fold_batchnorm(small)
    result["params"] = report.params
    result["param_bytes_dense"] = sum(p.numel() * p.element_size() for p in dense.parameters())
    result["file_bytes"] = {"before": _state_dict_bytes(dense), "after": _state_dict_bytes(small)}
    result["module_file_bytes"] = report.file_bytes
    result["macs"] = {"before": count_macs(dense, inputs), "after": count_macs(small, inputs)}

    timings: dict[str, Any] = {}
    for backend in spec.backends:
        timings[backend] = _time_backend(backend, dense, small, inputs, spec)
    result["latency"] = timings
    if not spec.fold_bn:
        result["why_not_faster"] = _why_not_faster(report, result)


def _side_by_side(spec: CaseSpec, result: dict[str, Any]) -> None:
    """One model compacted at each of ``spec.side_by_side``; per backend, dense and every variant timed in
    one interleaved run (``round_to=auto`` compacted for that backend)."""
    from compactor.measure.probes import BackendTimer

    torch.set_num_threads(spec.threads)
    model, inputs = ZOO[spec.model].make(spec.sparsity, quick=spec.quick)
    result["inputs"] = inputs.describe()
    fixed: dict[str, nn.Module] = {}
    params: dict[str, int] = {}
    for r in (v for v in spec.side_by_side if v != "auto"):
        small, report = compactor.compact(model, inputs, round_to=int(r))
        fixed[r], params[r] = small.eval(), report.params["after"]
    dense = model
    bake_masks(dense)
    dense.eval()
    params["dense"] = sum(p.numel() for p in dense.parameters())
    out: dict[str, Any] = {}
    for backend in spec.backends:
        if backend == "cuda" and not torch.cuda.is_available():
            continue
        variants = dict(fixed)
        if "auto" in spec.side_by_side:
            timer = BackendTimer(backend, threads=spec.threads)  # type: ignore[arg-type]
            small, report = compactor.compact(dense, inputs, round_to="auto", timer=timer)
            variants["auto"] = small.eval()
            out.setdefault("auto_params", {})[backend] = report.params["after"]
            out.setdefault("auto_whole", {})[backend] = report.extra["auto"].get("whole")
        timing = _time_backend(backend, dense, variants, inputs, spec)
        out[backend] = timing
    result["side_by_side"] = {"params": params, **out}


def _why_not_faster(report: compactor.CompactionReport, result: dict[str, Any]) -> list[str]:
    """The compactor report's "why not faster" lines for the latencies measured here (no extra timing: the
    slowest layers are listed where round_to=auto timed them)."""
    measured = {
        b: {"before": t["dense"]["median_ms"], "after": t["compact"]["median_ms"]}
        for b, t in result["latency"].items()
        if "dense" in t and "compact" in t
    }
    return why_not_faster(report.with_extra(macs=result["macs"], latency_ms=measured))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every BatchNorm that follows a conv folded into it (``torch.fx``),
    as ONNX Runtime does: what eager PyTorch could reach without a separate pass per BatchNorm."""
    from torch.fx.experimental.optimization import fuse

    fused: nn.Module = fuse(model.eval(), inplace=False)
    return fused


def _time_backend(
    backend: str, dense: nn.Module, small: nn.Module | dict[str, nn.Module], inputs: Any, spec: CaseSpec
) -> dict[str, Any]:
    """Dense and compacted timed interleaved on ``backend`` (``small``: one model, named ``compact``, or
    several by name)."""
    if backend == "cuda" and not torch.cuda.is_available():
        return {"skipped": "not measured: no GPU in this run"}
    smalls = small if isinstance(small, dict) else {"compact": small}
    models: dict[str, Any] = {"dense": dense, **smalls}
    extra: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="compactor-bench-") as tmp:
            if backend == "onnxruntime-cpu":
                exports = {
                    name: export_onnx(m, inputs, Path(tmp) / f"{name}.onnx") for name, m in models.items()
                }
                extra["exporter"] = {name: e.exporter for name, e in exports.items()}
                extra["export_seconds"] = {name: round(e.seconds, 2) for name, e in exports.items()}
                for name, m in smalls.items():
                    key = "" if name == "compact" else f"_{name}"
                    try:
                        extra["onnx_max_abs_error" + key] = check_onnx(
                            exports[name].path, m, inputs, ORT_TOLERANCE, threads=spec.threads
                        )
                    except ExportError as e:  # recorded; the timing is still worth having
                        extra["onnx_check_failed" + key] = str(e)
                extra["onnx_bytes"] = {name: _onnx_bytes(e.path) for name, e in exports.items()}
                models = {name: e.path for name, e in exports.items()}
            timing = latency(
                models,
                inputs,
                backend=backend,
                threads=spec.threads,
                warmup=spec.warmup,
                repeats=spec.repeats,
            )  # type: ignore[arg-type]
    except Exception as e:  # one backend failing (an exporter, say) must not lose the others
        return {
            "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
            **extra,
        }
    return {name: t.to_dict() for name, t in timing.items()} | extra


class _StagePeaks:
    """A ``compact(log=...)`` callback: the peak RSS of each stretch between two of its messages (VmHWM,
    reset at each). The stretches that begin with auto's timing messages are the timing it asks for (its ONNX
    Runtime sessions of every candidate), apart from the analysis."""

    TIMING = ("timing candidate widths", "timing the layers and the whole model")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.current = "start"
        self.peaks: list[tuple[str, int]] = []

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        self.peaks.append((self.current, _peak_rss_bytes()))
        _reset_peak_rss()
        self.current = message

    def peak(self, *, timing: bool = True) -> int:
        return max(
            (b for m, b in self.peaks if timing or not m.startswith(self.TIMING)), default=_peak_rss_bytes()
        )


def _onnx_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))  # the graph and its external data


def _state_dict_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers only what follows (Linux >= 4.0)."""
    try:
        Path(f"/proc/{os.getpid()}/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def _peak_rss_bytes() -> int:
    kib = _status_kib("VmHWM")
    return (kib or 0) * 1024


def main(argv: list[str] | None = None) -> int:
    spec_json, out_path = (argv if argv is not None else sys.argv[1:])[:2]
    raw = json.loads(spec_json)
    if "backends" in raw:
        raw["backends"] = tuple(raw["backends"])
    result = run_case(CaseSpec(**raw))
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
