"""``compact(model, example_inputs)``: the pipeline from a masked model to a verified, smaller one.

masks -> graph -> plan -> rebuild -> verify (bisecting out any group that breaks equality) -> report.
Loading and saving files live in :mod:`compactor.load` and :mod:`compactor.save`; the CLI adds them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import ExampleInputError, VerificationError
from .graph import build_groups
from .heads import HeadChange, compact_heads, head_layers
from .inputs import ExampleInputs, infer_example_inputs, run
from .masks import bake_masks, clone_module
from .plan import IGNORED, GroupPlan, consumer_layers, observe_inputs, plan_groups, round_layers
from .rebuild import apply_plans
from .report import CompactionReport, count_params, layer_changes, serialized_bytes, zeroed_channels
from .sparse import sparsity_report
from .verify import (
    DEFAULT_TOLERANCE,
    Floors,
    Verdict,
    compare,
    depends_on_input,
    noise_floors,
    reference_outputs,
)

Log = Callable[[str], None]
FRESH_RUNS = 2  # random inputs checked besides the example inputs


def compact(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    log: Log | None = None,
    round_to: int = 1,
) -> tuple[nn.Module, CompactionReport]:
    """Return a physically smaller copy of ``model`` that computes the same function, and a report.

    ``model`` may carry ``torch.nn.utils.prune`` masks or plain zeros; it is left untouched.
    ``example_inputs``: a tensor, a tuple/list of tensors, or a dict of keyword tensors. Raises
    :class:`~compactor.errors.CompactorError` subclasses for bad input.
    ``round_to``: keep every rebuilt channel count a multiple of it (hardware-friendly widths) by keeping
    some removable channels; exactness is unaffected.

    Outputs are compared with the masked model on the example inputs and fresh ones; a group whose removal
    breaks equality is restored. Where float rounding itself exceeds ``tolerance`` (a deep float32
    network, any float16/bfloat16 model) the decisions are made on float64 copies and the result is held
    to the masked model's own rounding (``report.extra["rounding_floor"]``).
    """
    if not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, found {round_to!r}")
    say = log or (lambda _msg: None)
    seconds: dict[str, float] = {}
    inputs = resolve_example_inputs(model, example_inputs)

    with _timed(seconds, "masks"):
        masked = clone_module(model).eval()
        run(masked, inputs)  # fails with one clear line if the inputs do not fit
        baked = clone_module(model).eval()
        bake_masks(baked)
        generator = torch.Generator().manual_seed(0)
        runs = [inputs] + [inputs.fresh(generator) for _ in range(FRESH_RUNS)]
        references = reference_outputs(masked, runs)
        del masked  # the references are all that is needed of it: free its weight_orig and mask copies
    original = baked
    heads: list[HeadChange] = []
    if head_layers(baked):  # whole attention heads first: channel groups cannot take them apart
        say("removing zeroed attention heads")
        with _timed(seconds, "heads"):
            baked, heads = _without_heads(baked, inputs, runs, references, tolerance)
    with _timed(seconds, "float64"):
        # Decide in float64 where the model holds 16-bit floats: their rounding (8 bits of mantissa in
        # bfloat16) would hide a wrong plan under the tolerance that an exact one needs.
        wide = _widened(original, baked, runs)
        d_baked, d_runs = (wide[0], wide[1]) if wide is not None else (baked, runs)
    say("tracing channel dependencies (torch-pruning)")
    with _timed(seconds, "graph"):
        groups = build_groups(d_baked, d_runs[0])
    say(f"planning {len(groups)} channel groups")
    with _timed(seconds, "plan"):
        stats = observe_inputs(d_baked, d_runs[:2], consumer_layers(groups, d_baked))
        plans = plan_groups(d_baked, groups, stats, round_to=round_to, runs=d_runs[:2])
    say("rebuilding and verifying")
    with _timed(seconds, "rebuild_verify"):
        plans, small, verdict, floors = _decide(original, baked, plans, runs, references, tolerance, say, round_to, wide)
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
        warnings=(*_warnings(references, plans), *_unstructured_warning(small)),
        seconds=seconds,
        extra={
            "graph_issues": sorted({i for g in groups for i in g.issues}),
            **({"heads": [h.to_dict() for h in heads]} if heads else {}),
            **({"rounding_floor": max(max(f, default=0.0) for f in floors)} if floors else {}),
            "sparsity": [layer.to_dict() for layer in sparsity],
            "round_to": round_to,
        },
    )
    return small, report


def _without_heads(
    baked: nn.Module, inputs: ExampleInputs, runs: list[ExampleInputs], references: list[Any], tolerance: float
) -> tuple[nn.Module, list[HeadChange]]:
    """:func:`compactor.heads.compact_heads`, verified against the masked model's outputs."""

    def check(candidate: nn.Module) -> str | None:
        verdict = compare(candidate, runs, references, tolerance)
        return None if verdict.ok else verdict.summary()

    new, heads = compact_heads(baked, inputs, verify=check)
    return new.eval(), heads


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _widened(
    original: nn.Module, baked: nn.Module, runs: list[ExampleInputs], *, always: bool = False
) -> tuple[nn.Module, list[ExampleInputs], list[Any]] | None:
    """float64 copies of the baked model, the inputs and the reference outputs, if the model holds
    16-bit floats (or ``always``); None otherwise.

    The references come from ``original``, the masked model with its masks baked in (before any attention
    head was removed): ``orig * mask`` is exact in float64, so it computes the masked function, without
    the ``weight_orig`` and mask copies that a float64 clone of the masked model would hold.
    """
    tensors = [*baked.parameters(), *baked.buffers()]
    if not always and not any(t.dtype in _LOW_PRECISION for t in tensors):
        return None
    wide_runs = [r.widened() for r in runs]
    wide_baked = clone_module(baked).to(torch.float64)
    wide_original = wide_baked if original is baked else clone_module(original).to(torch.float64)
    return wide_baked, wide_runs, reference_outputs(wide_original, wide_runs)


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


def _decide(
    original: nn.Module,
    baked: nn.Module,
    plans: list[GroupPlan],
    runs: list[ExampleInputs],
    references: list[Any],
    tolerance: float,
    say: Log,
    round_to: int,
    wide: tuple[nn.Module, list[ExampleInputs], list[Any]] | None,
) -> tuple[list[GroupPlan], nn.Module, Verdict, Floors | None]:
    """Which plans ship: the final plans, the compacted model, its verdict, and the rounding floors used.

    Every plan at once first. If that fails by a finite margin, it may be rounding (a deep float32
    network is ~1e-3 from exact arithmetic) or a wrong plan: the plans are judged in float64, where an
    exact plan is exact to 1e-12. If it crashes or changes a shape, the culprits are bisected out in the
    model's own precision first, and only the groups that then fail by a finite margin go to float64.
    16-bit models are judged in float64 from the start (``wide``). The compacted model is finally checked
    in its own precision: as far from the masked model as both models' own rounding explains.
    """
    active = [p for p in plans if p.removed]
    accepted: list[GroupPlan] = []
    rejected: dict[int, Verdict] = {}
    if wide is not None:
        pending = active
    else:
        first = compare(apply_plans(baked, active), runs, references, tolerance) if active else None
        if first is None or first.ok:
            accepted, pending = active, []
        elif math.isfinite(first.max_abs_error):
            pending = active
        else:
            accepted, rejected = _search(baked, active, runs, references, tolerance, say)
            pending = [p for p in active if id(p) in rejected and math.isfinite(rejected[id(p)].max_abs_error)]
        if pending:
            say(f"judging {len(pending)} groups in float64 (float32 rounding or a wrong plan)")
            wide = _widened(original, baked, runs, always=True)
    if pending:
        assert wide is not None
        pending_ids = {id(p) for p in pending}
        accepted, again = _search(wide[0], pending, wide[1], wide[2], tolerance, say, accepted)
        rejected = {k: v for k, v in rejected.items() if k not in pending_ids} | again

    floors = noise_floors(references, wide[2]) if wide is not None else None
    final = round_layers(baked, _restore(plans, rejected), round_to)  # a restored group can leave a shared layer off
    small = apply_plans(baked, [p for p in final if p.removed])
    verdict = compare(small, runs, references, tolerance, floors)
    if not verdict.ok and wide is not None:
        # Folded constants are rounded into the model's own dtype too: allow the compacted model's own
        # distance to its float64 twin (the twins themselves agreed within the tolerance).
        twin = reference_outputs(apply_plans(wide[0], [p for p in final if p.removed]), wide[1])
        own = noise_floors(reference_outputs(small, runs), twin)
        floors = [[a + b for a, b in zip(fa, fb)] for fa, fb in zip(floors or [], own)]
        verdict = compare(small, runs, references, tolerance, floors)
    if not verdict.ok and floors is not None:  # beyond both floors: keep the groups it holds for
        say("some groups decided in float64 do not hold in the model's own precision: checking them there")
        lost = _search(baked, [p for p in final if p.removed], runs, references, tolerance, say, [], floors)[1]
        final = round_layers(baked, _restore(final, lost), round_to)
        small = apply_plans(baked, [p for p in final if p.removed])
        verdict = compare(small, runs, references, tolerance, floors)
    if not verdict.ok:  # only possible if the unmodified model is itself not reproducible
        raise VerificationError(f"the rebuilt model does not reproduce the masked model: {verdict.summary()}")
    return final, small, verdict, floors


def _restore(plans: list[GroupPlan], rejected: dict[int, Verdict]) -> list[GroupPlan]:
    return [p.restored(rejected[id(p)].summary()) if id(p) in rejected else p for p in plans]


def _search(
    baked: nn.Module,
    plans: list[GroupPlan],
    runs: list[ExampleInputs],
    references: list[Any],
    tolerance: float,
    say: Log,
    accepted: list[GroupPlan] | None = None,
    floors: Floors | None = None,
) -> tuple[list[GroupPlan], dict[int, Verdict]]:
    """Bisect ``plans`` on top of the already ``accepted`` ones: return the plans that verify together
    (accepted included) and, by ``id``, the verdict of each plan that breaks equality on its own."""
    accepted = list(accepted or [])
    rejected: dict[int, Verdict] = {}

    def visit(candidates: list[GroupPlan]) -> None:
        if not candidates:
            return
        verdict = compare(apply_plans(baked, accepted + candidates), runs, references, tolerance, floors)
        if verdict.ok:
            accepted.extend(candidates)
        elif len(candidates) == 1:
            rejected[id(candidates[0])] = verdict
            say(f"restored group of {candidates[0].group.root}: {verdict.summary()}")
        else:
            mid = len(candidates) // 2
            visit(candidates[:mid])
            visit(candidates[mid:])

    visit([p for p in plans if p.removed])
    return accepted, rejected


UNSTRUCTURED_WARNING_AT = 0.05  # fraction of the compacted model's weights still zero


def _unstructured_warning(model: nn.Module) -> Iterator[str]:
    """Zeros outside whole zero slices (a kept carrier or channel is one) cannot shrink any layer."""
    scattered = {name: _scattered_zeros(p.detach()) for name, p in model.named_parameters() if p.dim() >= 2}
    sizes = {name: p.numel() for name, p in model.named_parameters() if p.dim() >= 2}
    zeros, total = sum(scattered.values()), sum(sizes.values())
    if not total or zeros / total < UNSTRUCTURED_WARNING_AT:
        return
    worst = sorted(scattered, key=lambda name: -scattered[name] / sizes[name])[:3]
    yield (
        f"{zeros:,} weights ({zeros / total:.0%} of all) are still zero but form no whole channel (unstructured "
        f"masks), so no layer can shrink by them; most in "
        + ", ".join(f"{name} {scattered[name] / sizes[name]:.0%}" for name in worst)
        + ". --sparse-storage (compactor.sparse.save_sparse) stores them compressed"
    )


def _scattered_zeros(w: torch.Tensor) -> int:
    """Zero entries of ``w`` that lie in no all-zero slice along dim 0 or dim 1."""
    zero = w == 0
    rows = zero.flatten(1).all(1).view(-1, *([1] * (w.dim() - 1)))
    cols = zero.movedim(1, 0).flatten(1).all(1).view(1, -1, *([1] * (w.dim() - 2)))
    return int((zero & ~rows & ~cols).sum())


def _warnings(references: list[Any], plans: list[GroupPlan]) -> Iterator[str]:
    if depends_on_input(references):
        return
    # A layer is dead when every channel it writes is input-independent; one whose channels are only
    # ignored by a dead layer downstream is a victim, not a cause, and is not named.
    dead = [
        p.group.root
        for p in plans
        if p.fates and len(p.fates) == p.group.size and not any(f.reason == IGNORED for f in p.fates)
    ]
    where = f" (every channel of {', '.join(dead[:3])} is pruned)" if dead else ""
    yield f"the model's output does not depend on its input{where}; compaction kept it exact, but check the pruning"


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = round(time.perf_counter() - start, 4)
