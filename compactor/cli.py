"""``compact``: the command line. Parse, call the API, print; one table from error type to message."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import __version__
from .api import compact
from .errors import (
    CompactorError,
    ExampleInputError,
    ExportError,
    GraphError,
    InputFileError,
    ModelForwardError,
    OutputPathError,
    VerificationError,
)
from .inputs import ExampleInputs, parse_shape
from .load import load_module
from .report import CompactionReport, render
from .save import check_output_path, save_module, write_atomically
from .verify import DEFAULT_TOLERANCE

EXAMPLES = """\
examples:
  compact --demo                                    build a masked example model, compact it, report
  compact model.pt -o small.pt --input-shape 1,3,224,224
  compact model.pt -o small.pt --example-inputs batch.pt --report report.json
  compact bert.pt -o small.pt --example-inputs tokens.pt     (a dict of input_ids, attention_mask)
  compact model.pt -o small.pt --input-shape 1,3,32,32 --input-shape 1,10   (two positional inputs)

MODEL is a file written by torch.save(model), masks attached (torch.nn.utils.prune) or baked in.
It is loaded without running code from the file: only nn.Module classes, pruning methods and plain
containers may appear in it; the current directory is importable so your model class resolves.
Every run verifies that the compacted model reproduces the masked model's outputs before writing.
exit status: 0 success, 2 bad input (one line on stderr), 1 internal error.
"""

# Exit status and prefix per error type: bad input is the user's to fix (2), the rest is ours (1).
EXIT_CODES: dict[type[CompactorError], int] = {
    InputFileError: 2,
    ExampleInputError: 2,
    ModelForwardError: 2,
    OutputPathError: 2,
    ExportError: 1,
    GraphError: 1,
    VerificationError: 1,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compact",
        description="Make a pruned PyTorch model physically smaller, losslessly, and prove it.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="model file written by torch.save(model)")
    p.add_argument("-o", "--output", metavar="OUT", help="where to write the compacted model (.pt)")
    p.add_argument("--demo", action="store_true", help="run on a built-in masked example model")
    inputs = p.add_argument_group("example inputs (one of)")
    inputs.add_argument(
        "--example-inputs", metavar="FILE", help="torch.save'd tensor, tuple/list of tensors, or dict of tensors"
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
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    p.add_argument("--force", action="store_true", help="allow -o to replace the input file")
    p.add_argument("--trust-pickle", action="store_true", help="load MODEL with full pickle (runs code from it)")
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
        err.print(f"error: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", markup=False)
        return 1


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser, err: Console) -> int:
    if args.demo:
        return _run_demo(args, err)
    if not args.model:
        parser.error("MODEL is required (or use --demo)")
    if not args.output:
        parser.error("-o/--output is required: where to write the compacted model, e.g. -o small.pt")
    out = check_output_path(args.output, args.model, force=args.force)
    report_path = check_output_path(args.report, args.model, force=False) if args.report else None
    model = load_module(args.model, trust_pickle=args.trust_pickle)
    inputs = _example_inputs(args)
    small, report = _compact(model, inputs, args, err)
    written = save_module(small, out)
    report = report.with_extra(output={"path": str(out), "bytes": written}, input_file_bytes=Path(args.model).stat().st_size)
    _finish(report, report_path, args)
    return 0


def _run_demo(args: argparse.Namespace, err: Console) -> int:
    from .demo import demo_inputs, demo_model

    workdir = Path(args.output).parent if args.output else Path(tempfile.mkdtemp(prefix="compactor-demo-"))
    out = check_output_path(args.output or workdir / "small.pt", None, force=True)
    masked_path = out.parent / "demo_masked.pt"
    save_module(demo_model(), masked_path)
    if not args.quiet:
        err.print(f"demo: wrote a masked model to {masked_path}; compacting it to {out}", markup=False)
    model = load_module(masked_path)
    small, report = _compact(model, ExampleInputs.of(demo_inputs()), args, err)
    written = save_module(small, out)
    report = report.with_extra(output={"path": str(out), "bytes": written}, input_file_bytes=masked_path.stat().st_size)
    report_path = check_output_path(args.report, None, force=False) if args.report else None
    _finish(report, report_path, args)
    return 0


def _compact(model: torch.nn.Module, inputs: ExampleInputs | None, args: argparse.Namespace, err: Console) -> Any:
    if args.quiet or not err.is_terminal:
        return compact(model, inputs, tolerance=args.tolerance)
    with err.status("compacting") as status:
        return compact(model, inputs, tolerance=args.tolerance, log=lambda msg: status.update(msg))


def _finish(report: CompactionReport, report_path: Path | None, args: argparse.Namespace) -> None:
    if report_path is not None:
        text = json.dumps(report.to_dict(), indent=2, default=str)
        write_atomically(report_path, lambda tmp: tmp.write_text(text))
    if not args.quiet:
        render(report, Console(highlight=False, soft_wrap=False, width=max(120, Console().width)))


def _example_inputs(args: argparse.Namespace) -> ExampleInputs | None:
    if args.example_inputs and args.input_shape:
        raise ExampleInputError("give either --example-inputs or --input-shape, not both")
    if args.example_inputs:
        return _load_example_inputs(Path(args.example_inputs))
    if args.input_shape:
        return _inputs_from_shapes(args.input_shape)
    return None  # compact() infers a shape where the first layer fixes it, or says which flag to add


def _load_example_inputs(path: Path) -> ExampleInputs:
    if not path.is_file():
        raise ExampleInputError(f"--example-inputs {path} does not exist; save one with torch.save(x, '{path}')")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for non-torch files
        raise ExampleInputError(
            f"--example-inputs {path} is not a torch.save'd tensor, tuple/list or dict of tensors ({type(e).__name__})"
        ) from e
    return ExampleInputs.of(value)


def _inputs_from_shapes(specs: list[str]) -> ExampleInputs:
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for spec in specs:
        shape_text, _, dtype_text = spec.partition(":")
        shape = parse_shape(shape_text)
        dtype = _dtype(dtype_text or "float32")
        if dtype.is_floating_point:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        else:
            tensors.append(torch.randint(0, 10, shape, generator=generator, dtype=dtype))
    return ExampleInputs(args=tuple(tensors))


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.strip(), None)
    if not isinstance(dtype, torch.dtype):
        raise ExampleInputError(f"unknown dtype {name!r} in --input-shape; use e.g. float32, float16, int64")
    return dtype


if __name__ == "__main__":
    sys.exit(main())
