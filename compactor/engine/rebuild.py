"""Stage 5, rebuild: apply group plans to a copy of the model.

First the compensation, in the original index space (folds into biases, merges into carriers: see
:mod:`compactor.engine.plan.compensate`), then the removal: every layer that loses channels is replaced
by a new, smaller one built by its shrinker. The model passed in is never modified.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..layers import Side, shrinker_for
from ..modules import clone_module, own_parameters
from ..util import set_submodule
from .coupling.groups import Kind, SizeSource, equal_pieces
from .plan import GroupPlan, apply_compensation


def apply_plans(model: nn.Module, plans: list[GroupPlan]) -> nn.Module:
    """A compacted copy of ``model`` with every plan in ``plans`` applied.

    The copy shares ``model``'s parameter tensors, except in the layers the compensation writes into, which
    get copies of their own first; the layers that shrink are new ones. So a rebuild costs what changes, not
    a second model; a write into a shared tensor would be a bug, and is refused before anything is returned.
    """
    new = clone_module(model, share_parameters=True)
    modules = dict(new.named_modules())
    own_parameters(new, _written(plans, modules))
    versions = [(p, p._version) for p in model.parameters()]
    for plan in plans:
        apply_compensation(plan, modules)
    per_layer: dict[str, dict[Side, set[int]]] = defaultdict(dict)
    for (name, side), idx in _removals(plans).items():
        per_layer[name][side] = idx
    params = dict(new.named_parameters())
    for name, sides in per_layer.items():
        if name in modules:
            new = set_submodule(new, name, _shrunk(modules[name], sides))
        elif name in params:
            _replace_parameter(new, name, params[name], sides, plans)
    for (module, attr), (_, after) in split_sizes(model, plans).items():
        setattr(new.get_submodule(module), attr, after)
    _check_untouched(versions)
    return new


SplitSizes = int | tuple[int, ...] | list[int]


def split_sizes(
    model: nn.Module, plans: list[GroupPlan]
) -> dict[tuple[str, str], tuple[SplitSizes, SplitSizes]]:
    """(module, attribute) -> its split sizes before and after ``plans``, for each split whose sizes are a
    module attribute (:attr:`~compactor.engine.coupling.Member.source`) that loses channels: each piece
    keeps what its channels keep. A tuple stays a tuple, a list a list; an int (``split(x, self.width)``:
    equal pieces) stays an int where the pieces stay equal, else becomes the list of their sizes; for
    ``split(x, self.attr // k)`` (k pieces that each lose as many) the attribute becomes the kept total."""
    removed: dict[SizeSource, tuple[tuple[int, ...], set[int]]] = {}
    for plan in plans:
        for member in plan.group.members:
            if member.kind not in (Kind.SPLIT, Kind.CHUNK) or member.source is None or not plan.removed:
                continue
            _, gone = removed.setdefault(member.source, (member.pieces, set()))
            gone.update(i for r in plan.removed for i in member.idxs[r])
    out: dict[tuple[str, str], tuple[SplitSizes, SplitSizes]] = {}
    for source, (pieces, gone) in removed.items():
        if not gone:
            continue
        before = getattr(model.get_submodule(source.module), source.attr)
        starts = [sum(pieces[:p]) for p in range(len(pieces))]
        counts = [size - sum(1 for i in gone if s <= i < s + size) for s, size in zip(starts, pieces)]
        after: SplitSizes
        if source.per:  # attr // per is each piece's size: the pieces lost as many each (Kind.CHUNK)
            after = sum(counts)
        elif isinstance(before, int):
            after = counts[0] if tuple(counts) == equal_pieces(counts[0], sum(counts)) else counts
        else:
            after = type(before)(counts)
        out[(source.module, source.attr)] = (before, after)
    return out


def _written(plans: list[GroupPlan], modules: dict[str, nn.Module]) -> dict[str, set[str] | None]:
    """Layer -> the names of the parameters ``plans``' compensation writes into (None: any of them)."""
    out: dict[str, set[str] | None] = {}

    def add(layer: str, names: tuple[str, ...] | None) -> None:
        if names is None or out.get(layer, set()) is None:  # None: no shrinker, or it may write any
            out[layer] = None
        else:
            out.setdefault(layer, set()).update(names)  # type: ignore[union-attr]  # not None: checked above

    for plan in plans:
        for f in plan.folds:
            if f.norm and modules.get(f.norm) is not None:
                add(f.norm, _writes(modules[f.norm], "shift"))
            else:
                add(f.layer, _writes(modules.get(f.layer), "fold"))
        for m in plan.merges:
            add(m.layer, _writes(modules.get(m.layer), "merge"))
    return out


def _writes(module: nn.Module | None, step: str) -> tuple[str, ...] | None:
    shrinker = shrinker_for(module) if module is not None else None
    if shrinker is None:
        return None
    written: tuple[str, ...] | None = getattr(shrinker, f"{step}_writes")
    return written


def _check_untouched(versions: list[tuple[nn.Parameter, int]]) -> None:
    """The copied model's parameters still unwritten (``Tensor._version`` counts in-place writes)."""
    for p, version in versions:
        if p._version != version:
            raise AssertionError(
                f"rebuilding wrote into a parameter of the model it copies ({tuple(p.shape)})"
            )


def _removals(plans: list[GroupPlan]) -> dict[tuple[str, Side], set[int]]:
    """(layer, side) -> local indices to remove, over every plan (passengers, layers that run only in train
    mode, lose theirs too)."""
    out: dict[tuple[str, Side], set[int]] = defaultdict(set)
    for plan in plans:
        removed = plan.removed
        if not removed:
            continue
        for member in plan.group.members:
            if member.kind not in (Kind.LAYER, Kind.PASSENGER):
                continue
            for r in removed:
                out[(member.name, member.side)].update(member.idxs[r])
    return {k: v for k, v in out.items() if v}


def _keep(width: int | None, removed: set[int] | None) -> torch.Tensor | None:
    if removed is None or width is None:
        return None
    return torch.tensor([i for i in range(width) if i not in removed], dtype=torch.long)


def _shrunk(module: nn.Module, sides: dict[Side, set[int]]) -> nn.Module:
    shrinker = shrinker_for(module)
    assert shrinker is not None, f"no shrinker for {type(module).__name__}"
    keep_out = _keep(shrinker.out_channels(module), sides.get(Side.OUT))
    keep_in = _keep(shrinker.in_channels(module), sides.get(Side.IN))
    new: nn.Module = shrinker.shrink(module, keep_out, keep_in)
    return new


def _replace_parameter(
    root: nn.Module, name: str, param: nn.Parameter, sides: dict[Side, set[int]], plans: list[GroupPlan]
) -> None:
    """A bare parameter (LayerScale) sliced along the dimension that holds its channels."""
    dim = next(m.pruning_dim for p in plans for m in p.group.layers() if m.name == name)
    removed = set().union(*sides.values())
    keep = torch.tensor([i for i in range(param.shape[dim]) if i not in removed], dtype=torch.long)
    new = nn.Parameter(param.detach().index_select(dim, keep).clone(), requires_grad=param.requires_grad)
    set_submodule(root, name, new)
