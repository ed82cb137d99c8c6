"""Turn case results into ``REPORT.md``, ``report.json`` and a rich table. All three read the same rows."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

LATENCY_BACKENDS = ("torch-cpu", "onnxruntime-cpu", "cuda")
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class Row:
    """The derived numbers of one case (``None`` where not measured)."""

    label: str
    model: str
    sparsity: float
    round_to: int | None
    params_ratio: float | None
    macs_ratio: float | None
    file_ratio: float | None
    latency: dict[str, tuple[float, float] | str]  # backend -> (dense ms, compact ms) or why not
    compact_seconds: float | None
    peak_rss: int | None
    rss_before: int | None
    param_bytes: int | None
    max_abs_error: float | None
    removed_fraction: float | None
    note: str = ""

    @classmethod
    def of(cls, r: dict[str, Any]) -> Row:
        spec = r["spec"]
        notes = [r.get("skipped") or r.get("error") or "", *r.get("warnings", [])]
        notes += [
            f"{b}: {t['onnx_check_failed']}"
            for b, t in r.get("latency", {}).items()
            if "onnx_check_failed" in t
        ]
        note = "; ".join(n for n in notes if n)
        lat: dict[str, tuple[float, float] | str] = {}
        for backend in LATENCY_BACKENDS:
            t = r.get("latency", {}).get(backend)
            if t is None:
                lat[backend] = "not run"
            elif "dense" in t and "compact" in t:
                lat[backend] = (t["dense"]["median_ms"], t["compact"]["median_ms"])
            else:
                lat[backend] = t.get("skipped") or t.get("error", "failed")
        return cls(
            label=r["label"],
            model=spec["model"],
            sparsity=spec["sparsity"],
            round_to=spec.get("round_to"),
            params_ratio=_ratio(r.get("params")),
            macs_ratio=_ratio(r.get("macs")),
            file_ratio=_ratio(r.get("file_bytes")),
            latency=lat,
            compact_seconds=r.get("compact_seconds"),
            peak_rss=r.get("memory", {}).get("peak_rss_during_compact"),
            rss_before=r.get("memory", {}).get("rss_before_compact"),
            param_bytes=r.get("param_bytes_dense"),
            max_abs_error=r.get("max_abs_error"),
            removed_fraction=r.get("channels", {}).get("removed_fraction"),
            note=note,
        )

    def speedup(self, backend: str) -> float | None:
        t = self.latency.get(backend)
        return t[0] / t[1] if isinstance(t, tuple) and t[1] > 0 else None

    def efficiency(self, backend: str) -> float | None:
        """Measured speedup / the speedup the MACs promise (1.0: every removed MAC became saved time)."""
        s = self.speedup(backend)
        return s * self.macs_ratio if s is not None and self.macs_ratio else None


def _ratio(d: dict[str, int] | None) -> float | None:
    return d["after"] / d["before"] if d and d.get("before") else None


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _latency_cell(row: Row, backend: str) -> tuple[str, str, str]:
    t = row.latency[backend]
    if not isinstance(t, tuple):
        return (t if len(t) < 40 else t[:37] + "...", "-", "-")
    return (f"{t[0]:.1f} → {t[1]:.1f}", f"{row.speedup(backend):.2f}x", _f(row.efficiency(backend), ".2f"))


COLUMNS = (
    "model", "pruned", "round_to", "params", "MACs", "file",
    "torch-cpu ms", "speedup", "eff.", "ORT-cpu ms", "speedup", "eff.", "cuda ms", "speedup", "eff.",
    "compact s", "peak RSS MiB", "max abs err", "removed",
)  # fmt: skip


def cells(row: Row) -> list[str]:
    lat = [c for b in LATENCY_BACKENDS for c in _latency_cell(row, b)]
    return [
        row.model,
        f"{row.sparsity:.0%}",
        str(row.round_to or "-"),
        _f(row.params_ratio),
        _f(row.macs_ratio),
        _f(row.file_ratio),
        *lat,
        _f(row.compact_seconds, ".1f"),
        "-" if row.peak_rss is None else f"{row.peak_rss / MIB:.0f}",
        _f(row.max_abs_error, ".1e"),
        "-" if row.removed_fraction is None else f"{row.removed_fraction:.0%}",
    ]


def rich_table(rows: list[Row]) -> Table:
    """The markdown table's columns, less the backends measured for no row (a CPU run hides cuda)."""
    measured = {b for r in rows for b in LATENCY_BACKENDS if isinstance(r.latency[b], tuple)}
    hidden = {6 + 3 * i + j for i, b in enumerate(LATENCY_BACKENDS) if b not in measured for j in range(3)}
    table = Table(
        title="compactor benchmark: compacted / dense (ratios < 1 are better)", title_justify="left"
    )
    for i, c in enumerate(COLUMNS):
        if i not in hidden:
            table.add_column(c, justify="left" if c in ("model", "pruned") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*(c for i, c in enumerate(cells(row)) if i not in hidden))
    return table


def machine_info(threads: int) -> dict[str, Any]:
    import onnxruntime

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in _read("/proc/cpuinfo").splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "platform": platform.platform(),
        "git_commit": _git_commit(),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


SWEEP_LINK = (
    "every vision architecture transformers ships, compacted from small configs: "
    "[VISION_SWEEP.md](VISION_SWEEP.md) (`python -m benchmarks.vision_sweep`)"
)


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# compactor benchmark: dense vs compacted",
        "",
        f"Generated by `{meta['command']}` on {meta['started']} ({meta['wall_seconds']:.0f} s, "
        f"{meta['cases_done']} cases).",
        "",
        f"- machine: {m['cpu']}, {m['cpu_count']} CPU cores; GPU: "
        + (m["gpu"] or "none (**cuda column not measured: no GPU in this run**)"),
        f"- software: Python {m['python']}, torch {m['torch']}, onnxruntime {m['onnxruntime']}, "
        f"{m['platform']}, compactor at `{m['git_commit']}`",
        f"- timing: {m['threads']} intra-op thread(s) (`torch.set_num_threads`, ORT `intra_op_num_threads`), "
        f"{meta['warmup']} warm-up + {meta['repeats']} timed calls per model, batch 1, dense and compacted interleaved; "
        f"load average at start {meta['load_start']}, at end {meta['load_end']}",
        f"- inputs: {meta['inputs']}",
        f"- {SWEEP_LINK}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    notes = [f"- {r.label}: {r.note}" for r in rows if r.note]
    if notes:
        lines += ["", "Notes:", *notes]
    lines += ["", *targets(rows), "", *scaling(rows), "", HOW_TO_READ]
    return "\n".join(lines) + "\n"


def targets(rows: list[Row]) -> list[str]:
    """The targets of issue 4 for ResNet-50 at 50%: reported, not asserted."""
    row = next(
        (r for r in rows if r.model == "resnet50" and abs(r.sparsity - 0.5) < 1e-9 and not r.round_to), None
    )
    out = ["## Targets (ResNet-50, 50% of internal channels; reported, not asserted)", ""]
    if row is None or row.params_ratio is None:
        return [*out, "ResNet-50 at 50% was not part of this run."]
    out += ["| target | measured | met |", "|---|---|---|"]
    rounded = [r for r in rows if r.model == "resnet50" and abs(r.sparsity - 0.5) < 1e-9 and r.round_to]
    for backend in ("torch-cpu", "onnxruntime-cpu"):
        eff = row.efficiency(backend)
        also = "".join(f"; round_to={r.round_to}: {_f(r.efficiency(backend), '.3f')}" for r in rounded)
        out.append(
            f"| speedup efficiency >= 0.8 on {backend} | {_f(eff, '.3f')}{also} | {_met(eff is not None and eff >= 0.8)} |"
        )
    if row.file_ratio is not None:
        gap = abs(row.file_ratio / row.params_ratio - 1)
        out.append(
            f"| file ratio within 1% of params ratio | {row.file_ratio:.4f} vs {row.params_ratio:.4f} "
            f"({gap:.2%}) | {_met(gap <= 0.01)} |"
        )
    if row.compact_seconds is not None:
        out.append(f"| compaction < 10 s | {row.compact_seconds:.1f} s | {_met(row.compact_seconds < 10)} |")
    if row.peak_rss is not None and row.param_bytes:
        budget = 3 * row.param_bytes + GIB
        out.append(
            f"| peak RSS < 3 x model size + 1 GiB ({budget / MIB:.0f} MiB) | {row.peak_rss / MIB:.0f} MiB "
            f"(model {row.param_bytes / MIB:.0f} MiB) | {_met(row.peak_rss < budget)} |"
        )
    return out


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def scaling(rows: list[Row]) -> list[str]:
    chain = [
        r
        for name in ("resnet18", "resnet50", "resnet152")
        for r in rows
        if r.model == name and abs(r.sparsity - 0.5) < 1e-9 and not r.round_to and r.compact_seconds
    ]
    if len(chain) < 2:
        return []
    out = [
        "## How compaction time and memory grow (ResNet family, 50%)",
        "",
        "| model | params (dense) | compact s | s per M params | peak RSS MiB | RSS before MiB | peak - before "
        "| (peak - before) / model size |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in chain:
        params = (r.param_bytes or 0) / 4
        peak, before, size = r.peak_rss or 0, r.rss_before or 0, max(r.param_bytes or 1, 1)
        out.append(
            f"| {r.model} | {params / 1e6:.1f} M | {r.compact_seconds:.1f} | {r.compact_seconds / max(params / 1e6, 1e-9):.2f} "
            f"| {peak / MIB:.0f} | {before / MIB:.0f} | {(peak - before) / MIB:.0f} | {(peak - before) / size:.1f} |"
        )
    out += [
        "",
        "RSS before: the process with torch imported and the masked model built (its weights, masks and "
        "`weight_orig` copies: about 3x the model size). peak - before: what compaction itself adds.",
    ]
    return out


HOW_TO_READ = """## How to read this

- Every ratio is compacted / dense: 0.50 means half. `params`: parameter count; `MACs`: multiply-accumulates of
  one forward pass (convolutions with groups, every matmul, attention; `compactor.measure.count_macs`);
  `file`: bytes of `torch.save(model.state_dict())`.
- The dense baseline is the pruned model with its masks baked in (same zeros, no pruning hooks), so the
  latency columns show what removing the zeros buys, not what pruning costs in accuracy.
- `ms` columns: median latency dense → compacted; `speedup` = dense / compacted; `eff.` (speedup efficiency)
  = measured speedup / (dense MACs / compacted MACs). 1.0 means every removed MAC turned into saved time;
  below 1, the layers that remain do not run proportionally faster (memory-bound layers, thread overhead,
  odd channel counts; try `round_to`).
- `compact s`: wall time of `compactor.compact()` end to end (masks, graph, plan, rebuild, verification);
  `peak RSS MiB`: the process's peak resident memory during compaction (Linux VmHWM, reset just before it;
  it includes the Python interpreter, torch and the masked model already in memory).
- `max abs err`: the largest difference between masked and compacted outputs over the verification runs.
  `removed`: the fraction of zeroed channels that no longer exist (removed, folded into a bias or merged);
  the rest were kept for a reason the compactor's own report gives.
- Threads: one by default (`--threads`). On a shared 2-core machine two OpenMP threads that wait on each other
  turn any other process into 10x latency swings; one thread measures the work removed. Multi-thread
  efficiency is usually lower (small layers parallelise worse), so treat these as an upper bound:
  `benchmarks/threads2/REPORT.md` (`--threads 2`) has ResNet-50 and ResNeXt-50 at 50% with both cores.
- Odd widths cost speed: a 50% ResNet keeps one carrier channel per merged group (conv1: 64 -> 33, 128 -> 65; conv2 folds into conv3 and drops to exactly 32, 64),
  which ONNX Runtime's blocked (NCHWc) convolutions handle slowly; `round_to=8/16` restores multiples.
- ResNeXt-50 32x4d is pruned group-aware (the same count in each of the 32 groups of every grouped conv).
  A constant into a zero-padded grouped conv needs a carrier in its own group, so each group of conv1's
  output keeps one: `removed` stays below 100% by design (the compactor's report lists them as `carrier`).
- Latency on a shared machine is noisy; dense and compacted are timed in the same loop, alternating, so the
  noise hits both and the ratios are more trustworthy than the absolute milliseconds.
"""
