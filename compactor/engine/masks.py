"""Stage 2, masks: the user's masked model as the reference, and its masks baked into plain weights.

:func:`observe` is the stage: the masked model's outputs on the example inputs and fresh ones (the
references every later stage is held to), what those runs did not cover, and the model with its masks baked
in. :func:`masked_view` clones the model as the user holds it (sharing its tensors, not copying them);
:func:`compactor.modules.baked` bakes its masks and re-parametrisations into plain weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import prune

from ..errors import CompactorError, ModelForwardError, ModelStructureError, first_line
from ..inputs import ExampleInputs, flatten_values, padded, run, unchecked_outputs
from ..modules import baked, clone_module_with, reparametrized, write_guard
from ..outputs import Outputs, reference_outputs
from .coverage import Coverage, Paths, find_paths, watch

FRESH_RUNS = 2  # random inputs checked besides the example inputs
EXPLORED_RUNS = 3  # at most: inputs kept because they take a side of a value branch no run took before


Change = Callable[[torch.Tensor], torch.Tensor]


def _explorations(inputs: ExampleInputs) -> list[tuple[str, Change]]:
    """The changes to the example's float inputs that may flip a condition on their values (``x.sum() > 0``,
    ``x.abs().max() > 10``, ``x.mean() < -1``): negate, scale up and down, shift by 3 and 30 times their
    largest value either way. Their largest value is read here, outside the watch; the changed inputs are
    made only where a branch needs them (:func:`_explore`)."""
    floats = [t for t in (*inputs.args, *inputs.kwargs.values()) if t.is_floating_point()]
    if not floats:
        return []
    big = max(float(t.abs().max()) for t in floats) or 1.0
    return [
        ("negated", lambda t: -t),
        ("scaled by 10", lambda t: t * 10),
        ("scaled by 0.1", lambda t: t * 0.1),
        *((f"shifted by {d:+.3g}", _shifted(d)) for d in (3 * big, -3 * big, 30 * big, -30 * big)),
    ]


def _shifted(d: float) -> Change:
    return lambda t: t + d


@dataclass(frozen=True)
class Observed:
    """What the masks stage hands on: the baked model, the runs and the masked model's outputs on them."""

    baked: nn.Module  # the masks baked in; shares the user's plain parameters (never written)
    runs: list[ExampleInputs]  # the example inputs, fresh ones like them, then one at another size (if any)
    references: list[Outputs]  # the masked model's outputs on each run
    same: int  # how many runs have the example's shapes (the run at another size comes last)
    sizes: str  # which sizes were checked, in words (``report.extra["sizes"]``)
    paths: Paths  # what the runs did not cover: value branches, uncalled layers, train-mode paths
    unchecked: list[str]  # outputs that are neither tensors nor plain values (not compared)
    fresh_note: str | None  # why the fresh runs are not the default ones, where they are not
    folded: list[str]  # the re-parametrisations baked (weight_norm, spectral_norm, parametrizations)
    stale: list[str] = field(default_factory=list)  # pruned tensors the forward read without their hook
    explored: str | None = None  # the inputs verified because they take another side of a value branch


def observe(model: nn.Module, inputs: ExampleInputs) -> Observed:
    """The masks stage: run the masked model (as the user holds it) on ``inputs`` and on fresh inputs drawn
    like them, check its outputs are finite and its forward leaves its tensors alone, and bake its masks."""
    masked, shared, refreshed = masked_view(model)  # the user's model: its own pruning hooks and tensors
    masked.eval()
    generator = torch.Generator().manual_seed(0)
    candidates = [  # made outside the watch: making them reads tensor values
        [inputs, *padded([inputs.fresh(generator, integers=integers) for _ in range(FRESH_RUNS)])]
        for integers in (True, False)
    ]
    explorations = _explorations(inputs)
    with write_guard((t for t, _ in shared), "the model's eval-mode forward"):
        with watch(masked) as seen:
            with torch.no_grad():
                first = run(masked, inputs)  # fails with one clear line if the inputs do not fit
            unchecked = unchecked_outputs(first)
            runs, references, fresh_note = _references(masked, candidates, flatten_values(first), seen)
            del first
            explored, explored_references, explored_note = _explore(masked, inputs, explorations, seen)
        runs, references = [*runs, *explored], [*references, *explored_references]
        check_finite(references)
        same = len(runs)
        other, other_references, sizes = _other_size(masked, inputs, generator)
    stale = never_recomputed(refreshed)
    del masked, refreshed  # the references are all that is needed of it: free what its hooks computed
    written = check_unwritten(shared)
    if written is not None:
        raise ModelStructureError(
            f"{written}: its outputs change from one call to the next, so no compaction can be verified "
            f"against them; make the forward leave its weights alone (data-dependent initialisation done once, "
            f"before pruning)"
        )
    folded = reparametrized(model)
    plain = baked(model, share=True).eval()  # shares the user's plain parameters: never written
    paths = find_paths(plain, seen, inputs)
    return Observed(
        plain,
        [*runs, *other],
        [*references, *other_references],
        same,
        sizes,
        paths,
        unchecked,
        fresh_note,
        folded,
        stale,
        explored_note,
    )


Refreshed = list[tuple[str, nn.Module, str, torch.Tensor]]  # (name, the clone's layer, tensor name, tensor)


def masked_view(model: nn.Module) -> tuple[nn.Module, list[tuple[torch.Tensor, int]], Refreshed]:
    """A clone of ``model`` as the user holds it, for forwards in eval mode: it shares every parameter and
    each pruned tensor's ``*_orig`` and mask with ``model`` and copies the buffers, so it costs the tensors
    the hooks compute, not a second model. Also returns the shared tensors with their ``_version``, for
    :func:`check_unwritten` after the forwards; run them under :func:`compactor.modules.write_guard` of those
    tensors, so that a forward that writes one is stopped before it does.

    Each pruned tensor of the clone is set to ``orig * mask`` before any forward, as its pruning hook sets it
    when its layer is called. A forward that reads a layer's weight without calling the layer
    (``nn.MultiheadAttention`` reads ``out_proj.weight``) never runs that hook, so the user's layer holds the
    value from when the mask was applied, stale once fine-tuning moved ``*_orig``; the clone runs what the
    masks define, which is what ``prune.remove`` gives and what compaction bakes. The third value names
    those tensors where they were stale, for :func:`never_recomputed` after the forwards."""
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    hooked: list[tuple[str, nn.Module, prune.BasePruningMethod]] = []
    for name, module in model.named_modules():
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, prune.BasePruningMethod):
                continue
            hooked.append((name, module, hook))
            for key in (hook._tensor_name + "_orig", hook._tensor_name + "_mask"):
                tensor = module._parameters.get(key, module._buffers.get(key))
                if tensor is not None:
                    memo[id(tensor)] = tensor
            for value in vars(hook).values():  # custom_from_mask's hook holds the mask it was given
                if isinstance(value, torch.Tensor):
                    memo[id(value)] = value
            computed = module.__dict__.get(hook._tensor_name)
            if isinstance(computed, torch.Tensor):  # shared, not copied: _refresh replaces it in the clone
                memo[id(computed)] = computed
    shared = [(t, t._version) for t in memo.values() if isinstance(t, torch.Tensor)]
    clone = clone_module_with(model, memo)
    return clone, shared, _refresh(clone, hooked)


def _refresh(clone: nn.Module, hooked: list[tuple[str, nn.Module, prune.BasePruningMethod]]) -> Refreshed:
    """Set each pruned tensor of ``clone`` to ``orig * mask`` (see :func:`masked_view`); return those whose
    value in the user's model differed, with the tensor set."""
    stale: Refreshed = []
    for name, module, hook in hooked:
        tensor_name = hook._tensor_name
        layer = clone.get_submodule(name)
        with torch.no_grad():
            fresh = (getattr(module, tensor_name + "_orig") * getattr(module, tensor_name + "_mask")).detach()
        held = module.__dict__.get(tensor_name)
        setattr(layer, tensor_name, fresh)
        if not (isinstance(held, torch.Tensor) and held.shape == fresh.shape and torch.equal(held, fresh)):
            stale.append((name, layer, tensor_name, fresh))
    return stale


def never_recomputed(refreshed: Refreshed) -> list[str]:
    """The pruned tensors, among the stale ones :func:`masked_view` refreshed, that no forward recomputed:
    the forwards read them (or not) without calling their layer, so the user's model runs the stale value."""
    return [
        f"{name}.{tensor_name}" if name else tensor_name
        for name, layer, tensor_name, fresh in refreshed
        if layer.__dict__.get(tensor_name) is fresh
    ]


def check_unwritten(shared: list[tuple[torch.Tensor, int]]) -> str | None:
    """Why :func:`masked_view`'s shared tensors are no longer what they were (a forward wrote into them), or
    None."""
    written = sum(t._version != v for t, v in shared)
    return f"the model's forward wrote into {written} of its tensors in eval mode" if written else None


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
        except (
            CompactorError
        ):  # compactor's own refusal (a write into a shared tensor): not the inputs' fault
            raise
        except Exception as e:  # the model's own check on its inputs, not a compaction problem
            why = first_line(e, with_type=True)
            seen.restore(before)
            continue
        note = f"fresh inputs keep the example's integer inputs: random ones fail ({why})" if i else None
        return runs, references, note
    note = f"verified on the example inputs only: the model fails on random inputs like them ({why})"
    return candidates[0][:1], [example], note


def _explore(
    masked: nn.Module, inputs: ExampleInputs, explorations: list[tuple[str, Change]], seen: Coverage
) -> tuple[list[ExampleInputs], list[Outputs], str | None]:
    """Where a value branch took one side only (:meth:`Coverage.one_sided`), the changed example inputs
    (:func:`_explorations`) that take its other side, with the masked model's outputs on them: they join
    the verified runs, so both sides of that branch are verified. One that takes no new side, fails or gives
    NaN is dropped, its outcomes forgotten; a branch no change reaches stays warned of."""
    runs: list[ExampleInputs] = []
    references: list[Outputs] = []
    names: list[str] = []
    for name, change in explorations:
        open_sides = seen.one_sided()
        if not open_sides or len(runs) >= EXPLORED_RUNS:
            break
        candidate = inputs.transformed(change)
        before = seen.snapshot()
        try:
            outputs = reference_outputs(masked, [candidate])
            check_finite(outputs)
        except ModelForwardError:  # NaN or Inf there: not comparable
            seen.restore(before)
            continue
        except CompactorError:  # compactor's own refusal (a write into a shared tensor)
            raise
        except Exception:  # the model refuses such inputs: not a compaction problem
            seen.restore(before)
            continue
        if open_sides - seen.one_sided():  # a branch took its other side
            runs.append(candidate)
            references += outputs
            names.append(name)
        else:
            seen.restore(before)
    note = (
        f"also verified on the example inputs {', '.join(names)}: they take the other side of a value branch"
    )
    return runs, references, note if names else None


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
    except CompactorError:
        raise
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
