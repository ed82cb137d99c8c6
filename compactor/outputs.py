"""Outputs and their comparison: what verification, the writers' read-back checks and the exports share.

Every output tensor is compared, through nested tuples, lists, dicts and ``ModelOutput``s (and the tensors
of a KV cache), on the example inputs and on fresh random inputs of the same shapes and dtypes. A run passes
when, for every output, ``max|compact - masked| <= tolerance * max(1, max|masked|)``. All failures are
collected, then reported together, naming each output.

Removing a channel changes the order of a sum, so float outputs move by a few units in the last place.
For float32 that is far below the default tolerance; for float16/bfloat16 it is not (bfloat16 has 8
bits of mantissa), so the tolerance is never below ``ULPS`` machine epsilons of the output's dtype.
In a deep network the rounding accumulates: the masked model itself can be 1e-3 away from exact
arithmetic. ``floors`` (from :func:`noise_floors`: how far the masked model is from its own float64
copy) then let the compacted model be as far from the masked one as ``NOISE_FACTOR`` times that, and no
more (:func:`compactor.engine.verify.decide` re-makes the decisions in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .inputs import CachePath, ExampleInputs, Plain, flatten_values
from .modules import wide_clone
from .util import eval_mode_restored

DEFAULT_TOLERANCE = 1e-4
ULPS = 4  # the least tolerance, in machine epsilons of each output's dtype
NOISE_FACTOR = 4.0  # allowed error, in units of the masked model's own rounding error (see floors)

Outputs = list[tuple[str, torch.Tensor | Plain]]  # one forward pass, flattened: (path name, value)
Floors = list[list[float]]  # per run, per output: an absolute error the model's own rounding explains
_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Verdict:
    ok: bool
    max_abs_error: float  # over every output and run (inf where shapes differ or the forward fails)
    problems: tuple[str, ...]
    sliced: tuple[tuple[str, str], ...] = ()  # KV cache tensors compared head by head: (name, shape change)

    def summary(self) -> str:
        return "; ".join(self.problems[:3]) + (
            f" (+{len(self.problems) - 3} more)" if len(self.problems) > 3 else ""
        )


def reference_outputs(model: nn.Module, runs: list[ExampleInputs]) -> list[Outputs]:
    with torch.no_grad():
        return [flatten_values(model(*r.args, **r.kwargs)) for r in runs]


def noise_floors(references: list[Outputs], exact: list[Outputs]) -> Floors:
    """``NOISE_FACTOR * max|reference - exact|`` per run and output (``exact``: the float64 model's)."""
    return [
        [NOISE_FACTOR * _float_gap(a, b) for (_, a), (_, b) in zip(ref, ex)]
        for ref, ex in zip(references, exact)
    ]


def _float_gap(a: torch.Tensor | Plain, b: torch.Tensor | Plain) -> float:
    """``max|a - b|`` of two float tensors; 0 for anything else."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() and a.numel():
        if a.shape != b.shape:  # a KV cache with fewer heads (removed ones): each kept head against its match
            return _sliced_gap(a, b)
        return float((a.double() - b.double()).abs().max().item())
    return 0.0


def _sliced_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max`` over ``b``'s slices along the one dimension where the shapes differ of the gap to the
    closest slice of ``a``; 0 where the shapes differ otherwise (such outputs fail their comparison)."""
    differ = [d for d, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y]
    if a.dim() != b.dim() or len(differ) != 1:
        return 0.0
    d = differ[0]
    gaps = [
        min(float((a.select(d, i).double() - b.select(d, j).double()).abs().max()) for i in range(a.shape[d]))
        for j in range(b.shape[d])
    ]
    return max(gaps, default=0.0)


def compare(
    candidate: nn.Module,
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float = DEFAULT_TOLERANCE,
    floors: Floors | None = None,
) -> Verdict:
    """Run ``candidate`` (in eval mode) on ``runs`` and compare with the reference outputs."""
    problems: list[str] = []
    worst = 0.0
    sliced: dict[str, str] = {}
    with eval_mode_restored(candidate):
        for i, (run, expected) in enumerate(zip(runs, references)):
            try:
                with torch.no_grad():
                    got = flatten_values(candidate(*run.args, **run.kwargs))
            except Exception as e:  # a rebuilt layer that no longer fits: a failed verification, not a crash
                return Verdict(False, float("inf"), (f"run {i}: forward failed: {type(e).__name__}: {e}",))
            error, found = compare_outputs(
                expected, got, tolerance, floors[i] if floors else None, sliced=sliced
            )
            worst = max(worst, error)
            problems += [f"run {i}: {p}" for p in found]
    return Verdict(not problems, worst, tuple(problems), tuple(sorted(sliced.items())))


def compare_outputs(
    expected: Sequence[tuple[str, torch.Tensor | Plain]],
    got: Sequence[tuple[str, torch.Tensor | Plain]],
    tolerance: float,
    floors: list[float] | None = None,
    sep: str = " ",
    sliced: dict[str, str] | None = None,
) -> tuple[float, list[str]]:
    """The largest absolute error and one problem per output that differs: another name, shape or
    dtype, an integer that changed, or a float beyond ``max(tolerance, ULPS eps) * max(1, |expected|)``
    (and beyond ``floors``, where given). Verification and the export checks (ONNX Runtime) share it;
    ``sep`` goes between an output's name and its error ("output max abs error ...").

    A KV cache tensor (:class:`~compactor.inputs.CachePath`) with fewer heads than the masked model's (one
    dimension smaller) is compared head by head: each of its heads must match one of the masked model's, in
    order (:func:`_kept_slices`); ``sliced`` then records its name and how its shape changed."""
    if [n for n, _ in expected] != [n for n, _ in got]:
        return float("inf"), [f"outputs {[n for n, _ in got]} instead of {[n for n, _ in expected]}"]
    worst, problems = 0.0, []
    for j, ((name, a), (_, b)) in enumerate(zip(expected, got)):
        floor = floors[j] if floors else 0.0
        if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
            error = _plain_error(a, b)
            scale = max(1.0, abs(a)) if isinstance(a, float) else 1.0
            if not error <= tolerance * scale:
                problems.append(f"{name} is {b!r}, expected {a!r}")
        elif a.shape == b.shape and a.dtype == b.dtype:
            error, problem = _tensor_error(a, b, tolerance, floor)
            if problem:
                problems.append(f"{name}{sep}{problem}")
        elif isinstance(name, CachePath) and a.dtype == b.dtype and _fewer_heads(a, b) is not None:
            error, problem = _kept_slices(a, b, _fewer_heads(a, b) or 0, tolerance, floor)
            if problem:
                problems.append(f"{name}{sep}{problem}")
            elif sliced is not None:
                sliced[str(name)] = f"{tuple(a.shape)} -> {tuple(b.shape)}"
        else:
            problems.append(f"{name} is {tuple(b.shape)}:{b.dtype}, expected {tuple(a.shape)}:{a.dtype}")
            error = float("inf")
        worst = max(worst, error)
    return worst, problems


def _tensor_error(a: torch.Tensor, b: torch.Tensor, tolerance: float, floor: float) -> tuple[float, str]:
    """The error of ``b`` against ``a`` (same shape and dtype) and the problem, "" if within tolerance."""
    if a.numel() == 0:
        return 0.0, ""
    if not a.is_floating_point():
        return (0.0, "") if torch.equal(a, b) else (float("inf"), "differs (integer output)")
    error = (a.double() - b.double().to(a.device)).abs().max().item()
    scale = max(1.0, a.double().abs().max().item())
    allowed = max(max(tolerance, ULPS * torch.finfo(a.dtype).eps) * scale, floor)
    if not error <= allowed:  # also catches NaN
        return error, f"max abs error {error:.3g} > {allowed:.3g}"
    return error, ""


def _fewer_heads(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """1 where ``b`` has fewer heads than ``a`` (dimension 1 of a cache tensor: batch, heads, positions,
    head size) and every other dimension equal; else None."""
    if a.dim() != b.dim() or a.dim() < 3 or b.shape[1] >= a.shape[1]:
        return None
    return 1 if all(a.shape[d] == b.shape[d] for d in range(a.dim()) if d != 1) else None


def _kept_slices(
    a: torch.Tensor, b: torch.Tensor, dim: int, tolerance: float, floor: float
) -> tuple[float, str]:
    """``b`` against the slices of ``a`` along ``dim`` it kept: each slice of ``b`` must match a slice of
    ``a`` after the one the previous slice matched (heads keep their order when some go). Matching the
    earliest fitting slice is right for exact copies; the error is that of the matches."""
    worst, start = 0.0, 0
    for k in range(b.shape[dim]):
        kept = b.select(dim, k)
        for i in range(start, a.shape[dim]):
            error, problem = _tensor_error(a.select(dim, i), kept, tolerance, floor)
            if not problem:
                worst, start = max(worst, error), i + 1
                break
        else:
            return float("inf"), (
                f"holds {b.shape[dim]} of {a.shape[dim]} slices of dimension {dim} (heads) and its slice {k} is "
                f"none of the masked model's after slice {start - 1}"
            )
    return worst, ""


def sliced_note(verdict: Verdict) -> str | None:
    """One line for the report where KV cache tensors were compared head by head (:func:`_kept_slices`)."""
    if not verdict.sliced:
        return None
    shown = ", ".join(f"{name} {change}" for name, change in verdict.sliced[:2])
    more = f" and {len(verdict.sliced) - 2} more" if len(verdict.sliced) > 2 else ""
    return (
        f"KV cache: {len(verdict.sliced)} cache tensor(s) hold only the kept attention heads ({shown}{more}); "
        f"each kept head was compared with the masked model's, in order"
    )


def depends_on_input(outs: list[Outputs]) -> bool:
    """False when every run (the outputs of :func:`reference_outputs`) gave the same outputs: the model
    ignores its input."""
    first = outs[0]
    return any(any(not _same(a, b) for (_, a), (_, b) in zip(first, other)) for other in outs[1:])


def _same(a: torch.Tensor | Plain, b: torch.Tensor | Plain) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _plain_error(a: torch.Tensor | Plain, b: torch.Tensor | Plain) -> float:
    """How far a plain output moved: 0 when equal; the difference of two floats (or an int beside a
    float); inf for anything else that differs (another type, another int or string, a tensor)."""
    if type(a) is type(b) and a == b:
        return 0.0
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and float in (type(a), type(b)):
        return abs(float(a) - float(b))
    return float("inf")


# --- float64 twins ------------------------------------------------------------------------------------
Wide = tuple[nn.Module, list[ExampleInputs], list[Outputs]]  # float64 model, inputs, reference outputs


def widened(
    baked: nn.Module, runs: list[ExampleInputs], *, always: bool = False, dtype: torch.dtype | None = None
) -> Wide | None:
    """Copies of the baked model, the inputs and its outputs on them in a wider float type, if the model holds
    16-bit floats (or ``always``); None otherwise.

    The type: ``dtype`` if given; else float32 for a model with 16-bit floats (float32 rounds 2**16 times
    finer than bfloat16, and its twin of a 16-bit LLM block is half the size of a float64 one:
    :func:`compactor.engine.verify.decide` takes what fails there to float64), float64 otherwise.

    ``baked``: the model the channel plans apply to (masks baked in: ``orig * mask`` is exact in a wider type;
    attention heads already removed). Its own wide outputs are what a plan is judged against: a head whose
    constant was folded in the model's dtype (a rounded bias) is not held against every plan after it; the
    heads stage checked that change against the masked model, and the final check compares with the masked
    model's outputs again.
    """
    tensors = [*baked.parameters(), *baked.buffers()]
    low = any(t.dtype in _LOW_PRECISION for t in tensors)
    if not always and not low:
        return None
    wide_type = dtype or (torch.float32 if low and not always else torch.float64)
    wide_runs = [r.widened(wide_type) for r in runs]
    wide_baked = wide_clone(baked, wide_type)
    return wide_baked, wide_runs, reference_outputs(wide_baked, wide_runs)


def wide_dtype(wide: Wide) -> torch.dtype:
    """The float type of a twin from :func:`widened`."""
    return next(
        (t.dtype for t in [*wide[0].parameters(), *wide[0].buffers()] if t.is_floating_point()), torch.float64
    )


def runtime_tolerance(model: nn.Module, example: ExampleInputs, tolerance: float) -> float:
    """The tolerance for another runtime's float kernels: at least ``NOISE_FACTOR`` times torch's own
    rounding error (float32 against a float64 twin, relative to the output's scale), as verification allows.

    ONNX Runtime sums in another order than torch: on a deep network (ResNet-152) the two differ by ~6e-4
    on the dense model too, while an export that computes something else differs by orders of magnitude more.
    """
    if not any(p.is_floating_point() for p in model.parameters()):
        return tolerance
    wide = widened(model, [example], always=True)
    assert wide is not None
    (narrow_out,), (wide_out,) = reference_outputs(model, [example]), wide[2]
    floors = noise_floors([narrow_out], [wide_out])[0]
    relative = max(
        (
            f / max(1.0, b.abs().max().item())
            for f, (_, b) in zip(floors, wide_out)
            if isinstance(b, torch.Tensor) and b.is_floating_point() and b.numel()
        ),
        default=0.0,
    )
    return max(tolerance, relative)
