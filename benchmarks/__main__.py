"""``python -m benchmarks``: compact the zoo, measure dense vs compacted, write REPORT.md and report.json.

    python -m benchmarks --quick                       # CI: small inputs, 3 small models, < 3 minutes
    python -m benchmarks --models resnet50 --sparsity 0.5
    python -m benchmarks --models resnet50 --sparsity 0.5 --round-to 1,8,16,auto   # the round_to comparison
    python -m benchmarks --out benchmarks/REPORT.md    # the full run (over an hour on 2 cores)

``--round-to auto`` adds, for every model and sparsity of the run, one case per backend with
``compact(round_to="auto")`` tuned for that backend and timed on it alone. Numeric ``--round-to`` values are
cases at 50% (``1``: the plain case). Whenever ResNet-50 at 50% and torch-cpu are in a full run, one more
case times it with BatchNorm folded into the convs (dense and compacted alike): the ceiling of eager PyTorch;
with ``auto`` too, one more compacts it at round_to 1, 8, 16 and auto and times all of them with the dense
model in one interleaved run per backend.

Each case runs in its own subprocess (``benchmarks.case``) so that its peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console

from .case import CaseSpec, supports_round_to
from .models import FULL_DEFAULT, QUICK_DEFAULT, ZOO
from .report import LATENCY_BACKENDS, machine_info, markdown, rich_table, split_results

ROOT = Path(__file__).resolve().parent
ROUND_TO_DEFAULT = (
    "resnet50",
    "mobilenet_v2",
    "bert_base",
)  # the full run's round_to cases (time on 2 cores)


SIDE_BY_SIDE = ("1", "8", "16", "auto")  # ResNet-50 at 50%: issue 13's comparison, in one interleaved run
SIDE_BY_SIDE_ROUNDS = 60  # its rounds: gaps of a fraction of a percent are judged there, against its noise


def _csv(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64x64 images / 32 tokens, few repeats, small models")
    p.add_argument("--models", type=_csv, help=f"comma-separated, from: {', '.join(ZOO)}")
    p.add_argument("--sparsity", type=_csv, help="fractions of internal channels pruned, e.g. 0.3,0.5,0.7")
    p.add_argument(
        "--round-to", type=_csv, default=None,
        help="extra cases with compact(round_to=N) at 50%% sparsity, e.g. 1,8,16; auto: compact(round_to='auto') "
        "for every sparsity, once per backend, timed there (default: 8,16 for "
        f"{', '.join(ROUND_TO_DEFAULT)} and auto for every model, unless --quick; '' for none)",
    )  # fmt: skip
    p.add_argument(
        "--backends", type=_csv, default=list(LATENCY_BACKENDS), help="torch-cpu,onnxruntime-cpu,cuda"
    )
    p.add_argument(
        "--threads", type=int, default=1,
        help="intra-op threads for torch and ONNX Runtime (default 1: on a shared or busy machine, several threads "
        "waiting on each other make latency swing by 10x; one thread measures the work removed)",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="markdown report; report.json goes beside it (default: benchmarks/REPORT.md for a full run; a quick "
        "run writes to the temporary directory, never over the committed report)",
    )
    p.add_argument(
        "--render", type=Path, default=None, metavar="REPORT_JSON",
        help="only re-render --out (and the table) from an existing report.json; runs nothing",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=float, default=1800, help="seconds per case before it is recorded as failed"
    )
    args = p.parse_args(argv)
    unknown = [m for m in args.models or [] if m not in ZOO]
    if unknown:
        p.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
    bad = [b for b in args.backends if b not in LATENCY_BACKENDS]
    if bad:
        p.error(f"unknown backend(s) {', '.join(bad)}; choose from {', '.join(LATENCY_BACKENDS)}")
    return args


def plan_cases(args: argparse.Namespace) -> list[CaseSpec]:
    quick = args.quick
    models = args.models or list(QUICK_DEFAULT if quick else FULL_DEFAULT)
    sparsities = [float(s) for s in (args.sparsity or (["0.5"] if quick else ["0.3", "0.5", "0.7"]))]
    asked = args.round_to if args.round_to is not None else ([] if quick else ["8", "16", "auto"])
    auto = "auto" in asked
    round_tos = [int(r) for r in asked if r != "auto"]
    round_to_models = set(models) if args.models or args.round_to is not None else set(ROUND_TO_DEFAULT)
    common = {
        "quick": quick,
        "backends": tuple(args.backends),
        "threads": args.threads,
        "warmup": args.warmup if args.warmup is not None else (2 if quick else 3),
        "repeats": args.repeats if args.repeats is not None else (5 if quick else 15),
    }
    targets = [b for b in args.backends if b != "cuda" or torch.cuda.is_available()]
    cases = []
    for model in models:
        cases += [CaseSpec(model, s, **common) for s in sparsities]
        if model in round_to_models:
            if 1 in round_tos and 0.5 not in sparsities:
                cases.append(CaseSpec(model, 0.5, **common))
            cases += [CaseSpec(model, 0.5, r, **common) for r in round_tos if r > 1]
        if auto:
            cases += [
                CaseSpec(model, s, "auto", **{**common, "backends": (b,)}, target=b)
                for s in sparsities
                for b in targets
            ]
        if model == "resnet50" and 0.5 in sparsities and "torch-cpu" in args.backends and not quick:
            cases.append(CaseSpec(model, 0.5, **{**common, "backends": ("torch-cpu",)}, fold_bn=True))
        if model == "resnet50" and 0.5 in sparsities and auto and not quick:
            rounds = max(common["repeats"], SIDE_BY_SIDE_ROUNDS)
            cases.append(CaseSpec(model, 0.5, **{**common, "repeats": rounds}, side_by_side=SIDE_BY_SIDE))
    return cases


def run_in_subprocess(spec: CaseSpec, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="compactor-bench-") as tmp:
        out = Path(tmp) / "case.json"
        command = [sys.executable, "-m", "benchmarks.case", json.dumps(asdict(spec)), str(out)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT.parent), os.environ.get("PYTHONPATH", "")]),
        }
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout, env=env, check=False
            )
        except subprocess.TimeoutExpired:
            return {"spec": asdict(spec), "label": spec.label, "error": f"timed out after {timeout:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return {
            "spec": asdict(spec),
            "label": spec.label,
            "error": f"case process exited {done.returncode}: {tail[0]}",
        }


def _shown(arg: str) -> str:
    """A command-line argument as the report records it: a path relative to the working directory, or if
    that climbs out of it, the file's name (no report names a directory of the machine it ran on)."""
    if not os.path.isabs(arg):
        return arg
    relative = os.path.relpath(arg)
    return Path(arg).name if relative.startswith("..") else relative


def _write(
    args: argparse.Namespace,
    cases: list[CaseSpec],
    results: list[dict],
    started: datetime,
    load_start: str,
    argv: list[str] | None,
) -> None:
    rows, sides = split_results(results)
    threads = cases[0].threads if cases else 1
    meta = {
        "command": "python -m benchmarks " + " ".join(map(_shown, sys.argv[1:] if argv is None else argv)),
        "started": started.strftime("%Y-%m-%d %H:%M UTC"),
        "wall_seconds": (datetime.now(timezone.utc) - started).total_seconds(),
        "cases_done": f"{len(results)} of {len(cases)}",
        "machine": machine_info(threads),
        "warmup": cases[0].warmup if cases else 0,
        "repeats": cases[0].repeats if cases else 0,
        "load_start": load_start,
        "load_end": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "inputs": "; ".join(
            sorted({f"{r['spec']['model']}: {r['inputs']}" for r in results if "inputs" in r})
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(rows, meta, sides))
    args.out.with_name("report.json").write_text(
        json.dumps({"meta": meta, "cases": results}, indent=1) + "\n"
    )


def default_out(quick: bool) -> Path:
    """Where the report goes without --out: a quick run never replaces the committed REPORT.md."""
    return Path(tempfile.gettempdir()) / "compactor-quick" / "REPORT.md" if quick else ROOT / "REPORT.md"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out or default_out(args.quick)
    console = Console(width=max(Console().width, 200))  # the table is wide; a CI log does not wrap
    if args.render:
        saved = json.loads(args.render.read_text())
        rows, sides = split_results(saved["cases"])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(rows, saved["meta"], sides))
        console.print(rich_table(rows))
        console.print(f"wrote {args.out} from {args.render}")
        return 0
    cases = plan_cases(args)
    if any(c.round_to for c in cases) and not supports_round_to():
        console.print("note: compactor.compact() has no round_to parameter; the round_to cases are skipped")
    started = datetime.now(timezone.utc)
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    results = []
    for i, spec in enumerate(cases, 1):
        console.print(f"[{i}/{len(cases)}] {spec.label} ...", highlight=False)
        t = time.perf_counter()
        result = run_in_subprocess(spec, args.timeout)
        status = result.get("error") or result.get("skipped") or "ok"
        console.print(f"      {status} ({time.perf_counter() - t:.0f} s)", highlight=False)
        results.append(result)
        _write(
            args, cases, results, started, load_start, argv
        )  # after every case: a long run leaves partial results
    json_path = args.out.with_name("report.json")
    console.print(rich_table(split_results(results)[0]))
    console.print(f"wrote {args.out} and {json_path}")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
