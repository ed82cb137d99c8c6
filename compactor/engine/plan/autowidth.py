"""``round_to="auto"``: each group's width chosen by timing its layers on the backend the model deploys to.

A width belongs to a *group* of coupled channels (a residual add couples several convs), so candidates are
per group: the exact width the plan leaves, and that width rounded up to a multiple of 8, 16, 32 and 64 where
that does not exceed the dense width. Each candidate is what the planner really gives when asked to keep that
many channels (a grouped conv's balance can make it more); the extra channels kept are removable ones, those
needing no compensation first (``kept: --round-to auto``), so exactness is unaffected and verification
still judges the result.

The search is greedy, group by group in the graph's order: a candidate's cost is the time of every timed
layer the group touches (the convs that write its channels at that output width, those that read them at
that input width, each at the widths the groups already decided give its other side), each layer run in
isolation on its real input shape, all candidates of a group interleaved (:mod:`.probes`). The fastest
wins; a wider one must beat a narrower one by more than ``TIE`` (3%), so that noise never buys parameters.
Later groups see earlier choices, never the other way round. A group held at a chosen width keeps its own
carrier (it is never another group's guest), so an exact group that shared one may come out one channel off
what was timed. Groups left when ``budget_s`` is spent, and
groups with a layer the backend cannot run alone, keep their exact width, and are named.

Layers timed alone miss what happens between them (the elementwise ops, the caches a whole forward shares,
layout changes between blocked kernels), so the choice is checked whole: the greedy widths, the exact ones
and every group rounded up to 8 and to 16 are rebuilt and timed as whole models, interleaved with the dense
model (:meth:`WidthSearch.whole`). Those within ``RUNOFF`` (3%) of the fastest are timed again, as many
rounds more, so that what decides has twice the rounds. The fastest is the one with the highest speedup,
paired by round with the dense model (the median over rounds of dense / candidate). The candidate with the
fewest parameters that the rounds do not show slower than it is kept: slower means a paired gap (the median
over rounds of their ratio, :func:`~.measure.paired_gap`) past the run's noise (two standard errors of it), or
past ``WHOLE_TIE_MAX`` (1%) whatever the noise; a gap under ``WHOLE_TIE_MIN`` (0.3%) is never a reason
to keep more parameters.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from statistics import median
from typing import Any

from torch import nn

from ...errors import first_line
from ...inputs import ExampleInputs
from ...layers import Side, width
from ...measure.probes import Probe, Seen, Timer, probe, rebuilt, record_inputs, rounds_of, timed_kind
from ...measure.timing import Gap, paired_gap
from ..rebuild import apply_plans
from .base import Fate, GroupPlan, WidthTarget, same_plans
from .fates import Planner

STEPS = (8, 16, 32, 64)
TIE = 0.03  # a wider candidate is chosen only when more than 3% faster than every narrower one
BUDGET_S = 60.0  # timing time after which the remaining groups keep their exact width
WHOLE_STEPS = (8, 16)  # uniform roundings timed against the greedy choice, whole model against whole model
DENSE = "dense"  # the name the dense model is timed under beside the candidates
RUNOFF = 0.03  # whole models within 3% of the fastest are timed again before one is picked
WHOLE_TIE_MIN = 0.003  # a paired gap under 0.3% never buys parameters
WHOLE_TIE_MAX = 0.01  # a paired gap over 1% always does, however noisy the run


@dataclass(frozen=True)
class GroupChoice:
    """One group's candidates, their cost (summed ms of the group's layers) and the width chosen."""

    root: str
    dense: int
    exact: int
    width: int
    ms: dict[int, float]
    layers: tuple[str, ...]


@dataclass(frozen=True)
class LayerTime:
    """One layer in isolation at the dense model's widths and at the compacted model's (ms per forward)."""

    layer: str
    before_ms: float
    after_ms: float
    widths: str  # "in→out" dense, then compacted


@dataclass(frozen=True)
class WholeChoice:
    """The whole-model check: each candidate's median ms (over every round it ran) and parameter count, the
    one kept, and each run-off finalist's paired gap to the fastest one."""

    ms: dict[str, float]
    params: dict[str, int]
    picked: str
    dense_ms: float | None = None  # the dense model, timed in the same rounds
    fastest: str | None = None
    gaps: dict[str, Gap] = field(default_factory=dict)  # the run-off's finalists against ``fastest``


@dataclass(frozen=True)
class AutoWidths:
    """What ``round_to="auto"`` decided and measured; ``report.extra["auto"]`` is :meth:`to_dict`."""

    target: str
    choices: tuple[GroupChoice, ...]
    seconds: float
    untimed: tuple[str, ...]  # what was not timed, and why (those groups keep their exact width)
    extra_params: int = 0  # parameters the padding keeps (chosen widths against exact ones)
    layers: tuple[LayerTime, ...] = ()
    model_ms: dict[str, float] | None = None  # whole model, dense and compacted, on the target
    whole: WholeChoice | None = None  # the greedy widths against uniform roundings, timed whole
    padded: int = 0  # groups kept wider than their exact width in the end

    @property
    def slower(self) -> bool:
        return self.model_ms is not None and self.model_ms["after"] > self.model_ms["before"]

    def responsible(self) -> list[LayerTime]:
        """Layers that run slower compacted than dense, the worst first."""
        worse = [t for t in self.layers if t.after_ms > t.before_ms]
        return sorted(worse, key=lambda t: t.before_ms - t.after_ms)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slower"] = self.slower
        return d


class WidthSearch:
    """Times candidate widths of ``planner``'s groups with ``timer`` on ``model`` (the model in its own
    precision: ``planner`` may plan on a float64 twin) run on ``inputs``."""

    def __init__(self, planner: Planner, model: nn.Module, inputs: ExampleInputs, timer: Timer) -> None:
        self.planner = planner
        self.timer = timer
        self.modules = dict(model.named_modules())
        names = {m.name for g in planner.groups for m in g.layers() if timed_kind(self.modules.get(m.name))}
        self.seen: dict[str, Seen] = record_inputs(model, inputs, names)

    # --- choosing -------------------------------------------------------------------------------------
    def choose(
        self, plans: list[GroupPlan], *, budget_s: float = BUDGET_S
    ) -> tuple[dict[int, WidthTarget], list[GroupChoice], list[str]]:
        """Per group index, the width to keep where it is wider than the exact one; every group's choice;
        the groups the budget left untimed."""
        start = time.perf_counter()
        current = list(plans)
        targets: dict[int, WidthTarget] = {}
        choices: list[GroupChoice] = []
        untimed: list[str] = []
        for i, plan in enumerate(plans):
            if not plan.removed:
                continue
            options = self._options(i, plan)
            layers = self._layers(plan)
            if len(options) < 2 or not layers:
                continue
            if time.perf_counter() - start > budget_s:
                untimed.append(f"{plan.group.root} (the time budget of {budget_s:g} s was spent)")
                continue
            try:
                ms = self._cost(current, i, options, layers)
            except Exception as e:  # a layer the backend cannot run alone: this group keeps its exact width
                untimed.append(f"{plan.group.root} ({first_line(e, with_type=True)})")
                continue
            chosen = _fastest(ms)
            current[i] = options[chosen]
            exact = plan.group.size - len(plan.removed)
            choices.append(GroupChoice(plan.group.root, plan.group.size, exact, chosen, ms, tuple(layers)))
            if chosen > exact:
                targets[i] = _target(plan.group.root, chosen, self.timer.target)
        return targets, choices, untimed

    def _options(self, i: int, plan: GroupPlan) -> dict[int, GroupPlan]:
        """Realised width -> plan, for the exact width and each rounding the planner can give."""
        size, exact = plan.group.size, plan.group.size - len(plan.removed)
        options = {exact: plan}
        for step in STEPS:
            want = math.ceil(exact / step) * step
            if want <= size and want not in options:
                candidate = self.planner.plan(i, target=_target(plan.group.root, want, self.timer.target))
                options.setdefault(plan.group.size - len(candidate.removed), candidate)
        return options

    def _layers(self, plan: GroupPlan) -> list[str]:
        names = {m.name for m in plan.group.layers()}
        return sorted(n for n in names if n in self.seen and timed_kind(self.modules.get(n)))

    def _cost(
        self, current: list[GroupPlan], i: int, options: dict[int, GroupPlan], layers: list[str]
    ) -> dict[int, float]:
        probes: list[tuple[int, Probe]] = []
        for w, option in sorted(options.items()):
            trial = [*current[:i], option, *current[i + 1 :]]
            widths = _widths(trial, self.modules)
            probes += [(w, self._probe(name, widths)) for name in layers]
        seconds = self.timer.layers([p for _, p in probes])
        ms: dict[int, float] = defaultdict(float)
        for (w, p), s in zip(probes, seconds):
            ms[w] += s * p.calls * 1000
        return dict(ms)

    def _probe(self, name: str, widths: dict[tuple[str, Side], int]) -> Probe:
        return probe(
            name,
            self.modules[name],
            self.seen[name],
            widths.get((name, Side.IN)),
            widths.get((name, Side.OUT)),
        )

    def rounded(self, plans: list[GroupPlan], step: int) -> dict[int, WidthTarget]:
        """Per group index, its exact width rounded up to a multiple of ``step`` (where the dense width
        allows): a uniform rounding, as a candidate for :meth:`whole`."""
        out = {}
        for i, plan in enumerate(plans):
            size, exact = plan.group.size, plan.group.size - len(plan.removed)
            want = math.ceil(exact / step) * step
            if plan.removed and exact < want <= size:
                out[i] = WidthTarget(
                    want,
                    Fate.KEPT_AUTO,
                    f"kept so that {plan.group.root} keeps {want} channels: with every group rounded up to a "
                    f"multiple of {step}, the whole model ran fastest on {self.timer.target}",
                )
        return out

    def whole(
        self,
        model: nn.Module,
        inputs: ExampleInputs,
        candidates: dict[str, list[GroupPlan]],
        dense: nn.Module | None = None,
    ) -> WholeChoice:
        """Each candidate's plans applied to ``model`` (the model in its own precision) and timed as a whole
        model, interleaved with the dense model (``dense``; default ``model``: they differ where attention
        heads went first); those within ``RUNOFF`` of the fastest timed again; the one kept is the one with
        the fewest parameters that the rounds do not show slower than the fastest (:func:`_keeps_up`)."""
        unique: dict[tuple[int, ...], str] = {}
        for name, plans in candidates.items():
            unique.setdefault(tuple(len(p.removed) for p in plans), name)
        names = list(unique.values())
        if len(names) < 2:
            return WholeChoice({}, {}, names[0] if names else next(iter(candidates)))
        models = {n: apply_plans(model, [p for p in candidates[n] if p.removed]).eval() for n in names}
        params = {n: _params(m) for n, m in models.items()}
        reference = model if dense is None else dense
        rounds = rounds_of(self.timer.models({DENSE: reference, **models}, inputs))
        best = min(statistics.median(rounds[n]) for n in names)
        finalists = [n for n in names if statistics.median(rounds[n]) <= best * (1 + RUNOFF)]
        if len(finalists) > 1:  # the run-off: as many rounds again, paired with the first run's
            again = rounds_of(
                self.timer.models({DENSE: reference, **{n: models[n] for n in finalists}}, inputs)
            )
            rounds = {n: [*t, *again.get(n, [])] for n, t in rounds.items()}
        ms = {n: statistics.median(rounds[n]) * 1000 for n in [DENSE, *names]}
        to_dense = {n: paired_gap(rounds[n], rounds[DENSE]).slower for n in finalists}  # 1 / speedup - 1
        fastest = min(finalists, key=lambda n: to_dense[n])
        gaps = {n: paired_gap(rounds[n], rounds[fastest]) for n in finalists if n != fastest}
        picked = min(
            (n for n in finalists if n == fastest or _keeps_up(gaps[n])), key=lambda n: (params[n], ms[n])
        )
        return WholeChoice({n: ms[n] for n in names}, params, picked, ms[DENSE], fastest, gaps)

    # --- what it bought -------------------------------------------------------------------------------
    def layer_times(self, plans: list[GroupPlan]) -> list[LayerTime]:
        """Every timed layer the plans shrink, at dense widths and at the plans' widths."""
        widths = _widths(plans, self.modules)
        names = sorted(
            {name for name, _ in widths if name in self.seen and timed_kind(self.modules.get(name))}
        )
        before = [self._probe(n, {}) for n in names]
        after = [self._probe(n, widths) for n in names]
        seconds = self.timer.layers(before + after)
        out = []
        for b, a, sb, sa in zip(before, after, seconds[: len(names)], seconds[len(names) :]):
            out.append(
                LayerTime(
                    b.layer,
                    sb * b.calls * 1000,
                    sa * a.calls * 1000,
                    f"{b.in_width}→{b.out_width} / {a.in_width}→{a.out_width}",
                )
            )
        return out

    def extra_params(self, exact: list[GroupPlan], chosen: list[GroupPlan]) -> int:
        """Parameters of the layers at ``chosen`` widths minus at ``exact`` ones (layers with a shrinker)."""
        a, b = _widths(exact, self.modules), _widths(chosen, self.modules)
        names = {n for n, _ in (a.keys() | b.keys()) if isinstance(self.modules.get(n), nn.Module)}
        total = 0
        for n in names:
            m = self.modules[n]
            total += _params(rebuilt(m, b.get((n, Side.IN)), b.get((n, Side.OUT))))
            total -= _params(rebuilt(m, a.get((n, Side.IN)), a.get((n, Side.OUT))))
        return total


def _keeps_up(gap: Gap) -> bool:
    """Whether a candidate with ``gap`` to the fastest counts as fast as it: the gap is within the run's
    noise, or under ``WHOLE_TIE_MIN``, and never over ``WHOLE_TIE_MAX``."""
    return gap.slower <= min(WHOLE_TIE_MAX, max(WHOLE_TIE_MIN, gap.noise))


def _fastest(ms: dict[int, float]) -> int:
    """The narrowest width within ``TIE`` of the fastest."""
    best = min(ms.values())
    return min(w for w, t in ms.items() if t <= best * (1 + TIE))


def _target(root: str, w: int, target: str) -> WidthTarget:
    return WidthTarget(
        w, Fate.KEPT_AUTO, f"kept so that {root} keeps {w} channels, which ran faster on {target}"
    )


def _widths(plans: list[GroupPlan], modules: dict[str, Any]) -> dict[tuple[str, Side], int]:
    """(layer, side) -> width after ``plans``, for every layer side a plan removes channels from."""
    removed: dict[tuple[str, Side], set[int]] = defaultdict(set)
    for plan in plans:
        gone = plan.removed
        if not gone:
            continue
        for member in plan.group.layers():
            removed[(member.name, member.side)].update(j for r in gone for j in member.idxs[r])
    out = {}
    for (name, side), idx in removed.items():
        dense = width(modules.get(name), side)
        if dense is not None and idx:
            out[(name, side)] = dense - len(idx)
    return out


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- the stage: choose before verification, check after ------------------------------------------------------
@dataclass
class Chosen:
    """What the timing chose, before verification: the plans at the exact widths and as chosen."""

    search: WidthSearch
    exact: list[GroupPlan]
    chosen: list[GroupPlan]
    choices: list[GroupChoice]
    untimed: list[str]
    whole: WholeChoice | None
    seconds: float


def choose_widths(
    planner: Planner,
    model: nn.Module,
    dense: nn.Module,
    inputs: ExampleInputs,
    plans: list[GroupPlan],
    timer: Timer,
    uniform: bool,
) -> Chosen:
    """``round_to="auto"``: the plans again with each group held at the width timed fastest, then that
    choice against the exact widths and uniform roundings, each timed as a whole model (``model``: the model
    the plans apply to, in its own precision; ``dense``: the masked model baked, before any head went)."""
    start = time.perf_counter()
    search = WidthSearch(planner, model, inputs, timer)
    widths, choices, untimed = search.choose(plans)
    greedy = planner.plans(uniform=uniform, widths=widths) if widths else plans
    candidates = {"per group": greedy, "exact": plans}
    for step in WHOLE_STEPS:
        candidates[f"all x{step}"] = planner.plans(uniform=uniform, widths=search.rounded(plans, step))
    try:
        whole: WholeChoice | None = search.whole(model, inputs, candidates, dense)
    except AssertionError:  # compactor's own check (a rebuild wrote into the model it copies): a bug, said so
        raise
    except Exception as e:  # exporters' and runtimes' failures have no common type: the greedy choice stands
        untimed.append(f"the whole-model check ({first_line(e, with_type=True)})")
        whole = None
    chosen = candidates[whole.picked] if whole is not None else greedy
    return Chosen(search, plans, chosen, choices, untimed, whole, round(time.perf_counter() - start, 4))


def checked_widths(
    chosen: Chosen, dense: nn.Module, small: nn.Module, inputs: ExampleInputs, final: list[GroupPlan]
) -> AutoWidths:
    """After verification (``final``: the plans that ship): the whole model timed dense and compacted on the
    target (a failure to run there is said, not raised: the widths stand), the layers timed alone, and the
    parameters the chosen widths keep beyond the exact ones."""
    search, untimed = chosen.search, chosen.untimed
    exact = [  # the exact plans, less the groups verification restored (so the padding alone is counted)
        f if c.removed and not f.removed else e for e, c, f in zip(chosen.exact, chosen.chosen, final)
    ]
    timed = chosen.whole if chosen.whole is not None and same_plans(chosen.chosen, final) else None
    model_ms: dict[str, float] | None = None
    if timed is not None and timed.dense_ms is not None and timed.picked in timed.ms:
        model_ms = {"before": timed.dense_ms, "after": timed.ms[timed.picked]}
    else:
        try:
            t = rounds_of(search.timer.models({"dense": dense, "small": small}, inputs))
            model_ms = {"before": median(t["dense"]) * 1000, "after": median(t["small"]) * 1000}
        except Exception as e:  # the exporters' and runtimes' failures have no common type
            untimed.append(f"the whole model ({first_line(e, with_type=True)})")
    try:
        layers = tuple(search.layer_times(final))
    except Exception as e:  # as above: a layer the backend cannot run alone
        untimed.append(f"the layers alone ({first_line(e, with_type=True)})")
        layers = ()
    result = AutoWidths(search.timer.target, tuple(chosen.choices), chosen.seconds, (), model_ms=model_ms)
    return replace(
        result,
        extra_params=search.extra_params(exact, final),
        layers=layers,
        untimed=tuple(untimed),
        whole=chosen.whole,
        padded=sum(len(f.removed) < len(e.removed) for e, f in zip(exact, final)),
    )


def slower_warning(result: AutoWidths) -> list[str]:
    """The report's warning where the compacted model ran slower than the dense one, naming the layers."""
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
