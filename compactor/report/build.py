"""The report stage: one :class:`~.report.CompactionReport` from what every stage handed on."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from torch import nn

from ..engine.coupling import Kind
from ..engine.coupling.groups import Coupled
from ..engine.experts import ExpertChange, expert_stacks
from ..engine.heads import HeadChange, kept_head_rows
from ..engine.masks import Observed
from ..engine.plan.autowidth import AutoWidths, slower_warning
from ..engine.plan.base import Fate, GroupPlan
from ..engine.rebuild import split_sizes
from ..engine.verify import Decided
from ..inputs import ExampleInputs
from ..io.sparse import sparsity_report
from ..outputs import sliced_note
from .filters import PrunedFilter, pruned_filters
from .report import (
    CompactionReport,
    ZeroedChannel,
    count_params,
    dead_model_warnings,
    layer_changes,
    serialized_bytes,
    zeroed_channels,
)
from .sparsity import unstructured_warnings


def build_report(
    dense: nn.Module,
    planned: nn.Module,
    inputs: ExampleInputs,
    observed: Observed,
    heads: list[HeadChange],
    coupled: Coupled,
    decided: Decided,
    *,
    tolerance: float,
    round_to: int | str,
    seconds: dict[str, float],
    auto: AutoWidths | None = None,
    macs: dict[str, int] | None = None,
    experts: list[ExpertChange] | None = None,
) -> CompactionReport:
    """``dense``: the masked model baked (before any head went); ``planned``: the model the plans were made on
    (in float64 where decisions were); ``decided.small``: what ships."""
    small, plans, paths = decided.small, decided.plans, observed.paths
    sparsity = [layer for layer in sparsity_report(small) if layer.zeros]
    uncalled = frozenset(name for name, _ in paths.uncalled)
    floors = decided.floors
    extra: dict[str, Any] = {
        "graph_issues": sorted({i for g in coupled.groups for i in g.issues}),
        **({"heads": [h.to_dict() for h in heads]} if heads else {}),
        **({"experts": [e.to_dict() for e in experts]} if experts else {}),
        **({"split_sizes": splits} if (splits := _split_sizes(planned, plans)) else {}),
        **({"rounding_floor": max(max(f, default=0.0) for f in floors)} if floors else {}),
        **({"judged_in": decided.judged_in} if floors and decided.judged_in else {}),
        **({"float64_error": decided.proof.max_abs_error} if decided.proof is not None else {}),
        "sparsity": [layer.to_dict() for layer in sparsity],
        **({"reparametrizations": observed.folded} if observed.folded else {}),
        "round_to": round_to,
        "sizes": observed.sizes,
        **({"explored": observed.explored} if observed.explored else {}),
        **({"cache": note} if (note := sliced_note(decided.verdict)) else {}),
        "paths": paths.to_dict(),
        **({"path_notes": paths.notes()} if paths.notes() else {}),
        **({"auto": auto.to_dict(), "macs": macs} if auto is not None else {}),
    }
    rows = kept_head_rows(dense, heads) if heads else {}
    return CompactionReport(
        params={"before": count_params(dense), "after": count_params(small)},
        file_bytes={"before": serialized_bytes(dense), "after": serialized_bytes(small)},
        max_abs_error=decided.verdict.max_abs_error,
        tolerance=tolerance,
        verified_runs=len(observed.runs),
        inputs=inputs.describe(),
        layers=layer_changes(dense, small),
        zeroed=tuple(_head_reason(z, rows) for z in zeroed_channels(plans)),
        filters=tuple(
            _head_reason(f, rows)
            for f in pruned_filters(
                planned, plans, uncalled=uncalled, traced=not coupled.untraced, train_only=paths.train_only
            )
        ),
        warnings=(
            *_guess_warning(inputs),
            *_quantized_warning(dense),
            *_unchecked_warning(observed.unchecked),
            *_stale_warning(observed.stale),
            *coupled.untraced,
            *paths.warnings(),
            *_passenger_warning(plans),
            *([observed.fresh_note] if observed.fresh_note else []),
            *dead_model_warnings(observed.references[: observed.same], plans),  # at one size: shapes differ
            *unstructured_warnings(small, stacks=frozenset(expert_stacks(small))),
            *(slower_warning(auto) if auto is not None else ()),
        ),
        seconds=seconds,
        extra=extra,
    )


Row = TypeVar("Row", ZeroedChannel, PrunedFilter)
_REMOVED = frozenset(f.value for f in Fate if f.removed)


def _head_reason(row: Row, kept: dict[tuple[str, int], str]) -> Row:
    """A kept row of a kept attention head: the head's reason (said once for the head) over the row's."""
    index = row.channel if isinstance(row, ZeroedChannel) else row.row
    why = kept.get((row.layer, index))
    return row if why is None or row.fate in _REMOVED else replace(row, reason=why)


def _unchecked_warning(unchecked: list[str]) -> list[str]:
    if not unchecked:
        return []
    return [
        f"the model returns objects that are neither tensors nor plain values ({_first_three(unchecked)}): "
        f"they were not compared; return tensors, numbers or dataclasses of them to have them verified"
    ]


def _split_sizes(planned: nn.Module, plans: list[GroupPlan]) -> dict[str, list[Any]]:
    """The split sizes the rebuild rewrote: ``module.attribute`` -> [before, after]."""
    return {
        f"{module}.{attr}" if module else attr: [_listed(before), _listed(after)]
        for (module, attr), (before, after) in split_sizes(planned, [p for p in plans if p.removed]).items()
    }


def _listed(sizes: int | tuple[int, ...] | list[int]) -> int | list[int]:
    return sizes if isinstance(sizes, int) else list(sizes)


def _passenger_warning(plans: list[GroupPlan]) -> list[str]:
    riders = sorted({m.name for p in plans if p.removed for m in p.group.members if m.kind is Kind.PASSENGER})
    if not riders:
        return []
    return [
        f"{_first_three(riders)} run only in train mode: they lost the input channels that went, with nothing "
        f"folded into them, so their train-mode outputs (auxiliary losses) change where those channels were "
        f"constants; eval mode, which verification covers, never runs them"
    ]


def _stale_warning(stale: list[str]) -> list[str]:
    if not stale:
        return []
    return [
        f"{_first_three(stale)}: the forward reads {'it' if len(stale) == 1 else 'them'} without calling the "
        f"layer, so torch's pruning hook never recomputes {'it' if len(stale) == 1 else 'them'}, and the model "
        f"as you hold it runs the value from when the mask was applied, not *_orig x mask; compacted and verified "
        f"against *_orig x mask (what prune.remove gives): call prune.remove before saving to run that yourself"
    ]


def _guess_warning(inputs: ExampleInputs) -> list[str]:
    if inputs.guess is None:
        return []
    return [
        f"no example inputs were given: compacted and verified on a guessed input of shape {inputs.guess}; pass "
        f"--input-shape (Python: example_inputs) with the real size, which exports also take"
    ]


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
    return [
        f"{len(found)} quantized layer(s) left whole ({_first_three(found)}): compactor rebuilds float "
        f"layers only, so the channels they write or read stay; compact the float model, then quantize"
    ]


def _first_three(names: list[str]) -> str:
    """``"a, b, c and 4 more"``: a warning names a few, and counts the rest."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more}"
