"""Prune masks that compaction removes whole: :func:`prune_channels`, coupling-aware.

``torch.nn.utils.prune.ln_structured`` masks rows layer by layer, and most of them cannot then be removed: a
channel of a residual stream goes only if every writer of it is zero, a zeroed conv row followed by BatchNorm
is a constant, not a zero, and a constant times a live gate varies with the input. compactor already knows
which channels must go together (the coupling stage's groups, the same analysis ``compact`` runs), so it
makes the masks:

1. the groups of coupled channels are found on the example inputs;
2. each channel of a group is scored by the norm of every row its writers hold for it (``"l1"``, ``"l2"``, or a
   function of a :class:`GroupView`: a Taylor score, say);
3. the lowest ``amount`` of each group (or, with ``global_=True``, of all groups, scores divided by their
   group's mean) are chosen, keeping at least one channel and, with ``round_to``, a multiple of it;
4. on a copy, the chosen channels are zeroed in every member that holds them: the writers' output rows and
   biases, and every channelwise layer of the group (BatchNorm's scale and shift, a depthwise conv's rows,
   a LayerScale), so the channel is exactly zero wherever it flows, never a constant;
5. the plan stage plans that copy as ``compact`` would: a chosen channel it would not remove (a LayerNorm reads
   it, a model output holds it, a grouped conv needs its groups even) is left unmasked, with the planner's
   reason;
6. the rest are masked in the user's model with ``torch.nn.utils.prune.custom_from_mask`` (on top of any
   mask already there), so they stay masks through fine-tuning (``weight_orig * weight_mask``;
   :func:`compactor.keep_pruned` also holds the optimizer state at zero) and ``compactor.compact`` of the
   fine-tuned model removes them.

The readers of a group (the next layer's input columns) are not masked: removing the channel removes them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils import prune

from ..api import resolve_example_inputs
from ..engine.coupling.groups import ChannelGroup
from ..engine.coupling.stage import couple
from ..engine.coverage import Paths, train_inputs
from ..engine.options import Options
from ..engine.plan.stage import make_plans
from ..inputs import ExampleInputs, run
from ..layers import Role, Side, role_of, shrinker_for, width
from ..modules import baked, clone_module
from ..util import eval_mode_restored


@dataclass(frozen=True)
class GroupView:
    """What a score function sees of one group: per writing layer, its rows for each root channel
    (``rows[name][c]``: every weight the layer holds for channel ``c``, flattened)."""

    root: str
    size: int
    rows: dict[str, list[torch.Tensor]]


Importance = Literal["l1", "l2"] | Callable[[GroupView], torch.Tensor]


@dataclass(frozen=True)
class MaskedGroup:
    """One group's masked channels and what removing them saves."""

    root: str
    size: int
    masked: tuple[int, ...]  # root channels masked
    layers: tuple[str, ...]  # the layers whose rows (or channelwise entries) were masked
    params: int  # parameters ``compact`` removes with them alone (writers, readers, channelwise layers)
    macs: int  # multiply-accumulates per forward on the example inputs that go with them alone
    kept: tuple[tuple[int, str], ...] = ()  # chosen channels left unmasked, with the planner's reason


@dataclass(frozen=True)
class SkippedGroup:
    root: str
    size: int
    reason: str


@dataclass(frozen=True)
class PrunePlan:
    """What :func:`prune_channels` masked, per group, and what compaction will remove."""

    amount: float
    importance: str
    groups: tuple[MaskedGroup, ...]
    skipped: tuple[SkippedGroup, ...]
    params_before: int
    macs_before: int
    masks: dict[str, int] = field(default_factory=dict)  # "layer.param" -> entries masked there
    params: int = (
        0  # parameters compaction removes with every masked channel (a tensor cut twice counted once)
    )
    macs: int = 0  # multiply-accumulates per forward on the example inputs, likewise

    @property
    def channels(self) -> int:
        return sum(len(g.masked) for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = self.channels
        return d

    def summary(self) -> str:
        """A few lines: what was masked, what compaction will save, and what was left whole and why."""
        lines = [
            f"masked {self.channels} channels in {len(self.groups)} groups ({self.importance}, amount "
            f"{self.amount:g}): compaction removes {self.params:,} of {self.params_before:,} parameters "
            f"({_share(self.params, self.params_before)}) and {self.macs:,} of {self.macs_before:,} MACs "
            f"({_share(self.macs, self.macs_before)})"
        ]
        reasons = Counter(s.reason for s in self.skipped)
        reasons.update(r for g in self.groups for _, r in g.kept[:1])
        lines += [f"  left whole: {n} group(s): {why}" for why, n in reasons.most_common()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


@dataclass(frozen=True)
class _Slot:
    """One tensor that holds a group's channels: ``owner.param`` along ``dim``, ``idxs[c]`` for root channel c."""

    owner: str  # module name
    param: str
    dim: int
    idxs: tuple[tuple[int, ...], ...]


def prune_channels(
    model: nn.Module,
    example_inputs: Any = None,
    amount: float = 0.3,
    importance: Importance = "l1",
    round_to: int | None = None,
    *,
    global_: bool = False,
) -> PrunePlan:
    """Mask ``amount`` of every group of coupled channels of ``model`` (in place, with
    ``torch.nn.utils.prune``), only where compaction can then remove them: see the module doc."""
    if not 0.0 <= amount < 1.0:
        raise ValueError(f"amount must be in [0, 1), found {amount}")
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to must be a positive integer, found {round_to}")
    inputs = resolve_example_inputs(model, example_inputs)
    plain, paths = _observed(model, inputs)
    options = Options()
    coupled = couple(plain, inputs, paths, options)
    modules: dict[str, Any] = dict(plain.named_modules())
    modules.update(dict(plain.named_parameters()))
    slots: dict[int, list[_Slot]] = {}
    skipped: list[SkippedGroup] = [SkippedGroup("", 0, why) for why in coupled.untraced]
    scores: dict[int, torch.Tensor] = {}
    for i, group in enumerate(coupled.groups):
        found = _slots(group, modules)
        if isinstance(found, str):
            skipped.append(SkippedGroup(group.root, group.size, found))
            continue
        slots[i] = found
        scores[i] = _score(group, modules, importance)
    units = {i: _units(coupled.groups[i], modules) for i in scores}
    chosen = _choose(coupled.groups, scores, units, amount, round_to, global_)
    trial = clone_module(plain)
    trial_modules = dict(trial.named_modules())
    for i, channels in chosen.items():
        _zero(trial_modules, slots[i], channels)
    _, plans = make_plans(trial, coupled.groups, [inputs], 1, options)
    positions = _positions(plain, inputs)
    groups: list[MaskedGroup] = []
    cuts: list[Cut] = []
    masks: dict[tuple[str, str], torch.Tensor] = {}
    for i, channels in sorted(chosen.items()):
        group, plan = coupled.groups[i], plans[i]
        removed = set(plan.removed)
        why = {f.channel: f.reason for f in plan.fates}
        masked = tuple(c for c in channels if c in removed)
        kept = tuple((c, why.get(c, "kept by the plan")) for c in channels if c not in removed)
        if not masked:
            skipped.append(SkippedGroup(group.root, group.size, kept[0][1] if kept else "nothing chosen"))
            continue
        for slot in slots[i]:
            _mask(masks, modules, slot, masked)
        cut = _cut(group, modules, len(masked))
        cuts.append(cut)
        params, macs = _removed(cut, modules, positions)
        names = tuple(sorted({s.owner for s in slots[i]}))
        groups.append(MaskedGroup(group.root, group.size, masked, names, params, macs, kept))
    _apply(model, masks)
    params, macs = _removed(_merged(cuts), modules, positions)
    return PrunePlan(
        amount=amount,
        importance=importance if isinstance(importance, str) else getattr(importance, "__name__", "custom"),
        groups=tuple(groups),
        skipped=tuple(skipped),
        params_before=sum(p.numel() for p in plain.parameters()),
        macs_before=sum(int(w.numel()) * positions.get(n, 0) for n, w in _weights(plain)),
        masks={f"{o}.{p}" if o else p: int((m == 0).sum()) for (o, p), m in masks.items()},
        params=params,
        macs=macs,
    )


def _observed(model: nn.Module, inputs: ExampleInputs) -> tuple[nn.Module, Paths]:
    """The model with its masks baked (sharing the user's plain parameters, never written) and the layers that
    run only in train mode (the coupling holds the channels they read): what ``compact``'s masks stage finds
    of it, from module hooks alone (masking needs no reference outputs nor value branches)."""
    plain = baked(model, share=True).eval()
    called = _called(plain, inputs)
    assert called is not None  # the eval-mode forward raises its own error where the inputs do not fit
    for candidate in train_inputs(inputs):
        trained = _called(clone_module(plain, share_parameters=True).train(), candidate)
        if trained is not None:
            return plain, Paths((), (), frozenset(trained - called), (), candidate)
    return plain, Paths((), (), frozenset(), "train mode did not run")


def _called(model: nn.Module, inputs: ExampleInputs) -> set[str] | None:
    """The modules one forward of ``model`` (in its own mode) calls; None where a train-mode run fails."""
    called: set[str] = set()
    hooks = [
        m.register_forward_pre_hook(lambda *_, key=name: called.add(key)) for name, m in model.named_modules()
    ]
    try:
        with torch.no_grad():
            if model.training:
                try:
                    model(*inputs.args, **inputs.kwargs)
                except Exception:  # the model's own train-mode code (BatchNorm on one value per channel...)
                    return None
            else:
                run(model, inputs)  # fails with one clear line if the inputs do not fit
    finally:
        for h in hooks:
            h.remove()
    return called


# --- which tensors hold a group's channels ---------------------------------------------------------------
def _slots(group: ChannelGroup, modules: dict[str, Any]) -> list[_Slot] | str:
    """Every tensor to zero for the group's channels to be exactly zero wherever they flow, or why not."""
    slots: list[_Slot] = []
    writers = 0
    for member in group.layers():
        obj = modules.get(member.name)
        if isinstance(obj, nn.Parameter):  # a bare channelwise parameter (LayerScale)
            owner, _, param = member.name.rpartition(".")
            slots.append(_Slot(owner, param, member.pruning_dim, member.idxs))
            continue
        role = role_of(obj)
        if role is Role.MIXING and member.side is Side.IN:
            continue  # a reader: its columns go with the channel, nothing to mask
        if role is not Role.MIXING and role is not Role.CHANNELWISE:
            return f"{member.name} ({member.op}) reads across these channels"
        shrinker = shrinker_for(obj)
        assert shrinker is not None
        params = shrinker.channel_params(obj, member.side if role is Role.MIXING else Side.OUT)
        if role is Role.MIXING:
            writers += 1
            if "weight" not in params:
                return f"{member.name} ({member.op}): compactor does not know where its rows are"
        for name, dim in params.items():
            if isinstance(getattr(obj, name, None), torch.Tensor):
                slots.append(_Slot(member.name, name, dim, member.idxs))
    if not writers:
        return "no layer writes these channels (an input of the model)"
    return slots


def _rows(tensor: torch.Tensor, dim: int, idxs: tuple[int, ...]) -> torch.Tensor:
    return tensor.detach().index_select(dim, torch.tensor(idxs, dtype=torch.long)).flatten()


def _score(group: ChannelGroup, modules: dict[str, Any], importance: Importance) -> torch.Tensor:
    """One score per root channel: the norm of every weight row the group's writers hold for it."""
    view = GroupView(group.root, group.size, {})
    for member in group.layers(Side.OUT):
        obj: Any = modules.get(member.name)
        shrinker = shrinker_for(obj) if obj is not None else None
        if shrinker is None or role_of(obj) is not Role.MIXING:
            continue
        dim = shrinker.channel_params(obj, Side.OUT)["weight"]
        view.rows[member.name] = [_rows(obj.weight, dim, idx) for idx in member.idxs]
    if callable(importance):
        scores = torch.as_tensor(importance(view), dtype=torch.float64).flatten()
        if scores.numel() != group.size:
            raise ValueError(
                f"importance gave {scores.numel()} scores for {group.root}'s {group.size} channels"
            )
        return scores
    if importance not in ("l1", "l2"):
        raise ValueError(f"importance must be 'l1', 'l2' or a function of a GroupView, found {importance!r}")
    p = 1 if importance == "l1" else 2
    total = torch.zeros(group.size, dtype=torch.float64)
    for rows in view.rows.values():
        total += torch.stack([r.double().abs().pow(p).sum() for r in rows])
    return total if p == 1 else total.sqrt()


def _units(group: ChannelGroup, modules: dict[str, Any]) -> list[int] | None:
    """Per root channel, the part of a grouped conv it falls in (every part must lose as many), or None where
    no grouped conv holds the group's channels."""
    for member in group.layers():
        obj = modules.get(member.name)
        groups = getattr(obj, "groups", 1)
        if not isinstance(obj, nn.modules.conv._ConvNd) or groups == 1 or role_of(obj) is not Role.MIXING:
            continue
        channels = width(obj, member.side)
        if not channels or any(len(idx) != 1 for idx in member.idxs):
            continue
        per = channels // groups
        return [idx[0] // per for idx in member.idxs]
    return None


def _choose(
    groups: list[ChannelGroup],
    scores: dict[int, torch.Tensor],
    units: dict[int, list[int] | None],
    amount: float,
    round_to: int | None,
    global_: bool,
) -> dict[int, list[int]]:
    """Root channels to mask per group: the lowest scores, ``amount`` of each group or of all of them; where a
    grouped conv holds the group, as many from each of its parts."""
    if global_:
        pooled = [
            (float(s[c] / s.mean()) if s.mean() > 0 else 0.0, i, c)
            for i, s in scores.items()
            for c in range(len(s))
        ]
        counts = dict(Counter(i for _, i, _ in sorted(pooled)[: int(amount * len(pooled))]))
    else:
        counts = {i: int(amount * groups[i].size) for i in scores}
    chosen = {}
    for i, n in counts.items():
        size = groups[i].size
        keep = max(1, size - n)
        if round_to:
            keep = min(size, math.ceil(keep / round_to) * round_to)
        picked = _lowest(scores[i], size - keep, units.get(i))
        if picked:
            chosen[i] = picked
    return chosen


def _lowest(scores: torch.Tensor, n: int, units: list[int] | None) -> list[int]:
    """The ``n`` lowest-scoring channels; with ``units``, ``n // parts`` from each part."""
    if n <= 0:
        return []
    if units is None:
        return sorted(torch.argsort(scores, stable=True)[:n].tolist())
    parts = sorted(set(units))
    each = n // len(parts)
    picked: list[int] = []
    for part in parts:
        members = torch.tensor([c for c, u in enumerate(units) if u == part], dtype=torch.long)
        order = torch.argsort(scores[members], stable=True)[: min(each, len(members) - 1)]
        picked += members[order].tolist()
    return sorted(picked)


# --- zeroing, masking and counting ------------------------------------------------------------------
def _local(slot: _Slot, channels: Sequence[int]) -> torch.Tensor:
    """The slot's own indices of root ``channels``."""
    return torch.tensor([j for c in channels for j in slot.idxs[c]], dtype=torch.long)


def _zero(modules: dict[str, nn.Module], slots: list[_Slot], channels: list[int]) -> None:
    with torch.no_grad():
        for slot in slots:
            tensor = getattr(modules[slot.owner], slot.param)
            tensor.index_fill_(slot.dim, _local(slot, channels).to(tensor.device), 0)


def _mask(
    masks: dict[tuple[str, str], torch.Tensor],
    modules: dict[str, Any],
    slot: _Slot,
    channels: tuple[int, ...],
) -> None:
    tensor = getattr(modules[slot.owner], slot.param)
    key = (slot.owner, slot.param)
    if key not in masks:
        masks[key] = torch.ones(tensor.shape, dtype=tensor.dtype, device=tensor.device)
    masks[key].index_fill_(slot.dim, _local(slot, channels).to(tensor.device), 0)


def _apply(model: nn.Module, masks: dict[tuple[str, str], torch.Tensor]) -> None:
    """``prune.custom_from_mask`` on the user's model: a tensor already masked gets the product of both."""
    for (owner, param), mask in masks.items():
        prune.custom_from_mask(model.get_submodule(owner) if owner else model, param, mask)  # type: ignore[no-untyped-call]


def _weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The layers whose MACs are ``weight.numel()`` per output position: mixing layers and depthwise convs."""
    found = []
    for name, m in model.named_modules():
        weight = getattr(m, "weight", None)
        counted = role_of(m) is Role.MIXING or isinstance(m, nn.modules.conv._ConvNd)
        if counted and isinstance(weight, torch.Tensor) and not isinstance(m, nn.Embedding):
            found.append((name, weight))
    return found


def _positions(model: nn.Module, inputs: ExampleInputs) -> dict[str, int]:
    """Per conv/linear layer: output positions per output channel on ``inputs`` (batch included), so that its
    MACs are ``weight.numel() x positions``."""
    found: dict[str, int] = {}
    hooks = []
    for name, _ in _weights(model):
        module = model.get_submodule(name)

        def hook(mod: nn.Module, _args: Any, out: Any, key: str = name) -> None:
            channels = width(mod, Side.OUT)
            if isinstance(out, torch.Tensor) and channels:
                found[key] = found.get(key, 0) + out.numel() // channels

        hooks.append(module.register_forward_hook(hook))
    try:
        with eval_mode_restored(model), torch.no_grad():
            run(model, inputs)
    finally:
        for h in hooks:
            h.remove()
    return found


Cut = dict[tuple[str, str], dict[int, float]]  # (layer, parameter) -> dimension -> share of it removed


def _cut(group: ChannelGroup, modules: dict[str, Any], n: int) -> Cut:
    """What ``n`` removed channels of ``group`` take from each parameter of its members: per dimension, the
    share removed (a writer's rows, a reader's columns, a channelwise layer's entries)."""
    cut: Cut = {}
    for member in group.layers():
        obj = modules.get(member.name)
        if isinstance(obj, nn.Parameter):  # a bare channelwise parameter: one side only
            owner, _, param = member.name.rpartition(".")
            cut.setdefault((owner, param), {})[member.pruning_dim] = n / obj.shape[member.pruning_dim]
            continue
        shrinker = shrinker_for(obj) if obj is not None else None
        channels = width(obj, member.side)
        if shrinker is None or not channels:
            continue
        for name, dim in shrinker.channel_params(obj, member.side).items():
            if isinstance(getattr(obj, name, None), torch.Tensor):
                cut.setdefault((member.name, name), {})[dim] = n / channels  # a channelwise layer: both sides
    return cut


def _removed(cut: Cut, modules: dict[str, Any], positions: dict[str, int]) -> tuple[int, int]:
    """Parameters and MACs (weights x output positions) that ``cut`` removes: a tensor cut along two
    dimensions (rows by one group, columns by another) loses what is outside the kept block."""
    params = macs = 0
    for (owner, name), dims in cut.items():
        tensor = getattr(modules[owner], name) if owner else modules[name]
        kept = 1.0
        for share in dims.values():
            kept *= max(0.0, 1.0 - share)
        entries = round(tensor.numel() * (1.0 - kept))
        params += entries
        if name == "weight":
            macs += entries * positions.get(owner, 0)
    return params, macs


def _merged(cuts: list[Cut]) -> Cut:
    """Every group's cut together: shares of one dimension from different groups (a concatenation) add up."""
    merged: Cut = {}
    for cut in cuts:
        for key, dims in cut.items():
            into = merged.setdefault(key, {})
            for dim, share in dims.items():
                into[dim] = into.get(dim, 0.0) + share
    return merged
