"""Real torchvision and timm models, 30% of channels zeroed, compacted (issue 26): ``python -m benchmarks.real_sweep``.

Each model is built at its real size with random weights (nothing is downloaded), given trained-looking
BatchNorm parameters and statistics, masked the way users prune (``prune.ln_structured``, 30% of the output
channels, ``n=2``, on every Conv and Linear but the classifier, masks left attached), compacted from one
image (a batch of 1, as users give), and checked here again, independently of compactor's verification, on
fresh images. Each case runs in its own process under a time and memory limit, as in
:mod:`benchmarks.vision_sweep`; ``--jobs 2`` runs two at a time (one thread each).

torchvision's and timm's pure-Python models must import (``PYTHONPATH=../shared/torchvision_cpu`` here);
a library that does not import skips its cases::

    python -m benchmarks.real_sweep                       # all -> benchmarks/REAL_SWEEP.md + .json
    python -m benchmarks.real_sweep --cases tv:googlenet,timm:ghostnet_100
    python -m benchmarks.real_sweep --one timm:ghostnet_100   # one case here, JSON on stdout
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import vision_sweep as vs

ROOT = Path(__file__).resolve().parent
AMOUNT = 0.3
TOLERANCE = 1e-4  # compactor's default
TIMEOUT = 900.0
MEMORY = 10 << 30
FRESH = 2

# torchvision's classification models, all but the largest (over ~250M parameters, or slow to build here)
TORCHVISION = [
    "alexnet",
    "convnext_tiny",
    "convnext_small",
    "convnext_base",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "efficientnet_b0",
    "efficientnet_b1",
    "efficientnet_b2",
    "efficientnet_b3",
    "efficientnet_b4",
    "efficientnet_v2_s",
    "efficientnet_v2_m",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mnasnet0_75",
    "mnasnet1_0",
    "mnasnet1_3",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "regnet_x_800mf",
    "regnet_x_1_6gf",
    "regnet_x_3_2gf",
    "regnet_x_8gf",
    "regnet_x_16gf",
    "regnet_y_400mf",
    "regnet_y_800mf",
    "regnet_y_1_6gf",
    "regnet_y_3_2gf",
    "regnet_y_8gf",
    "regnet_y_16gf",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "shufflenet_v2_x0_5",
    "shufflenet_v2_x1_0",
    "shufflenet_v2_x1_5",
    "shufflenet_v2_x2_0",
    "squeezenet1_0",
    "squeezenet1_1",
    "swin_t",
    "swin_s",
    "swin_v2_t",
    "swin_v2_s",
    "vgg11",
    "vgg11_bn",
    "vgg13",
    "vgg13_bn",
    "vgg16",
    "vgg16_bn",
    "vgg19",
    "vgg19_bn",
    "vit_b_16",
    "vit_b_32",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
# timm models whose blocks torchvision lacks (squeeze-excite variants, ghost modules, split sizes held in
# attributes, CSP, Res2Net, MambaOut, InceptionNeXt, FasterNet's partial conv, vision transformers)
TIMM = [
    "efficientnet_b0",
    "rexnet_100",
    "ghostnet_100",
    "repghostnet_100",
    "mobilenetv3_large_100",
    "mambaout_femto",
    "res2net50_14w_8s",
    "res2net50_26w_4s",
    "cspresnet50",
    "cspdarknet53",
    "inception_next_tiny",
    "fasternet_t0",
    "convnext_atto",
    "mobilenetv2_100",
    "lcnet_050",
    "mixnet_s",
    "tinynet_a",
    "hardcorenas_a",
    "seresnet50",
    "ese_vovnet19b_dw",
    "dla34",
    "dpn68",
    "hrnet_w18_small",
    "levit_128s",
    "deit_tiny_patch16_224",
    "pvt_v2_b0",
    "poolformer_s12",
    "edgenext_xx_small",
    "mobilevit_xxs",
    "efficientformer_l1",
    "regnetz_b16",
]
CASES = [f"tv:{n}" for n in TORCHVISION] + [f"timm:{n}" for n in TIMM]


def build(case: str) -> tuple[nn.Module, int]:
    """The case's model, random weights, eval mode, and its input size."""
    lib, name = case.split(":", 1)
    torch.manual_seed(0)
    if lib == "tv":
        try:
            import torchvision.models as tvm
        except Exception as e:
            raise vs.Unavailable(f"torchvision does not import: {e}") from e
        kw: dict[str, Any] = (
            {"aux_logits": True, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
        )
        model: nn.Module = getattr(tvm, name)(**kw)
        return model.eval(), 299 if name == "inception_v3" else 224
    try:
        import timm
    except Exception as e:
        raise vs.Unavailable(f"timm does not import: {e}") from e
    model = timm.create_model(name)
    return model.eval(), int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


def prepared(case: str) -> tuple[nn.Module, torch.Tensor, int]:
    """Built, BatchNorms like trained, masked; the example (a batch of 1); the masked layers' count."""
    model, size = build(case)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.normal_(1, 0.1)
                    m.bias.normal_(0, 0.1)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for m in layers[:-1]:  # the classifier keeps its outputs
        if m.weight.shape[0] > 1:
            prune.ln_structured(m, "weight", amount=AMOUNT, n=2, dim=0)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    return model.eval(), x, len(layers) - 1


def run_one(case: str) -> dict[str, Any]:
    from .case import _peak_rss_bytes, _reset_peak_rss

    result: dict[str, Any] = {"case": case}
    try:
        model, x, masked = prepared(case)
    except vs.Unavailable as e:
        return result | {"status": "skipped", "note": str(e)}
    except Exception as e:
        return result | {"status": "build failed", **vs._failure(e)}
    result["masked_layers"] = masked
    reset = _reset_peak_rss()
    start = time.perf_counter()
    try:
        import compactor

        small, report = compactor.compact(model, x, tolerance=TOLERANCE)
    except Exception as e:
        from compactor.errors import CompactorError

        result["seconds"] = time.perf_counter() - start
        return result | {"status": "refused" if isinstance(e, CompactorError) else "crash", **vs._failure(e)}
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = _peak_rss_bytes() if reset else None
    result.update(vs.summary(report))
    rows = report.filters
    result["pruned_filters"] = len(rows)
    result["filters_removed"] = sum(f.removed for f in rows)
    result["check"] = _check(model, small.eval(), x)
    result["status"], result["note"] = _verdict(result)
    return result


def _check(masked: nn.Module, small: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    problems, worst = [], 0.0
    for seed in range(FRESH + 1):
        y = x if seed == 0 else torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            a, b = masked(y), small(y)
        problem, error = vs._differ(a, b)
        worst = max(worst, error)
        if problem:
            problems.append(f"input {seed}: {problem}")
    return {"ok": not problems, "max_abs_error": worst, "problems": problems}


def _verdict(r: dict[str, Any]) -> tuple[str, str]:
    if not r["check"]["ok"]:
        return "inexact", "; ".join(r["check"]["problems"][:2])
    if not r["removed"]:
        return "kept whole", next(iter(r["kept_reasons"]), "no zeroed channel found")
    return "ok", ""


def _run_isolated(case: str, timeout: float, memory: int) -> dict[str, Any]:
    return vs.run_isolated(case, timeout, memory, module="benchmarks.real_sweep")


COLUMNS = (
    "case", "status", "params dense", "params compacted", "zeroed", "removed", "removed fraction",
    "pruned filters", "filters removed", "compact s", "peak MiB", "most kept for",
)  # fmt: skip


def _row(r: dict[str, Any]) -> list[str]:
    params = r.get("params", {})
    fraction = r.get("removed_fraction")
    peak = r.get("peak_rss") or r.get("process_peak_rss")
    seconds = r.get("seconds", r.get("wall_seconds"))
    kept = next(iter(r.get("kept_reasons") or {}), "")
    note = r.get("note") or r.get("error") or kept
    return [
        f"`{r['case']}`",
        r["status"],
        str(params.get("before", "")),
        str(params.get("after", "")),
        str(r.get("zeroed", "")),
        str(r.get("removed", "")),
        "" if fraction is None else f"{fraction:.2f}",
        str(r.get("pruned_filters", "")),
        str(r.get("filters_removed", "")),
        "" if seconds is None else f"{seconds:.1f}",
        "" if not peak else f"{peak / 2**20:.0f}",
        vs._short(note, 160).replace("|", "\\|"),
    ]


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    counts = Counter(r["status"] for r in results)
    fractions = [r["removed_fraction"] for r in results if r.get("removed_fraction") is not None]
    filters = [r["filters_removed"] / r["pruned_filters"] for r in results if r.get("pruned_filters")]
    lines = [
        "# Real models: torchvision and timm, 30% of channels zeroed",
        "",
        f"`python -m benchmarks.real_sweep` writes this file. {len(results)} models at their real sizes with "
        f"random weights and trained-looking BatchNorms, masked with `prune.ln_structured` ({AMOUNT:.0%}, n=2) "
        "on every Conv and Linear but the classifier, compacted from one image, and compared with the masked "
        f"model on {FRESH + 1} images (max|Δ| <= {TOLERANCE:g} × max(1, max|reference|)). Each case ran in its "
        f"own process (limits: {meta['timeout']:.0f} s, {meta['memory'] >> 20} MiB resident).",
        "",
        f"Ran on commit `{meta['commit']}` ({meta['date']}, torch {meta['torch']}, one thread per case).",
        "",
        "Statuses: " + ", ".join(f"{s} {n}" for s, n in sorted(counts.items())) + ".",
        "",
        "*removed fraction*: of the zeroed channels compactor found (a channel whose every writer is zero, or "
        "that a zero depthwise filter or gate makes input-independent, or that one zero factor of a gate product "
        "touches), those that no longer exist (removed, folded or merged). *pruned filters*: every all-zero "
        "output row of a Conv, Linear or depthwise conv, and how many of them went. Over the models with a "
        f"figure: removed fraction median {_median(fractions)}, {sum(f >= 0.95 for f in fractions)} of "
        f"{len(fractions)} at 0.95 or more; pruned filters removed, median {_median(filters)}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(_row(r)) + " |" for r in results]
    return "\n".join(lines).rstrip() + "\n"


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "n/a"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.real_sweep", description=__doc__.splitlines()[0])
    p.add_argument("--cases", help="comma-separated cases, e.g. tv:resnet50,timm:ghostnet_100 (default: all)")
    p.add_argument("--list", action="store_true", help="print the case names and exit")
    p.add_argument("--one", metavar="CASE", help="run one case in this process (what each subprocess does)")
    p.add_argument("--json", type=Path, help="with --one: write the result here instead of stdout")
    p.add_argument(
        "--out", type=Path, default=ROOT / "REAL_SWEEP.md", help="markdown; the JSON goes beside it"
    )
    p.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds per case")
    p.add_argument("--memory-mib", type=int, default=MEMORY >> 20, help="resident MiB per case")
    p.add_argument("--jobs", type=int, default=1, help="cases at a time (one thread each)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    if args.one:
        return vs.answer_one(lambda: run_one(args.one), args.json)
    names = [c.strip() for c in args.cases.split(",")] if args.cases else CASES
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"error: unknown case(s): {', '.join(unknown)} (see --list)", file=sys.stderr)
        return 2
    memory = args.memory_mib << 20
    meta = vs.metadata(args.timeout, memory)
    done = 0

    def one(name: str) -> dict[str, Any]:
        nonlocal done
        r = _run_isolated(name, args.timeout, memory)
        done += 1
        fraction = r.get("removed_fraction")
        shown = "" if fraction is None else f" removed fraction {fraction:.2f}"
        print(f"[{done}/{len(names)}] {name}: {r['status']}{shown}", flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, names))
    args.out.write_text(markdown(results, meta))
    args.out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str)
    )
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
