"""Stage 2, masks: the user's masked model as the reference, and its masks baked into plain weights.

:func:`masked_view` clones the model as the user holds it (sharing the pruned tensors, not copying them);
:func:`compactor.modules.baked` bakes its masks and re-parametrisations into plain weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import prune

from ..modules import clone_module_with


def masked_view(model: nn.Module) -> tuple[nn.Module, list[tuple[torch.Tensor, int]]]:
    """A clone of ``model`` as the user holds it, for forwards in eval mode: it shares each pruned tensor's
    ``*_orig``, mask and computed tensor with ``model`` (the pruning hook only reads the first two, and
    replaces the third rather than writing it) and copies everything else, so it costs the tensors the hooks
    compute, not three copies of every pruned weight. Also returns the shared tensors with their ``_version``, for
    :func:`check_unwritten` after the forwards."""
    memo: dict[int, object] = {}
    for module in model.modules():
        for hook in module._forward_pre_hooks.values():
            if not isinstance(hook, prune.BasePruningMethod):
                continue
            for key in (hook._tensor_name + "_orig", hook._tensor_name + "_mask"):
                tensor = module._parameters.get(key, module._buffers.get(key))
                if tensor is not None:
                    memo[id(tensor)] = tensor
            computed = module.__dict__.get(hook._tensor_name)
            if isinstance(computed, torch.Tensor):  # read before the layer's call, maybe: as the user has it
                memo[id(computed)] = computed
    shared = [(t, t._version) for t in memo.values() if isinstance(t, torch.Tensor)]
    return clone_module_with(model, memo), shared


def check_unwritten(shared: list[tuple[torch.Tensor, int]]) -> str | None:
    """Why :func:`masked_view`'s shared tensors are no longer what they were (a forward wrote into them), or
    None."""
    written = sum(t._version != v for t, v in shared)
    return f"the model's forward wrote into {written} of its pruned tensors in eval mode" if written else None
