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
from ..util import set_submodule
from .masks import clone_module
from .plan import GroupPlan, apply_compensation


def apply_plans(model: nn.Module, plans: list[GroupPlan]) -> nn.Module:
    """A compacted copy of ``model`` with every plan in ``plans`` applied."""
    new = clone_module(model)
    modules = dict(new.named_modules())
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
    return new


def _removals(plans: list[GroupPlan]) -> dict[tuple[str, Side], set[int]]:
    """(layer, side) -> local indices to remove, over every plan."""
    out: dict[tuple[str, Side], set[int]] = defaultdict(set)
    for plan in plans:
        removed = plan.removed
        if not removed:
            continue
        for member in plan.group.layers():
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
