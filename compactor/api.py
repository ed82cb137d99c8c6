"""``compact(model, example_inputs)``: the pipeline from a masked model to a verified, smaller one.

masks -> heads -> graph -> plan -> rebuild -> verify (bisecting out any group that breaks equality) ->
report; each stage is a module of :mod:`compactor.engine`, and this module only strings them together.
Reading and writing files live in :mod:`compactor.io`; the CLI adds them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from statistics import median
from typing import Any, Literal, cast

import torch
from torch import nn

from .engine.coupling import ANALYSES, Analysis, build_groups
from .engine.coverage import Coverage, Paths, check_train_mode, find_paths, hold_train_only, watch
from .engine.heads import HeadChange, compact_heads, head_layers
from .engine.masks import check_unwritten, masked_view
from .engine.plan import GroupPlan, Planner, consumer_layers, observe_inputs
from .engine.plan.autowidth import WHOLE_STEPS, AutoWidths, GroupChoice, LayerTime, WholeChoice, WidthSearch
from .engine.verify import Log, decide, same_plans
from .errors import (
    ExampleInputError,
    GraphError,
    ModelForwardError,
    ModelStructureError,
    UnverifiedPathError,
    VerificationError,
    first_line,
)
from .inputs import ExampleInputs, flatten_values, infer_example_inputs, padded, run, unchecked_outputs
from .io.sparse import sparsity_report
from .layers import inconsistency
from .measure.probes import BackendTimer, Timer, rounds_of
from .measure.timing import BACKENDS, Backend, count_macs
from .modules import baked, clone_module, reparametrized
from .outputs import DEFAULT_TOLERANCE, Outputs, compare, reference_outputs, sliced_note, widened
from .report.filters import pruned_filters
from .report.report import (
    CompactionReport,
    count_params,
    dead_model_warnings,
    layer_changes,
    serialized_bytes,
    zeroed_channels,
)
from .report.sparsity import unstructured_warnings
from .util import check_time, deadline, module_depth, run_deep

FRESH_RUNS = 2  # random inputs checked besides the example inputs
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
    network, any float16/bfloat16 model) the decisions are made on float64 copies and the result is held
    to the masked model's own rounding (``report.extra["rounding_floor"]``).

    What the example inputs cannot show is said in ``report.warnings`` (``report.extra["paths"]``): a
    branch on tensor values, a layer no forward called (left as it was). ``strict=True`` refuses both
    (:class:`~compactor.errors.UnverifiedPathError`). Layers that run only in train mode keep the channels
    they read, and the compacted model's train-mode outputs are checked for structure and shape.

    ``analysis``: which channel analysis couples the layers: ``"auto"`` (Torch-Pruning's graph where it can
    be trusted, compactor's own channel labels where it cannot), or ``"torch-pruning"`` / ``"labels"`` alone,
    to compare them; the verification judges every one.

    ``time_limit``: seconds (None: no limit); past it, :class:`~compactor.errors.TimeLimitError` names the
    part that could not be analysed, and nothing is returned.
    """
    auto = round_to == "auto"
    if not auto and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or 'auto', found {round_to!r}")
    if target is not None and target not in BACKENDS:
        raise ValueError(f"target must be one of {', '.join(BACKENDS)}, found {target!r}")
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be one of {', '.join(ANALYSES)}, found {analysis!r}")

    def work() -> tuple[nn.Module, CompactionReport]:
        with deadline(time_limit):
            return _compact(
                model, example_inputs, tolerance, log, round_to, strict, uniform, target, timer, analysis
            )

    return run_deep(work, module_depth(model))


def _compact(
    model: nn.Module,
    example_inputs: Any,
    tolerance: float,
    log: Log | None,
    round_to: int | Literal["auto"],
    strict: bool,
    uniform: bool,
    target: Backend | None,
    timer: Timer | None,
    analysis: Analysis,
) -> tuple[nn.Module, CompactionReport]:
    auto = round_to == "auto"
    step = 1 if auto else cast(int, round_to)
    say = log or (lambda _msg: None)
    seconds: dict[str, float] = {}
    _check_layers(model)
    inputs = resolve_example_inputs(model, example_inputs)
    inputs.check_finite()

    with _timed(seconds, "masks"):
        masked, shared = masked_view(model)  # the user's model as it is: its own pruning hooks and tensors
        masked.eval()
        generator = torch.Generator().manual_seed(0)
        candidates = [  # made outside the watch: making them reads tensor values
            [inputs, *padded([inputs.fresh(generator, integers=integers) for _ in range(FRESH_RUNS)])]
            for integers in (True, False)
        ]
        with watch(masked) as seen:
            with torch.no_grad():
                first = run(masked, inputs)  # fails with one clear line if the inputs do not fit
            unchecked = unchecked_outputs(first)
            runs, references, fresh_note = _references(masked, candidates, flatten_values(first), seen)
            del first
        check_finite(references)
        same = len(runs)  # the runs at the example's shapes; the one at another size (if any) comes last
        other, other_references, sizes = _other_size(masked, inputs, generator)
        runs, references = [*runs, *other], [*references, *other_references]
        del masked  # the references are all that is needed of it: free what its hooks computed
        written = check_unwritten(shared)
        if written is not None:
            raise ModelStructureError(
                f"{written}: its outputs change from one call to the next, so no compaction can be verified "
                f"against them; make the forward leave its weights alone (data-dependent initialisation done once, "
                f"before pruning)"
            )
        folded = reparametrized(model)
        baked_model = baked(model).eval()
        paths = find_paths(baked_model, seen, inputs)
    if strict and paths.unproven():
        raise UnverifiedPathError(f"--strict: {paths.unproven()[0]}")
    original = baked_model
    heads: list[HeadChange] = []
    check_time("the attention heads")
    if head_layers(baked_model):  # whole attention heads first: channel groups cannot take them apart
        say("removing zeroed attention heads")
        with _timed(seconds, "heads"):
            baked_model, heads = _without_heads(baked_model, inputs, runs, references, tolerance, paths)
    with _timed(seconds, "float64"):
        # Decide in float64 where the model holds 16-bit floats: their rounding (8 bits of mantissa in
        # bfloat16) would hide a wrong plan under the tolerance that an exact one needs.
        wide = widened(original, baked_model, runs)
        d_baked, d_runs = (wide[0], wide[1]) if wide is not None else (baked_model, runs)
    check_time("the channel dependencies (torch-pruning's trace)")
    say("tracing channel dependencies (torch-pruning)")
    untraced: list[str] = []
    with _timed(seconds, "graph"):
        try:
            groups = build_groups(d_baked, d_runs[0], analysis=analysis)
        except GraphError as e:  # a tracer failure never ends the run: every channel is kept, and said so
            groups, untraced = [], [f"{e}: no channel was removed (attention heads may still go)"]
        if (
            paths.train_only and groups
        ):  # couple what runs only in train mode too, and keep the channels it reads
            say("tracing train-mode channel dependencies")
            try:
                train_groups = build_groups(clone_module(d_baked), d_runs[0], train=True, analysis=analysis)
                groups = hold_train_only(groups, train_groups, set(paths.train_only))
            except GraphError as e:  # what the train-mode paths read is unknown: every group stays whole
                why = f"the train-mode forward could not be traced ({e})"
                groups = [replace(g, held=(*g.held, why)) for g in groups]
    check_time("the plan of every channel group")
    say(f"planning {len(groups)} channel groups")
    with _timed(seconds, "plan"):
        layers = consumer_layers(groups, d_baked)
        stats = observe_inputs(d_baked, d_runs[: min(2, same)], layers)
        if len(d_runs) > same:  # at another size too: a constant that depends on the size varies across runs
            stats = stats.merged(observe_inputs(d_baked, d_runs[same:], layers))
        planner = Planner(d_baked, groups, stats, d_runs[: min(2, same)])
        plans = planner.plans(round_to=step, uniform=uniform)
    check_time("the rebuilt model (verification)")
    search: WidthSearch | None = None
    exact_plans = plans
    if auto and any(p.removed for p in plans):
        timer = timer or BackendTimer(target or default_target(model))
        say(f"timing candidate widths on {timer.target}")
        with _timed(seconds, "auto_widths"):
            search = WidthSearch(planner, baked_model, inputs, timer)
            plans, choices, untimed_groups, whole = _choose_widths(
                search, planner, baked_model, original, inputs, plans, uniform
            )
    chosen_plans = plans
    say("rebuilding and verifying")
    with _timed(seconds, "rebuild_verify"):
        plans, small, verdict, floors = decide(
            original, baked_model, plans, runs, references, tolerance, say, step, wide
        )
    auto_extra: dict[str, Any] = {}
    if search is not None:
        say(f"timing the layers and the whole model on {search.timer.target}, dense and compacted")
        with _timed(seconds, "auto_check"):
            exact = _restored_alike(exact_plans, chosen_plans, plans)
            timed = whole if whole is not None and same_plans(chosen_plans, plans) else None
            result = replace(
                _check_widths(
                    search, original, small, inputs, choices, untimed_groups, seconds["auto_widths"], timed
                ),
                extra_params=search.extra_params(exact, plans),
                layers=_layer_times(search, plans, untimed_groups),
            )
            result = replace(
                result,
                untimed=tuple(untimed_groups),
                whole=whole,
                padded=sum(len(f.removed) < len(e.removed) for e, f in zip(exact, plans)),
            )
            # MACs beside the times: the report's efficiency (speedup / MACs ratio) of what auto chose
            macs = {"before": count_macs(original, inputs), "after": count_macs(small, inputs)}
        auto_extra = {"auto": result.to_dict(), "macs": macs}
    train_problem = check_train_mode(paths, small)
    if train_problem is not None:
        raise VerificationError(f"{train_problem}; nothing was written: report this")
    small.train(model.training)
    sparsity = [layer for layer in sparsity_report(small) if layer.zeros]

    report = CompactionReport(
        params={"before": count_params(original), "after": count_params(small)},
        file_bytes={"before": serialized_bytes(original), "after": serialized_bytes(small)},
        max_abs_error=verdict.max_abs_error,
        tolerance=tolerance,
        verified_runs=len(runs),
        inputs=inputs.describe(),
        layers=layer_changes(original, small),
        zeroed=zeroed_channels(plans),
        filters=pruned_filters(
            d_baked, plans, uncalled=frozenset(name for name, _ in paths.uncalled), traced=not untraced
        ),
        warnings=(
            *_guess_warning(inputs),
            *_quantized_warning(original),
            *_unchecked_warning(unchecked),
            *untraced,
            *paths.warnings(),
            *([fresh_note] if fresh_note else []),
            *dead_model_warnings(references[:same], plans),  # at one size: shapes differ at another
            *unstructured_warnings(small),
            *(_slower_warning(result) if search is not None else ()),
        ),
        seconds=seconds,
        extra={
            "graph_issues": sorted({i for g in groups for i in g.issues}),
            **({"heads": [h.to_dict() for h in heads]} if heads else {}),
            **({"rounding_floor": max(max(f, default=0.0) for f in floors)} if floors else {}),
            "sparsity": [layer.to_dict() for layer in sparsity],
            **({"reparametrizations": folded} if folded else {}),
            "round_to": round_to,
            "sizes": sizes,
            **({"cache": note} if (note := sliced_note(verdict)) else {}),
            "paths": paths.to_dict(),
            **({"path_notes": paths.notes()} if paths.notes() else {}),
            **auto_extra,
        },
    )
    return small, report


def _choose_widths(
    search: WidthSearch,
    planner: Planner,
    model: nn.Module,
    dense: nn.Module,
    inputs: ExampleInputs,
    plans: list[GroupPlan],
    uniform: bool,
) -> tuple[list[GroupPlan], list[GroupChoice], list[str], WholeChoice | None]:
    """``round_to="auto"``: the plans again with each group held at the width timed fastest, then that
    choice against the exact widths and uniform roundings, each timed as a whole model (``model``: the model
    the plans apply to, in its own precision; ``dense``: the masked model baked, before any head went)."""
    chosen, choices, untimed = search.choose(plans)
    greedy = planner.plans(uniform=uniform, widths=chosen) if chosen else plans
    candidates = {"per group": greedy, "exact": plans}
    for step in WHOLE_STEPS:
        candidates[f"all x{step}"] = planner.plans(uniform=uniform, widths=search.rounded(plans, step))
    try:
        whole = search.whole(model, inputs, candidates, dense)
    except AssertionError:  # compactor's own check (a rebuild wrote into the model it copies): a bug, said so
        raise
    except Exception as e:  # exporters' and runtimes' failures have no common type: the greedy choice stands
        untimed.append(f"the whole-model check ({first_line(e, with_type=True)})")
        return greedy, choices, untimed, None
    return candidates[whole.picked], choices, untimed, whole


def _check_widths(
    search: WidthSearch,
    dense: nn.Module,
    small: nn.Module,
    inputs: ExampleInputs,
    choices: list[GroupChoice],
    untimed: list[str],
    tuning_seconds: float,
    timed: WholeChoice | None = None,
) -> AutoWidths:
    """The whole model timed dense and compacted on the target (a failure to run there is said, not raised:
    the widths stand). ``timed``: the whole-model check that already timed both, where it shipped as timed."""
    model_ms: dict[str, float] | None = None
    if timed is not None and timed.dense_ms is not None and timed.picked in timed.ms:
        model_ms = {"before": timed.dense_ms, "after": timed.ms[timed.picked]}
    else:
        try:
            t = rounds_of(search.timer.models({"dense": dense, "small": small}, inputs))
            model_ms = {"before": median(t["dense"]) * 1000, "after": median(t["small"]) * 1000}
        except Exception as e:  # the exporters' and runtimes' failures have no common type
            untimed.append(f"the whole model ({first_line(e, with_type=True)})")
    return AutoWidths(search.timer.target, tuple(choices), tuning_seconds, tuple(untimed), model_ms=model_ms)


def _layer_times(search: WidthSearch, plans: list[GroupPlan], untimed: list[str]) -> tuple[LayerTime, ...]:
    try:
        return tuple(search.layer_times(plans))
    except Exception as e:  # as above: a layer the backend cannot run alone
        untimed.append(f"the layers alone ({first_line(e, with_type=True)})")
        return ()


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


def _restored_alike(
    exact: list[GroupPlan], chosen: list[GroupPlan], final: list[GroupPlan]
) -> list[GroupPlan]:
    """The exact plans, less the groups verification restored (so the padding alone is counted)."""
    return [f if c.removed and not f.removed else e for e, c, f in zip(exact, chosen, final)]


def _slower_warning(result: AutoWidths) -> list[str]:
    if not result.slower or result.model_ms is None:
        return []
    worst = (
        ", ".join(f"{t.layer} {t.before_ms:.3f} → {t.after_ms:.3f} ms" for t in result.responsible()[:5])
        or "no single layer (the time goes between layers)"
    )
    return [
        f"the compacted model ran slower than the dense one on {result.target} ({result.model_ms['after']:.2f} ms "
        f"against {result.model_ms['before']:.2f} ms, with --round-to auto); layers slower compacted than dense: "
        f"{worst}"
    ]


def _without_heads(
    model: nn.Module,
    inputs: ExampleInputs,
    runs: list[ExampleInputs],
    references: list[Any],
    tolerance: float,
    paths: Paths,
) -> tuple[nn.Module, list[HeadChange]]:
    """:func:`compactor.engine.heads.compact_heads`, verified against the masked model's outputs."""

    def check(candidate: nn.Module) -> str | None:
        verdict = compare(candidate, runs, references, tolerance)
        return None if verdict.ok else verdict.summary()

    uncalled = frozenset(name for name, _ in paths.uncalled)
    new, heads = compact_heads(model, inputs, verify=check, skip=uncalled)
    return new.eval(), heads


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


def _unchecked_warning(unchecked: list[str]) -> list[str]:
    if not unchecked:
        return []
    more = f" and {len(unchecked) - 3} more" if len(unchecked) > 3 else ""
    return [
        f"the model returns objects that are neither tensors nor plain values ({', '.join(unchecked[:3])}{more}): "
        f"they were not compared; return tensors, numbers or dataclasses of them to have them verified"
    ]


def _guess_warning(inputs: ExampleInputs) -> list[str]:
    if inputs.guess is None:
        return []
    return [
        f"no example inputs were given: compacted and verified on a guessed input of shape {inputs.guess}; pass "
        f"--input-shape (Python: example_inputs) with the real size, which exports also take"
    ]


def _references(
    masked: nn.Module, candidates: list[list[ExampleInputs]], example: Outputs, seen: Coverage
) -> tuple[list[ExampleInputs], list[Outputs], str | None]:
    """The runs verification compares and the masked model's outputs on them: the example inputs (whose
    outputs, ``example``, are known) and random ones like them (``candidates[0]``). Where the model itself
    fails on random integers (token ids laid out as it expects: image tokens, special ids), the fresh runs
    keep the example's integers (``candidates[1]``); where it fails even then, only the example inputs are
    checked, and that is said. ``seen`` keeps the branch outcomes of the runs that are verified only."""
    why = ""
    for i, runs in enumerate(candidates):
        before = seen.snapshot()
        try:
            references = [example, *reference_outputs(masked, runs[1:])]
        except Exception as e:  # the model's own check on its inputs, not a compaction problem
            why = first_line(e, with_type=True)
            seen.restore(before)
            continue
        note = f"fresh inputs keep the example's integer inputs: random ones fail ({why})" if i else None
        return runs, references, note
    note = f"verified on the example inputs only: the model fails on random inputs like them ({why})"
    return candidates[0][:1], [example], note


def _other_size(
    masked: nn.Module, inputs: ExampleInputs, generator: torch.Generator
) -> tuple[list[ExampleInputs], list[Outputs], str]:
    """One run at another size (:meth:`ExampleInputs.resized`) with the masked model's outputs on it, where
    the model takes it: a channel whose constant depends on the input's size (a softmax or a sum over
    positions) then varies across the runs and stays, and verification checks the plan there too. A model
    with fixed sizes (position embeddings, a Linear after a flatten) is checked at the example's size only;
    the string says which happened (``report.extra["sizes"]``)."""
    other = inputs.resized(generator)
    if other is None:
        return [], [], "checked at the example's size only: no input has positions to resize"
    try:
        outputs = reference_outputs(masked, [other])
    except Exception as e:  # the model fixes its sizes: not a compaction problem
        why = first_line(e, with_type=True)
        return [], [], f"checked at the example's size only: the model fails at [{other.describe()}] ({why})"
    finite = all(
        not isinstance(v, torch.Tensor) or not v.is_floating_point() or bool(torch.isfinite(v).all())
        for _, v in outputs[0]
    )
    if not finite:
        return [], [], f"checked at the example's size only: outputs at [{other.describe()}] hold NaN or Inf"
    return [other], outputs, f"also observed and verified at [{other.describe()}]"


_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized")


def _quantized_warning(model: nn.Module) -> list[str]:
    """Quantized layers (``quantize_dynamic``, eager-mode ``convert``) hold packed integer weights that no
    shrinker rebuilds: they stay whole, and so do the channels they write or read."""
    found: list[str] = []
    outer: list[str] = []  # a quantized layer's own parts (its packed params) are not named again
    for name, m in model.named_modules():
        if type(m).__module__.startswith(_QUANTIZED) and not any(name.startswith(f"{o}.") for o in outer):
            outer.append(name)
            kind = f"{type(m).__module__}.{type(m).__name__}".removeprefix("torch.ao.nn.").removeprefix(
                "torch.nn."
            )
            found.append(f"{name or '(the model itself)'} ({kind})")
    if not found:
        return []
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return [
        f"{len(found)} quantized layer(s) left whole ({', '.join(found[:3])}{more}): compactor rebuilds float "
        f"layers only, so the channels they write or read stay; compact the float model, then quantize"
    ]


def _check_layers(model: nn.Module) -> None:
    for name, module in model.named_modules():
        problem = inconsistency(name or "(the model itself)", module)
        if problem is not None:
            raise ModelStructureError(
                f"{problem}: the model was built or edited inconsistently; rebuild that layer with arguments that "
                f"match its weights"
            )


def check_finite(references: list[Outputs]) -> None:
    """The masked model's outputs must be finite: NaN or Inf cannot be compared (NaN is never equal)."""
    for i, outputs in enumerate(references):
        for name, value in outputs:
            if (
                isinstance(value, torch.Tensor)
                and value.is_floating_point()
                and not bool(torch.isfinite(value).all())
            ):
                on = "the example inputs" if i == 0 else "random inputs drawn like the example inputs"
                raise ModelForwardError(
                    f"the model's output {name} holds NaN or Inf on {on}, so compaction cannot be verified there; "
                    f"give example inputs on which the model's outputs are finite"
                )


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 4)
