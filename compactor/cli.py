"""``compact``: the command line. Parse, call the API, print; one table from error type to message."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import __version__
from .api import DEFAULT_TIME_LIMIT, compact, default_target, resolve_example_inputs
from .errors import (
    CompactorError,
    ExampleInputError,
    ExportError,
    GraphError,
    InputFileError,
    ModelForwardError,
    ModelStructureError,
    OutputPathError,
    TimeLimitError,
    UnverifiedPathError,
    VerificationError,
)
from .inputs import ExampleInputs, from_shape_specs
from .io.atomic import check_output_path, write_atomically
from .io.hf import is_hf_model
from .io.load import read_example_inputs, read_model
from .io.save import format_for, save_output
from .outputs import DEFAULT_TOLERANCE
from .report.report import CompactionReport, render
from .util import module_depth, run_deep

EXAMPLES = """\
examples:
  compact --demo                                    build a masked example model, compact it, report
  compact model.pt -o small.pt --input-shape 1,3,224,224
  compact model.pt -o small.pt --example-inputs batch.pt --report report.json
  compact bert.pt -o small.pt --example-inputs tokens.pt     (a dict of input_ids, attention_mask)
  compact model.pt -o small.pt --input-shape 1,3,32,32 --input-shape 1,10   (two positional inputs)
  compact model.pt -o small.pt2 --input-shape 1,3,224,224 --bench --onnx small.onnx
  compact weights.pt --arch mypkg.models:resnet18 -o small.safetensors --input-shape 1,3,224,224
  compact last.ckpt --arch mypkg.models:resnet18 --prefix model. -o small.pt --input-shape 1,3,224,224
  compact sparse.pt -o sparse.safetensors --sparse-storage --input-shape 1,3,224,224
  compact bert.pt -o small_bert/ --example-inputs tokens.pt --uniform   (config.json + model.safetensors)
  compact model.pt -o small.onnx --input-shape 1,3,224,224 --strict     (refuse paths the inputs cannot show)
  compact model.pt -o small.onnx --input-shape 1,3,224,224 --round-to auto   (widths timed in ONNX Runtime)
  compact model.pt -o small.pt --input-shape 1,3,224,224 --round-to auto --target torch-cpu --threads 4 --bench
  compact pruned-llama/ -o small-llama/        (a Hugging Face directory, streamed block by block)
  compact pruned-llama/ -o small-llama/ --uniform --max-shard-size 2GB   (from_pretrained loads the output)

output formats (by the suffix of -o, or --format): .pt/.pth pickled module; .pt2 torch.export program that runs
without your class (dynamic batch and sequence length unless --static-shapes); .onnx checked with onnx.checker
and ONNX Runtime; .safetensors weights + shape manifest, no pickle; a directory: a transformers model as
config.json + model.safetensors (from_pretrained loads it when the config can state its widths). Every output
is reloaded and checked before it lands; compactor.load(path, arch=None) reads .pt, .pt2, .safetensors and
directories back in Python (.safetensors needs arch, the function that builds the dense model).

MODEL is a Hugging Face directory (config.json and model.safetensors, shards with an index, or pytorch_model*.bin;
zeros or torch.nn.utils.prune's weight_orig/weight_mask keys): each decoder block is read, compacted, verified on
the hidden states the model's own forward gives it, written and freed in turn (peak memory: a few blocks), and
the final logits of the dense and the compacted model are compared; without --example-inputs (a dict with
input_ids), two random sequences of 32 tokens. Or MODEL is a file written by torch.save(model), masks attached (torch.nn.utils.prune) or baked in.
It is loaded without running code from the file: only module classes, pruning methods, Hugging Face configs,
enums, containers, torch's pure operators and functools.partial of a module class or operator may appear in
it, each judged by name and source before anything is imported (never torch.load, os.system, getattr); the
current directory is importable (last on sys.path) so your model class resolves.
Every run verifies that the compacted model reproduces the masked model's outputs before writing; branches
on tensor values and layers no forward called are warnings (--strict refuses them).
--round-to auto times each channel group's layers alone at the exact width and rounded up to 8, 16, 32, 64, on
the backend the model deploys to, keeps the fastest (padding with zero channels, exactly), then times the whole
model; the report says when it is still slower than dense, and why any backend's speedup falls short of its MACs.
exit status: 0 success, 2 bad input (one line on stderr), 1 internal error.
"""

# Exit status and prefix per error type: bad input is the user's to fix (2), the rest is ours (1).
EXIT_CODES: dict[type[CompactorError], int] = {
    InputFileError: 2,
    ExampleInputError: 2,
    ModelForwardError: 2,
    ModelStructureError: 2,
    OutputPathError: 2,
    UnverifiedPathError: 2,
    ExportError: 1,
    GraphError: 1,
    VerificationError: 1,
    TimeLimitError: 1,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compact",
        description="Make a pruned PyTorch model physically smaller, losslessly, and prove it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "model",
        nargs="?",
        metavar="MODEL",
        help="model file written by torch.save(model), or a Hugging Face directory",
    )
    p.add_argument(
        "-o",
        "--output",
        metavar="OUT",
        help="where to write the compacted model: .pt/.pth, .pt2, .onnx, .safetensors, or a directory (hf)",
    )
    p.add_argument("--demo", action="store_true", help="run on a built-in masked example model")
    inputs = p.add_argument_group("example inputs (one of)")
    inputs.add_argument(
        "--example-inputs",
        metavar="FILE",
        help="torch.save'd tensor, tuple/list of tensors, or dict of tensors",
    )
    inputs.add_argument(
        "--input-shape",
        metavar="SHAPE[:DTYPE]",
        action="append",
        help="e.g. 1,3,224,224 or 1,128:int64 (repeat for several inputs); random values",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help=f"verification: max abs error <= TOL * max(1, max|output|) (default {DEFAULT_TOLERANCE:g})",
    )
    p.add_argument(
        "--round-to",
        type=_round_to,
        default=1,
        metavar="N|auto",
        help="keep channel counts multiples of N (e.g. 8); auto: per channel group, time the exact width and it "
        "rounded up to 8, 16, 32, 64 on --target and keep the fastest",
    )
    p.add_argument(
        "--target",
        choices=["torch-cpu", "onnxruntime-cpu", "cuda"],
        help="where --round-to auto times widths (default: onnxruntime-cpu for -o .onnx, cuda for a model on a GPU, "
        "else torch-cpu), with --threads threads",
    )
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    sources = p.add_argument_group("state_dicts and checkpoints")
    sources.add_argument(
        "--arch", metavar="MODULE:CALLABLE", help="builds the dense model; MODEL is then a state_dict/.ckpt"
    )
    sources.add_argument(
        "--prefix", metavar="P", help="key prefix to strip from a checkpoint (default: detected)"
    )
    outputs = p.add_argument_group("outputs and measurement")
    outputs.add_argument(
        "--format",
        choices=["pt", "pt2", "onnx", "safetensors", "hf"],
        help="output format (default: by suffix; a directory: hf, for a transformers model)",
    )
    outputs.add_argument(
        "--onnx", metavar="FILE.onnx", help="also write the compacted model as ONNX (checked with ORT)"
    )
    outputs.add_argument(
        "--static-shapes",
        action="store_true",
        help=".pt2/.onnx: export at the example's exact shapes (default: a dynamic batch dimension, and sequence "
        "length for integer inputs, checked at a second size)",
    )
    outputs.add_argument(
        "--keep-example-inputs", action="store_true", help=".pt2: keep the example inputs inside the program"
    )
    outputs.add_argument(
        "--uniform",
        action="store_true",
        help="Hugging Face models: give every layer of a kind the same width (the largest), keeping the fewest "
        "zero channels needed, so that config.json states the widths and from_pretrained loads the directory",
    )
    outputs.add_argument(
        "--sparse-storage",
        action="store_true",
        help="-o *.safetensors: store zero-heavy weights compressed (exact)",
    )
    outputs.add_argument(
        "--bench", action="store_true", help="add MACs and latency (dense vs compacted) to the report"
    )
    outputs.add_argument(
        "--backends",
        default="torch-cpu,onnxruntime-cpu,cuda",
        help="latency backends for --bench (default: %(default)s)",
    )
    outputs.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for --bench and --round-to auto (default: %(default)s)",
    )
    outputs.add_argument(
        "--repeats", type=int, default=30, help="timed calls per model for --bench (default: %(default)s)"
    )
    p.add_argument("--force", action="store_true", help="allow -o to replace the input file")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse a model with paths the example inputs do not take (branches on tensor values, layers no "
        "forward calls), which verification cannot prove; without it they are warnings",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        metavar="SECONDS",
        help="stop with one line naming the part not yet analysed once compaction has run this long, writing "
        "nothing (default: %(default)g; 0: no limit)",
    )
    p.add_argument(
        "--trust-pickle", action="store_true", help="load MODEL with full pickle (runs code from it)"
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a Hugging Face directory whose config.json has auto_map run its own code (refused otherwise)",
    )
    p.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="a checkpoint directory's output shards: at most SIZE each (5GB, 500MB, 2GiB; default: the input's)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--version", action="version", version=f"compactor {__version__}")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        return _run(args, parser, err)
    except CompactorError as e:
        if args.debug:
            traceback.print_exc()
        err.print(f"error: {e}", markup=False)
        return EXIT_CODES.get(type(e), next((c for t, c in EXIT_CODES.items() if isinstance(e, t)), 1))
    except KeyboardInterrupt:
        err.print("error: interrupted; nothing was written", markup=False)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        err.print(
            f"error: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)",
            markup=False,
        )
        return 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, err: Console) -> int:
    if args.demo:
        return _run_demo(args, parser, err)
    if not args.model:
        parser.error("MODEL is required (or use --demo)")
    if not args.output:
        parser.error("-o/--output is required: where to write the compacted model, e.g. -o small.pt")
    if Path(args.model).is_dir():
        return _run_checkpoint(args, err)
    out, onnx_out, report_path = _check_outputs(args)
    load_notes: list[str] = []
    input_bytes = _input_bytes(Path(args.model))  # held now: the file may be gone by the end
    model = _load(args, load_notes)
    new = [p for p in (out, onnx_out) if p is not None and not p.exists()]

    def work() -> CompactionReport:  # on a big stack where the model nests deeply (util.run_deep)
        if args.kind == "hf" and not is_hf_model(model):
            raise OutputPathError(
                f"-o {out}: a Hugging Face directory needs a transformers model (PreTrainedModel), not "
                f"{type(model).__name__}; give a file name such as {out.with_suffix('.pt')}"
            )
        if args.uniform and not is_hf_model(model):
            raise ExampleInputError(
                "--uniform evens out the widths a Hugging Face config states: it needs a transformers model"
            )
        inputs = resolve_example_inputs(model, _example_inputs(args))
        small, report = _compact(model, inputs, args, err)
        report = _measure(model, small, inputs, report, args, err)
        return _write_outputs(small, inputs, out, onnx_out, report, args)

    report = run_deep(work, module_depth(model))
    try:
        if load_notes:
            report = report.with_extra(load={"path": str(args.model), "notes": load_notes})
        _finish(report.with_extra(input_file_bytes=input_bytes), report_path, args, err)
    except BaseException:  # a failed run leaves -o and --onnx as they were
        for path in new:
            _remove(path)
        raise
    return 0


def _run_checkpoint(args: argparse.Namespace, err: Console) -> int:
    """MODEL is a Hugging Face directory: compacted block by block into the directory -o."""
    from .stream import compact_checkpoint

    source, out = Path(args.model), Path(args.output)
    unsupported = [
        flag
        for flag, given in (
            ("--arch", args.arch), ("--onnx", args.onnx), ("--sparse-storage", args.sparse_storage),
            ("--round-to", args.round_to != 1), ("--input-shape", args.input_shape), ("--bench", args.bench),
            ("--format", args.format not in (None, "hf")), ("--strict", args.strict),
        )
        if given
    ]  # fmt: skip
    if unsupported:
        raise ExampleInputError(
            f"{unsupported[0]} does not apply to a checkpoint directory, which is compacted block by block; "
            f"leave it out (or give a file written by torch.save(model))"
        )
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise OutputPathError(f"-o {out} is the input directory or inside it; choose a new directory")
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise ExampleInputError(
            f"--tolerance {args.tolerance}: give a finite, non-negative number such as 1e-4"
        )
    report_path = check_output_path(args.report, args.model, force=False) if args.report else None
    inputs = read_example_inputs(args.example_inputs) if args.example_inputs else None
    report = compact_checkpoint(
        source, out, example_inputs=inputs, tolerance=args.tolerance, uniform=args.uniform,
        max_shard_size=_size(args.max_shard_size), trust_remote_code=args.trust_remote_code,
        progress=None if args.quiet else _progress(err),
    )  # fmt: skip
    if report_path is not None:
        text = json.dumps(report.to_dict(), indent=2, default=str)
        write_atomically(report_path, lambda tmp: _write_text(tmp, text))
    for warning in sorted({w for b in report.blocks for w in b.warnings}):
        err.print(f"warning: {warning}", markup=False)
    if not args.quiet:
        print(report.render())
        err.print(f"note: {out}: {report.layout}; load it with {report.load}", markup=False)
    return 0


def _progress(err: Console) -> Callable[..., None]:
    def show(block: Any, done: int, total: int, read: int, seconds: float) -> None:
        bar = "#" * round(20 * done / total)
        left = seconds / done * (total - done)
        err.print(
            f"[{bar:<20}] {done}/{total} blocks, {read / 2**30:.2f} GiB read, {seconds:.0f} s, ~{left:.0f} s left: "
            f"{block.name} {block.params_before:,} -> {block.params_after:,} parameters",
            markup=False,
        )

    return show


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _size(text: str | None) -> int | None:
    """``--max-shard-size``: bytes, or a count with KB/MB/GB (powers of 10) or KiB/MiB/GiB."""
    if text is None:
        return None
    number = text.strip().upper().rstrip("B") + ("B" if text.strip().upper().endswith("B") else "")
    digits = number.rstrip("KMGIB")
    unit = number[len(digits) :]
    try:
        value = float(digits) * _UNITS[unit]
    except (KeyError, ValueError):
        value = -1.0
    if not value >= 1:
        raise ExampleInputError(f"--max-shard-size {text}: give a size such as 5GB, 500MB or 2GiB")
    return int(value)


def _input_bytes(model: Path) -> int | None:
    try:
        return model.stat().st_size if model.is_file() else None
    except OSError:
        return None  # the loader says what is wrong with it


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _check_outputs(args: argparse.Namespace) -> tuple[Path, Path | None, Path | None]:
    """Every output path and option combination is checked before any work."""
    _check_distinct(args)
    kind = args.kind = format_for(args.output, args.format)  # before Path() drops a trailing "/"
    out = check_output_path(args.output, args.model, force=args.force, directory=kind == "hf")
    if args.sparse_storage and kind != "safetensors":
        raise OutputPathError("--sparse-storage writes safetensors: give -o FILE.safetensors")
    if args.prefix and not args.arch:
        raise ExampleInputError("--prefix goes with --arch (it strips a checkpoint's key prefix)")
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise ExampleInputError(
            f"--tolerance {args.tolerance}: give a finite, non-negative number such as 1e-4"
        )
    if args.repeats < 1 or args.threads < 1:
        raise ExampleInputError("--repeats and --threads: give positive counts")
    if args.round_to != "auto" and args.round_to < 1:
        raise ExampleInputError(
            f"--round-to {args.round_to}: give a positive channel multiple such as 8, or auto"
        )
    if args.target and args.round_to != "auto":
        raise ExampleInputError("--target says where --round-to auto times widths: add --round-to auto")
    if args.target == "cuda" and not torch.cuda.is_available():
        raise ExampleInputError("--target cuda needs a GPU, and torch.cuda.is_available() is False here")
    if not math.isfinite(args.time_limit) or args.time_limit < 0:
        raise ExampleInputError(f"--time-limit {args.time_limit}: give seconds such as 300 (0: no limit)")
    _backends(args)
    if args.onnx and Path(args.onnx).suffix.lower() != ".onnx":
        raise OutputPathError(f"--onnx {args.onnx}: give a path ending in .onnx (e.g. --onnx small.onnx)")
    onnx_out = check_output_path(args.onnx, args.model, force=args.force) if args.onnx else None
    report_path = check_output_path(args.report, args.model, force=False) if args.report else None
    return out, onnx_out, report_path


def _check_distinct(args: argparse.Namespace) -> None:
    """No two of MODEL, -o, --report, --onnx and --example-inputs may be one file (links resolved): writing
    one would destroy another. ``--force`` lets -o replace MODEL, and nothing else."""
    named = [
        (flag, Path(value))
        for flag, value in (
            ("MODEL", args.model),
            ("-o", args.output),
            ("--report", args.report),
            ("--onnx", args.onnx),
            ("--example-inputs", args.example_inputs),
        )
        if value
    ]
    for i, (flag_a, a) in enumerate(named):
        for flag_b, b in named[i + 1 :]:
            if (flag_a, flag_b) == ("MODEL", "-o"):
                continue  # check_output_path: refused unless --force
            if _same_file(a, b):
                raise OutputPathError(
                    f"{flag_a} {a} and {flag_b} {b} are the same file, so writing one would destroy the other; "
                    f"give each its own path"
                )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)  # hard links
    except OSError:
        return False


def _load(args: argparse.Namespace, notes: list[str]) -> torch.nn.Module:
    return read_model(args.model, args.arch, trust_pickle=args.trust_pickle, prefix=args.prefix, notes=notes)


def _measure(
    model: torch.nn.Module,
    small: torch.nn.Module,
    inputs: ExampleInputs,
    report: CompactionReport,
    args: argparse.Namespace,
    err: Console,
) -> CompactionReport:
    from .measure.timing import bench, count_macs

    if not args.bench:
        return report.with_extra(
            macs={"before": count_macs(model, inputs), "after": count_macs(small, inputs)}
        )
    backends: Any = _backends(args)  # names checked against BACKENDS
    if not args.quiet and err.is_terminal:
        err.print(f"timing dense and compacted, interleaved, on {', '.join(backends)}", markup=False)
    report = report.with_extra(
        **bench(model, small, inputs, backends=backends, threads=args.threads, repeats=args.repeats)
    )
    return _explain(model, small, inputs, report, args)


def _explain(
    model: torch.nn.Module,
    small: torch.nn.Module,
    inputs: ExampleInputs,
    report: CompactionReport,
    args: argparse.Namespace,
) -> CompactionReport:
    """Where a backend's speedup falls short of the MACs removed, time each rebuilt layer there, dense and
    compacted, for the report's "why not faster" lines (``--round-to auto`` timed its target's already)."""
    from .measure.probes import BackendTimer, layer_times
    from .modules import baked
    from .report.report import EFFICIENCY_FLOOR, efficiencies

    auto_target = report.extra.get("auto", {}).get("target")
    slow = [b for b, (_, eff) in efficiencies(report).items() if eff < EFFICIENCY_FLOOR and b != auto_target]
    if not slow:
        return report
    dense = baked(model, copy=False)
    timed = {b: layer_times(dense, small, inputs, BackendTimer(b, threads=args.threads)) for b in slow}  # type: ignore[arg-type]
    return report.with_extra(layer_ms=timed)


def _backends(args: argparse.Namespace) -> tuple[str, ...]:
    from .measure.timing import BACKENDS

    backends = tuple(b.strip() for b in args.backends.split(",") if b.strip())
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise ExampleInputError(
            f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}"
        )
    return backends


def _write_outputs(
    small: torch.nn.Module,
    inputs: ExampleInputs,
    out: Path,
    onnx_out: Path | None,
    report: CompactionReport,
    args: argparse.Namespace,
) -> CompactionReport:
    """Write -o (and --onnx); if any write fails, remove the ones this run already wrote."""
    written: list[Path] = []
    shapes = {"static_shapes": args.static_shapes, "keep_example_inputs": args.keep_example_inputs}
    try:
        if onnx_out is not None:
            existed = onnx_out.exists()
            record: dict[str, Any] = {}
            onnx_bytes = save_output(
                small, onnx_out, inputs, format="onnx", tolerance=args.tolerance, record=record, **shapes
            )
            if not existed:
                written.append(onnx_out)
            report = report.with_extra(onnx={"path": str(onnx_out), "bytes": onnx_bytes, **record})
        if args.sparse_storage:
            from .io.sparse import save_sparse

            sparse = save_sparse(small, out)
            size, kind = sparse.sparse_bytes, "safetensors (sparse)"
            report = report.with_extra(sparse_storage=sparse.to_dict())
            record = {}
        else:
            record = {}
            size = save_output(
                small,
                out,
                inputs,
                format=args.kind,
                tolerance=args.tolerance,
                arch=args.arch,
                record=record,
                **shapes,
            )
            kind = args.kind
        # The table's "file size after" is the file written: the pickle, the .pt2, the sparse storage...
        report = replace(report, file_bytes={"before": report.file_bytes["before"], "after": size})
        report = report.with_extra(output={"path": str(out), "bytes": size, "format": kind, **record})
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return report


def _run_demo(args: argparse.Namespace, parser: argparse.ArgumentParser, err: Console) -> int:
    """Write a masked example model, then compact it exactly as ``compact MODEL -o OUT`` would."""
    from .demo import DEMO_INPUT_SHAPE, demo_model

    with tempfile.TemporaryDirectory(prefix="compactor-demo-") as scratch:  # removed when the demo ends
        out = Path(args.output) if args.output else Path(scratch) / "small.pt"
        check_output_path(out, None, force=True)  # the user's -o first: its error names what they typed
        masked_path = (out.parent if args.output else Path(scratch)) / "demo_masked.pt"
        check_output_path(masked_path, None, force=True)
        write_atomically(masked_path, lambda tmp: torch.save(demo_model(), tmp))
        if not args.quiet:
            where = (
                f"compacting it to {out}"
                if args.output
                else "compacting it (pass -o small.pt to keep the result)"
            )
            err.print(f"demo: wrote a masked model to {masked_path}; {where}", markup=False)
        args.demo, args.model, args.output = False, str(masked_path), str(out)
        if not args.example_inputs and not args.input_shape:
            args.input_shape = [",".join(map(str, DEMO_INPUT_SHAPE))]
        return _run(args, parser, err)


def _compact(
    model: torch.nn.Module, inputs: ExampleInputs | None, args: argparse.Namespace, err: Console
) -> Any:
    options: dict[str, Any] = {
        "tolerance": args.tolerance,
        "round_to": args.round_to,
        "strict": args.strict,
        "uniform": args.uniform,
        "time_limit": args.time_limit or None,
    }
    if args.round_to == "auto":
        from .measure.probes import BackendTimer

        target = args.target or default_target(model, args.kind)
        options["timer"] = BackendTimer(target, threads=args.threads)
    if args.quiet or not err.is_terminal:
        return compact(model, inputs, **options)
    with err.status("compacting") as status:
        return compact(model, inputs, log=lambda msg: status.update(msg), **options)


def _finish(
    report: CompactionReport, report_path: Path | None, args: argparse.Namespace, err: Console
) -> None:
    if report_path is not None:
        text = json.dumps(report.to_dict(), indent=2, default=str)
        write_atomically(report_path, lambda tmp: _write_text(tmp, text))
    for warning in report.warnings:  # on stderr, even with -q: each says what was not proven or not removed
        err.print(f"warning: {warning}", markup=False)
    for note in report.extra.get("load", {}).get("notes", []) if not args.quiet else []:
        err.print(f"note: {report.extra['load']['path']}: {note}", markup=False)
    for key in ("output", "onnx"):
        for note in report.extra.get(key, {}).get("export", {}).get("notes", []):
            err.print(f"note: {report.extra[key]['path']}: {note}", markup=False)
    hf = report.extra.get("output", {}).get("hf")
    if hf and not args.quiet:
        how = (
            f"config.json states {hf['fields']}"
            if hf["layout"] == "config"
            else f"written with compactor's manifest ({hf['why']})"
        )
        err.print(f"note: {report.extra['output']['path']}: {how}; load it with {hf['load']}", markup=False)
    if not args.quiet:
        render(
            report, Console(highlight=False, soft_wrap=False, width=max(120, Console().width)), warnings=False
        )


def _round_to(text: str) -> int | str:
    """``--round-to``: ``auto`` or a whole number (checked for sign with the other options: one line, exit 2)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a channel multiple such as 8, or auto") from None


def _write_text(path: Path, text: str) -> None:
    path.write_text(text)


def _example_inputs(args: argparse.Namespace) -> ExampleInputs | None:
    if args.example_inputs and args.input_shape:
        raise ExampleInputError("give either --example-inputs or --input-shape, not both")
    if args.example_inputs:
        return read_example_inputs(Path(args.example_inputs))
    if args.input_shape:
        return from_shape_specs(args.input_shape)
    return None  # compact() infers a shape where the first layer fixes it, or says which flag to add


if __name__ == "__main__":
    sys.exit(main())
