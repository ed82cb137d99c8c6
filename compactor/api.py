"""``compact(model, example_inputs)``: the pipeline from a masked model to a verified, smaller one.

masks -> heads -> coupling -> plan -> rebuild -> verify (bisecting out any group that breaks equality) ->
report: each stage is one function of :mod:`compactor.engine` (and :mod:`compactor.report.build`), called
with the :class:`~compactor.engine.options.Options` this module builds once; this module only calls them in
order. Reading and writing files live in :mod:`compactor.io`; the CLI adds them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from .engine.coupling import Analysis
from .engine.coupling.groups import CouplingCache
from .engine.coupling.stage import couple
from .engine.coverage import check_train_mode
from .engine.experts import ExpertChange, expert_stacks, remove_expert_neurons
from .engine.heads import HeadChange, head_layers, remove_heads
from .engine.masks import observe
from .engine.options import Log, Options
from .engine.plan.autowidth import Chosen, checked_widths, choose_widths
from .engine.plan.stage import make_plans
from .engine.verify import check_baked, decide
from .errors import ExampleInputError, ModelStructureError, UnverifiedPathError, VerificationError
from .inputs import ExampleInputs, infer_example_inputs
from .layers import inconsistency
from .measure.probes import BackendTimer, Timer
from .measure.timing import Backend, count_macs
from .modules import owned_copy
from .outputs import DEFAULT_TOLERANCE, widened
from .report.build import build_report
from .report.report import CompactionReport
from .util import check_time, deadline, module_depth, run_deep

DEFAULT_TIME_LIMIT = (
    300.0  # seconds; a 100M-parameter model is analysed well within it (benchmarks/REPORT.md)
)


def compact(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Log | None = None,
    round_to: int | Literal["auto"] = 1,
    strict: bool = False,
    uniform: bool = False,
    time_limit: float | None = DEFAULT_TIME_LIMIT,
    target: Backend | None = None,
    timer: Timer | None = None,
    analysis: Analysis = "auto",
    coupling_cache: CouplingCache | None = None,
) -> tuple[nn.Module, CompactionReport]:
    """Return a physically smaller copy of ``model`` that computes the same function, and a report.

    ``model`` may carry ``torch.nn.utils.prune`` masks or plain zeros; it is left untouched.
    ``example_inputs``: a tensor, a tuple/list of tensors, or a dict of keyword tensors. Raises
    :class:`~compactor.errors.CompactorError` subclasses for bad input.
    ``round_to``: keep every rebuilt channel count a multiple of it (hardware-friendly widths) by keeping
    some removable channels; exactness is unaffected. ``round_to="auto"``: per group of coupled channels,
    time its layers at the exact width and rounded up to 8, 16, 32, 64 on ``target`` (``"torch-cpu"``,
    ``"onnxruntime-cpu"``, ``"cuda"``; default: ``"cuda"`` for a model on a GPU, else ``"torch-cpu"``) and
    keep the fastest (``report.extra["auto"]``: the candidates, the time spent, the whole model timed dense
    and compacted, and a warning naming the layers responsible if it is still slower). ``timer``: a
    :class:`~compactor.measure.probes.Timer` to measure with instead (one thread by default). ``uniform``: every layer of a kind (the same name but
    for block numbers) keeps the same width, the largest, so that a Hugging Face config can state it.

    Outputs are compared with the masked model on the example inputs and fresh ones; a group whose removal
    breaks equality is restored. Where float rounding itself exceeds ``tolerance`` (a deep float32
    network, any float16/bfloat16 model) the decisions are made on wider copies (float64; float32 first for a
    16-bit model, then float64 for what fails there) and the result is held
    to the masked model's own rounding (``report.extra["rounding_floor"]``).

    What the example inputs cannot show is said in ``report.warnings`` (``report.extra["paths"]``): a
    branch on tensor values, a layer no forward called (left as it was). ``strict=True`` refuses both
    (:class:`~compactor.errors.UnverifiedPathError`). Layers that run only in train mode keep the channels
    they read, and the compacted model's train-mode outputs are checked for structure and shape.

    ``analysis``: which channel analysis couples the layers: ``"auto"`` (Torch-Pruning's graph where it can
    be trusted, compactor's own channel labels where it cannot), or ``"torch-pruning"`` / ``"labels"`` alone,
    to compare them; the verification judges every one.

    ``coupling_cache``: a :class:`~compactor.engine.coupling.groups.CouplingCache` shared between calls on
    models built alike (the decoder blocks of one LLM): each structure's channel dependencies are traced
    once; every plan is still verified on its own model.

    ``time_limit``: seconds (None: no limit); past it, :class:`~compactor.errors.TimeLimitError` names the
    part that could not be analysed, and nothing is returned.
    """
    options = Options(tolerance, round_to, strict, uniform, target, timer, analysis, log, coupling_cache)

    def work() -> tuple[nn.Module, CompactionReport]:
        versions = [(t, t._version) for t in [*model.parameters(), *model.buffers()]]
        with deadline(time_limit):
            small, report = _compact(model, example_inputs, options)
        # the stages share the user's tensors and never write them (checked); what is returned owns its own
        if any(t._version != v for t, v in versions):
            raise AssertionError("compaction wrote into the user's model: report this")
        return owned_copy(small, model), report

    return run_deep(work, module_depth(model))


def _compact(model: nn.Module, example_inputs: Any, options: Options) -> tuple[nn.Module, CompactionReport]:
    seconds: dict[str, float] = {}
    _check_layers(model)
    inputs = resolve_example_inputs(model, example_inputs)
    inputs.check_finite()
    with _timed(seconds, "masks"):
        observed = observe(model, inputs)
    if options.strict and observed.paths.unproven():
        raise UnverifiedPathError(f"--strict: {observed.paths.unproven()[0]}")
    dense = current = observed.baked  # current: the model the later stages work on
    runs, references = observed.runs, observed.references
    heads: list[HeadChange] = []
    check_time("the attention heads")
    if head_layers(current):  # whole attention heads first: channel groups cannot take them apart
        options.say("removing zeroed attention heads")
        with _timed(seconds, "heads"):
            uncalled = frozenset(name for name, _ in observed.paths.uncalled)
            current, heads = remove_heads(current, inputs, runs, references, options.tolerance, uncalled)
    experts: list[ExpertChange] = []
    if expert_stacks(current):  # fused 3-D experts: each expert's neurons in an order of its own
        options.say("removing the neurons no expert uses")
        with _timed(seconds, "experts"):
            uncalled = frozenset(name for name, _ in observed.paths.uncalled)
            current, experts = remove_expert_neurons(current, runs, references, options.tolerance, uncalled)
    with _timed(seconds, "widen"):
        # Decide on a float32 twin where the model holds 16-bit floats: their rounding (8 bits of mantissa in
        # bfloat16) would hide a wrong plan under the tolerance that an exact one needs.
        wide = widened(current, runs)
        planned, planned_runs = (wide[0], wide[1]) if wide is not None else (current, runs)
    check_time("the channel dependencies (torch-pruning's trace)")
    options.say("tracing channel dependencies (torch-pruning)")
    with _timed(seconds, "graph"):
        coupled = couple(planned, planned_runs[0], observed.paths, options)
    check_time("the plan of every channel group")
    options.say(f"planning {len(coupled.groups)} channel groups")
    with _timed(seconds, "plan"):
        planner, plans = make_plans(planned, coupled.groups, planned_runs, observed.same, options)
    check_time("the rebuilt model (verification)")
    chosen: Chosen | None = None
    if options.auto and any(p.removed for p in plans):
        timer = options.timer or BackendTimer(options.target or default_target(model))
        options.say(f"timing candidate widths on {timer.target}")
        with _timed(seconds, "auto_widths"):
            chosen = choose_widths(planner, current, dense, inputs, plans, timer, options.uniform)
            plans = chosen.chosen
    options.say("rebuilding and verifying")
    with _timed(seconds, "rebuild_verify"):
        decided = decide(current, plans, runs, references, options.tolerance, options.say, options.step, wide)
        if decided.proof is not None:  # the float64 proof holds for the baked model: it must be the user's
            check_baked(dense, runs, references, options.tolerance)
    auto, macs = None, None
    if chosen is not None:
        options.say(
            f"timing the layers and the whole model on {chosen.search.timer.target}, dense and compacted"
        )
        with _timed(seconds, "auto_check"):
            auto = checked_widths(chosen, dense, decided.small, inputs, decided.plans)
            # MACs beside the times: the report's efficiency (speedup / MACs ratio) of what auto chose
            macs = {"before": count_macs(dense, inputs), "after": count_macs(decided.small, inputs)}
    train_problem = check_train_mode(observed.paths, decided.small)
    if train_problem is not None:
        raise VerificationError(f"{train_problem}; nothing was written: report this")
    decided.small.train(model.training)
    report = build_report(
        dense, planned, inputs, observed, heads, coupled, decided, tolerance=options.tolerance,
        round_to=options.round_to, seconds=seconds, auto=auto, macs=macs, experts=experts,
    )  # fmt: skip
    return decided.small, report


def default_target(model: nn.Module, output_format: str | None = None) -> Backend:
    """The backend ``round_to="auto"`` times on when none is named: ONNX Runtime for an ``.onnx`` output
    (where it is installed), CUDA for a model on a GPU, else PyTorch on the CPU."""
    if output_format == "onnx":
        import importlib.util

        if importlib.util.find_spec("onnxruntime") is not None:
            return "onnxruntime-cpu"
    if any(p.is_cuda for p in model.parameters()) and torch.cuda.is_available():
        return "cuda"
    return "torch-cpu"


def resolve_example_inputs(model: nn.Module, example_inputs: Any) -> ExampleInputs:
    """The example inputs as :class:`ExampleInputs` on the model's device; inferred where the first layer
    fixes the shape, else an error that names the flag to add."""
    if example_inputs is None:
        inferred = infer_example_inputs(model)
        if inferred is None:
            raise ExampleInputError(
                "cannot infer an input shape for this model; pass example inputs "
                "(CLI: --input-shape 1,3,224,224 or --example-inputs inputs.pt)"
            )
        example_inputs = inferred
    inputs = ExampleInputs.of(example_inputs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return inputs.to(device)


def _check_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        problem = inconsistency(name or "(the model itself)", module)
        if problem is not None:
            raise ModelStructureError(
                f"{problem}: the model was built or edited inconsistently; rebuild that layer with arguments that "
                f"match its weights"
            )


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 4)
