"""Stage 5, rebuild: apply group plans to a copy of the model.

First the compensation, in the original index space (folds into biases, merges into carriers), then
the removal: every layer that loses channels is replaced by a new, smaller one built by its shrinker.
The model passed in is never modified.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from typing import Any

import torch
from torch import nn

from .graph import OUT
from .layers import shrinker_for
from .plan import GroupPlan


def apply_plans(model: nn.Module, plans: list[GroupPlan]) -> nn.Module:
    """A compacted copy of ``model`` with every plan in ``plans`` applied."""
    new = copy.deepcopy(model)
    modules = dict(new.named_modules())
    for plan in plans:
        _compensate(plan, modules)
    per_layer: dict[str, dict[str, set[int]]] = defaultdict(dict)
    for (name, side), idx in _removals(plans).items():
        per_layer[name][side] = idx
    params = dict(new.named_parameters())
    for name, sides in per_layer.items():
        if name in modules:
            _replace(new, name, _shrunk(modules[name], sides))
        elif name in params:
            _replace_parameter(new, name, params[name], sides, plans)
    return new


def _compensate(plan: GroupPlan, modules: dict[str, nn.Module]) -> None:
    for fold in plan.folds:
        module = modules[fold.layer]
        shrinker = shrinker_for(module)
        assert shrinker is not None
        idx, k = torch.tensor(fold.idx, dtype=torch.long), torch.tensor(fold.k, dtype=torch.float64)
        norm = modules.get(fold.norm) if fold.norm else None
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            if norm.running_mean is not None:  # without running stats the batch mean absorbs any shift
                with torch.no_grad():
                    norm.running_mean -= shrinker.fold_delta(module, idx, k).to(norm.running_mean)
        else:
            shrinker.fold_constant(module, idx, k)
    for merge in plan.merges:
        module = modules[merge.layer]
        shrinker_for(module).merge_into(  # type: ignore[union-attr]
            module, merge.carrier, torch.tensor(merge.idx, dtype=torch.long), torch.tensor(merge.ratio, dtype=torch.float64)
        )


def _removals(plans: list[GroupPlan]) -> dict[tuple[str, str], set[int]]:
    """(layer, side) -> local indices to remove, over every plan."""
    out: dict[tuple[str, str], set[int]] = defaultdict(set)
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


def _shrunk(module: nn.Module, sides: dict[str, set[int]]) -> nn.Module:
    shrinker = shrinker_for(module)
    assert shrinker is not None, f"no shrinker for {type(module).__name__}"
    keep_out = _keep(shrinker.out_channels(module), sides.get(OUT))
    keep_in = _keep(shrinker.in_channels(module), sides.get("in"))
    return shrinker.shrink(module, keep_out, keep_in)


def _replace(root: nn.Module, name: str, new: Any) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def _replace_parameter(
    root: nn.Module, name: str, param: nn.Parameter, sides: dict[str, set[int]], plans: list[GroupPlan]
) -> None:
    dim = next(m.pruning_dim for p in plans for m in p.group.layers() if m.name == name)
    removed = set().union(*sides.values())
    keep = torch.tensor([i for i in range(param.shape[dim]) if i not in removed], dtype=torch.long)
    _replace(root, name, nn.Parameter(param.detach().index_select(dim, keep).clone(), requires_grad=param.requires_grad))
