"""Stage 6, verify: the compacted model must reproduce every output of the masked model.

Every output tensor is compared, through nested tuples, lists, dicts and ``ModelOutput``s, on the
example inputs and on fresh random inputs of the same shapes and dtypes. A run passes when, for every
output, ``max|compact - masked| <= tolerance * max(1, max|masked|)``. All failures are collected, then
reported together, naming each output.

Removing a channel changes the order of a sum, so float outputs move by a few units in the last place.
For float32 that is far below the default tolerance; for float16/bfloat16 it is not (bfloat16 has 8
bits of mantissa), so the tolerance is never below ``ULPS`` machine epsilons of the output's dtype.
In a deep network the rounding accumulates: the masked model itself can be 1e-3 away from exact
arithmetic. ``floors`` (from :func:`noise_floors`: how far the masked model is from its own float64
copy) then let the compacted model be as far from the masked one as ``NOISE_FACTOR`` times that, and no
more; the decisions themselves are re-made in float64 by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .inputs import ExampleInputs, flatten_outputs

DEFAULT_TOLERANCE = 1e-4
ULPS = 4  # the least tolerance, in machine epsilons of each output's dtype
NOISE_FACTOR = 4.0  # allowed error, in units of the masked model's own rounding error (see floors)

Floors = list[list[float]]  # per run, per output: an absolute error the model's own rounding explains


@dataclass(frozen=True)
class Verdict:
    ok: bool
    max_abs_error: float  # over every output and run (inf where shapes differ or the forward fails)
    problems: tuple[str, ...]

    def summary(self) -> str:
        return "; ".join(self.problems[:3]) + (f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else "")


def reference_outputs(model: nn.Module, runs: list[ExampleInputs]) -> list[list[tuple[str, torch.Tensor]]]:
    with torch.no_grad():
        return [flatten_outputs(model(*r.args, **r.kwargs)) for r in runs]


def noise_floors(
    references: list[list[tuple[str, torch.Tensor]]], exact: list[list[tuple[str, torch.Tensor]]]
) -> Floors:
    """``NOISE_FACTOR * max|reference - exact|`` per run and output (``exact``: the float64 model's)."""
    return [
        [
            NOISE_FACTOR * (a.double() - b.double()).abs().max().item() if a.is_floating_point() and a.numel() else 0.0
            for (_, a), (_, b) in zip(ref, ex)
        ]
        for ref, ex in zip(references, exact)
    ]


def compare(
    candidate: nn.Module,
    runs: list[ExampleInputs],
    references: list[list[tuple[str, torch.Tensor]]],
    tolerance: float = DEFAULT_TOLERANCE,
    floors: Floors | None = None,
) -> Verdict:
    """Run ``candidate`` (in eval mode) on ``runs`` and compare with the reference outputs."""
    training = candidate.training
    candidate.eval()
    problems: list[str] = []
    worst = 0.0
    try:
        for i, (run, expected) in enumerate(zip(runs, references)):
            try:
                with torch.no_grad():
                    got = flatten_outputs(candidate(*run.args, **run.kwargs))
            except Exception as e:  # a rebuilt layer that no longer fits: a failed verification, not a crash
                return Verdict(False, float("inf"), (f"run {i}: forward failed: {type(e).__name__}: {e}",))
            error, found = _compare_run(expected, got, tolerance, i, floors[i] if floors else None)
            worst = max(worst, error)
            problems += found
    finally:
        candidate.train(training)
    return Verdict(not problems, worst, tuple(problems))


def _compare_run(
    expected: list[tuple[str, torch.Tensor]],
    got: list[tuple[str, torch.Tensor]],
    tolerance: float,
    run: int,
    floors: list[float] | None = None,
) -> tuple[float, list[str]]:
    if [n for n, _ in expected] != [n for n, _ in got]:
        return float("inf"), [f"run {run}: outputs {[n for n, _ in got]} instead of {[n for n, _ in expected]}"]
    worst, problems = 0.0, []
    for j, ((name, a), (_, b)) in enumerate(zip(expected, got)):
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"run {run}: {name} is {tuple(b.shape)}:{b.dtype}, expected {tuple(a.shape)}:{a.dtype}")
            worst = float("inf")
            continue
        if a.numel() == 0:
            continue
        if not a.is_floating_point():
            if not torch.equal(a, b):
                problems.append(f"run {run}: {name} differs (integer output)")
                worst = float("inf")
            continue
        error = (a.double() - b.double()).abs().max().item()
        scale = max(1.0, a.double().abs().max().item())
        allowed = max(max(tolerance, ULPS * torch.finfo(a.dtype).eps) * scale, floors[j] if floors else 0.0)
        if not error <= allowed:  # also catches NaN
            problems.append(f"run {run}: {name} max abs error {error:.3g} > {allowed:.3g}")
        worst = max(worst, error)
    return worst, problems


def depends_on_input(outs: list[list[tuple[str, torch.Tensor]]]) -> bool:
    """False when every run (the outputs of :func:`reference_outputs`) gave the same outputs: the model
    ignores its input."""
    first = outs[0]
    return any(
        any(not torch.equal(a, b) for (_, a), (_, b) in zip(first, other)) for other in outs[1:]
    )
