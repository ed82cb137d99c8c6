"""Stage 6, verify: the loop that decides which plans ship, on the comparison of :mod:`compactor.outputs`.

The compacted model must reproduce every output of the masked model (:func:`compactor.outputs.compare`); a
plan whose removal breaks that is restored (:func:`decide`), judged in float32 or float64 where rounding could hide it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import VerificationError
from ..inputs import ExampleInputs
from ..outputs import (
    Floors,
    Outputs,
    Verdict,
    Wide,
    compare,
    noise_floors,
    reference_outputs,
    wide_dtype,
    widened,
)
from ..util import check_time
from .options import Log
from .plan import GroupPlan, round_layers, same_plans
from .rebuild import apply_plans


@dataclass(frozen=True)
class Decided:
    """What verification shipped: the plans, the compacted model, its verdict and the rounding floors used."""

    plans: list[GroupPlan]
    small: nn.Module
    verdict: Verdict
    floors: Floors | None
    judged_in: str | None = None  # the twin's float type where one judged the plans ("float32", "float64")
    proof: Verdict | None = None  # float64 copies compared, where the verdict leans on the rounding floors


# --- which plans ship -------------------------------------------------------------------------------
def decide(
    baked: nn.Module,
    plans: list[GroupPlan],
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float,
    say: Log,
    round_to: int,
    wide: Wide | None,
) -> Decided:
    """Which plans ship: the final plans, the compacted model, its verdict, and the rounding floors used.

    Every plan at once first. If that fails by a finite margin, it may be rounding (a deep float32
    network is ~1e-3 from exact arithmetic) or a wrong plan: the plans are judged in float64, where an
    exact plan is exact to 1e-12. If it crashes or changes a shape, the culprits are bisected out in the
    model's own precision first, and only the groups that then fail by a finite margin go to float64.
    16-bit models are judged on a wider twin from the start (``wide``: float32, and what fails there by a
    finite margin again in float64). The compacted model is finally checked
    in its own precision: as far from the masked model as both models' own rounding explains.
    """
    active = [p for p in plans if p.removed]
    accepted: list[GroupPlan] = []
    rejected: dict[int, Verdict] = {}
    first_model: nn.Module | None = None
    if wide is not None:
        pending = active
    else:
        first_model = apply_plans(baked, active) if active else None
        first = compare(first_model, runs, references, tolerance) if first_model is not None else None
        if first is None or not first.ok:
            first_model = None  # not what ships: free it before the next rebuild
        if first is None or first.ok:
            accepted, pending = active, []
        elif math.isfinite(first.max_abs_error):
            pending = active
        else:
            accepted, rejected = _search(baked, active, runs, references, tolerance, say)
            pending = [
                p for p in active if id(p) in rejected and math.isfinite(rejected[id(p)].max_abs_error)
            ]
        if pending:
            say(f"judging {len(pending)} groups in float64 (float32 rounding or a wrong plan)")
            wide = widened(baked, runs, always=True)
    if pending:
        assert wide is not None
        pending_ids = {id(p) for p in pending}
        accepted, again = _search(wide[0], pending, wide[1], wide[2], tolerance, say, accepted)
        rejected = {k: v for k, v in rejected.items() if k not in pending_ids} | again
        retry = [p for p in pending if id(p) in again and math.isfinite(again[id(p)].max_abs_error)]
        if retry and wide_dtype(wide) != torch.float64:  # a 16-bit model's float32 twin: one rung more
            say(f"judging {len(retry)} groups again in float64 (float32 rounding or a wrong plan)")
            wide = widened(baked, runs, always=True)
            assert wide is not None
            retry_ids = {id(p) for p in retry}
            accepted, again = _search(wide[0], retry, wide[1], wide[2], tolerance, say, accepted)
            rejected = {k: v for k, v in rejected.items() if k not in retry_ids} | again

    floors = noise_floors(references, wide[2]) if wide is not None else None
    final = round_layers(
        baked, _restore(plans, rejected), round_to
    )  # a restored group can leave a shared layer off
    shipped = [p for p in final if p.removed]
    if first_model is not None and first is not None and same_plans(shipped, active):  # verified already
        small, verdict = first_model, first
    else:
        first_model = None
        small = apply_plans(baked, shipped)
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
        lost = _search(baked, [p for p in final if p.removed], runs, references, tolerance, say, [], floors)[
            1
        ]
        final = round_layers(baked, _restore(final, lost), round_to)
        small = apply_plans(baked, [p for p in final if p.removed])
        verdict = compare(small, runs, references, tolerance, floors)
    if not verdict.ok:  # only possible if the unmodified model is itself not reproducible
        raise VerificationError(f"the rebuilt model does not reproduce the masked model: {verdict.summary()}")
    proof = None
    if wide is not None and floors is not None and not compare(small, runs, references, tolerance).ok:
        final, small, verdict, proof = _proven(
            baked, final, small, verdict, runs, references, tolerance, say, round_to, floors
        )
    judged = str(wide_dtype(wide)).removeprefix("torch.") if wide is not None else None
    return Decided(final, small, verdict, floors, judged, proof)


def _proven(
    baked: nn.Module,
    final: list[GroupPlan],
    small: nn.Module,
    verdict: Verdict,
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float,
    say: Log,
    round_to: int,
    floors: Floors,
) -> tuple[list[GroupPlan], nn.Module, Verdict, Verdict]:
    """Where the compacted model is within the tolerance of the masked one only by the masked model's own
    rounding (a detector whose top-k picks among tied scores moves by ~1 under float32 rounding alone), that
    proves little: compare float64 copies of both, with the plain tolerance, and restore what fails there
    (``small`` and ``verdict``: the compacted model of ``final`` and its verdict, kept where nothing fails)."""
    wide = widened(baked, runs, always=True)
    assert wide is not None
    shipped = [p for p in final if p.removed]
    proof = compare(apply_plans(wide[0], shipped), wide[1], wide[2], tolerance)
    if not proof.ok:
        say("the float64 copies differ: checking each group on them")
        lost = _search(wide[0], shipped, wide[1], wide[2], tolerance, say)[1]
        final = round_layers(baked, _restore(final, lost), round_to)
        shipped = [p for p in final if p.removed]
        proof = compare(apply_plans(wide[0], shipped), wide[1], wide[2], tolerance)
        small = apply_plans(baked, shipped)
        verdict = compare(small, runs, references, tolerance, floors)
    if not (proof.ok and verdict.ok):
        raise VerificationError(
            f"the rebuilt model does not reproduce the masked model: {(proof if not proof.ok else verdict).summary()}"
        )
    return final, small, verdict, proof


def check_baked(
    dense: nn.Module, runs: list[ExampleInputs], references: list[Outputs], tolerance: float
) -> None:
    """The masked model with its masks baked in (before anything is removed) must give the outputs of the
    model as the user holds it, within the plain tolerance: the rounding floors measure the distance to the
    baked model's float64 twin, and would otherwise absorb any difference between the two."""
    verdict = compare(dense, runs, references, tolerance)
    if not verdict.ok:
        raise VerificationError(
            f"the model with its masks baked in does not give the outputs of the model as you hold it "
            f"({verdict.summary()}); nothing was written: report this"
        )


def _restore(plans: list[GroupPlan], rejected: dict[int, Verdict]) -> list[GroupPlan]:
    return [p.restored(rejected[id(p)].summary()) if id(p) in rejected else p for p in plans]


def _search(
    baked: nn.Module,
    plans: list[GroupPlan],
    runs: list[ExampleInputs],
    references: list[Outputs],
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
        check_time(
            f"verification of the channel group of {candidates[0].group.root}"
            + (f" and {len(candidates) - 1} more" if len(candidates) > 1 else "")
        )
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
