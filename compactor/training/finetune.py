"""Fine-tune a pruned model without letting its pruned weights come back.

A pruned weight is an exact zero, and nothing in training keeps it there:

- its gradient is not zero (the loss depends on a weight whether or not the weight is zero), so a plain
  optimizer step moves it;
- an optimizer carries state built from earlier gradients (SGD's ``momentum_buffer``, Adam's ``exp_avg``),
  which keeps moving a weight after its gradient is zeroed;
- with ``torch.nn.utils.prune`` masks attached, the effective ``weight = weight_orig * weight_mask`` stays
  zero, but weight decay moves the hidden entries of ``weight_orig`` and fills the optimizer state there.

:func:`keep_pruned` closes all three: it masks gradients (a tensor hook per parameter), and after every
``optimizer.step()`` (an optimizer step post-hook) it re-applies the mask to the parameter and zeroes the
optimizer state at the masked positions. ``handle.remove()`` undoes it.

>>> handle = keep_pruned(model, optimizer)
>>> train(model, optimizer)      # pruned entries stay exactly 0.0
>>> handle.remove()
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.hooks import RemovableHandle

__all__ = ["KeepPruned", "PrunedTensor", "find_pruned", "keep_pruned"]


@dataclass(frozen=True)
class PrunedTensor:
    """One parameter whose masked entries are held at zero.

    ``name`` is the parameter's name in the model (``conv.weight``, or ``conv.weight_orig`` while a prune mask
    is attached); ``keep`` is ``True`` where the entry may train and ``False`` where it must stay zero.
    """

    name: str
    param: nn.Parameter
    keep: torch.Tensor  # bool, same shape and device as param

    @property
    def zeros(self) -> int:
        return int((~self.keep).sum())


def find_pruned(model: nn.Module, *, min_dim: int = 2) -> list[PrunedTensor]:
    """The parameters of ``model`` to hold at zero, and where.

    A parameter behind a ``torch.nn.utils.prune`` mask (``weight_orig`` with a ``weight_mask`` buffer) takes its
    mask. Any other trainable parameter with at least ``min_dim`` dimensions takes its current exact zeros.
    Parameters with fewer dimensions (biases, norm scales) are left free by default: many start at exactly zero
    (``BatchNorm`` bias) and must train; pass ``min_dim=1`` to hold their zeros too.
    """
    found: list[PrunedTensor] = []
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for tensor_name, param in module.named_parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            keep = _mask_of(module, tensor_name, param, min_dim)
            if keep is not None and not bool(keep.all()):
                name = f"{module_name}.{tensor_name}" if module_name else tensor_name
                found.append(PrunedTensor(name, param, keep))
    return found


def _mask_of(module: nn.Module, tensor_name: str, param: nn.Parameter, min_dim: int) -> torch.Tensor | None:
    if tensor_name.endswith("_orig"):
        mask = module._buffers.get(tensor_name[: -len("_orig")] + "_mask")
        if isinstance(mask, torch.Tensor) and _has_prune_hook(module):
            return mask.detach().to(device=param.device, dtype=torch.bool).clone()
    if param.dim() < min_dim:
        return None
    return param.detach() != 0


def _has_prune_hook(module: nn.Module) -> bool:
    return any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values())


class KeepPruned:
    """Holds the pruned entries of a model at exactly zero through training; returned by :func:`keep_pruned`.

    Use ``remove()`` (or a ``with`` block) to let the model train freely again. ``enforce()`` re-applies the
    masks by hand, e.g. after ``optimizer.load_state_dict`` or after a step of an optimizer it was not given.
    """

    def __init__(self, tensors: list[PrunedTensor], optimizers: list[torch.optim.Optimizer]) -> None:
        self.tensors = tensors
        self.optimizers = optimizers
        self._handles: list[RemovableHandle] = []
        self._active = True
        for t in tensors:
            self._handles.append(t.param.register_hook(_gradient_mask(t.keep)))  # type: ignore[no-untyped-call]  # torch leaves Tensor.register_hook unannotated
        for opt in optimizers:
            self._handles.append(opt.register_step_post_hook(self._after_step))
        self.enforce()

    @property
    def active(self) -> bool:
        """True until :meth:`remove`."""
        return self._active

    @property
    def zeros(self) -> int:
        """How many entries are held at zero."""
        return sum(t.zeros for t in self.tensors)

    def add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Also hold the masks after each step of ``optimizer`` (one created after :func:`keep_pruned`)."""
        _check_optimizer(optimizer)
        if not self._active:
            raise RuntimeError(
                "keep_pruned: this handle was removed; call keep_pruned(model, optimizer) again"
            )
        self.optimizers.append(optimizer)
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self._zero_state(optimizer)

    @torch.no_grad()
    def enforce(self) -> None:
        """Set every masked entry, and the optimizers' state there, to zero now."""
        for t in self.tensors:
            t.param.masked_fill_(~t.keep.to(t.param.device), 0)
        for opt in self.optimizers:
            self._zero_state(opt)

    @torch.no_grad()
    def max_drift(self) -> float:
        """The largest absolute value at a masked position (0.0 while the masks hold)."""
        drifts = (t.param.detach()[~t.keep.to(t.param.device)].abs().max() for t in self.tensors if t.zeros)
        return max((float(d) for d in drifts), default=0.0)

    def remove(self) -> None:
        """Remove every hook: gradients and optimizer steps are no longer masked. Safe to call twice."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._active = False

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            params = {id(p) for group in optimizer.param_groups for p in group["params"]}
            for t in self.tensors:
                if id(t.param) in params:
                    t.param.masked_fill_(~t.keep.to(t.param.device), 0)
            self._zero_state(optimizer)

    @torch.no_grad()
    def _zero_state(self, optimizer: torch.optim.Optimizer) -> None:
        # Every per-entry state tensor (momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, square_avg, ...)
        # has the parameter's shape; scalar entries such as ``step`` do not and are left alone.
        for t in self.tensors:
            for key, value in optimizer.state.get(t.param, {}).items():
                if key != "step" and isinstance(value, torch.Tensor) and value.shape == t.param.shape:
                    value.masked_fill_(~t.keep.to(value.device), 0)

    def __enter__(self) -> KeepPruned:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def __iter__(self) -> Iterator[PrunedTensor]:
        return iter(self.tensors)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"KeepPruned({len(self.tensors)} tensors, {self.zeros} zeros, {len(self.optimizers)} optimizers, {state})"


def _gradient_mask(keep: torch.Tensor) -> Any:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(~keep.to(grad.device), 0)

    return hook


def _check_optimizer(optimizer: object) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"keep_pruned: expected a torch.optim.Optimizer, found {type(optimizer).__name__}; "
            "pass the optimizer itself (in Lightning: self.optimizers().optimizer)"
        )


def keep_pruned(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer] | None = None,
    *,
    min_dim: int = 2,
) -> KeepPruned:
    """Hold the pruned entries of ``model`` at exactly zero while it trains; return a removable handle.

    Call it after pruning, before fine-tuning. The masks are captured now: from ``torch.nn.utils.prune`` masks
    where attached (the masked entries of ``weight_orig`` are zeroed too, so a later ``prune.remove`` cannot
    bring hidden values back), otherwise from the current exact zeros of every parameter with at least
    ``min_dim`` dimensions (see :func:`find_pruned`). Masks follow the parameter objects, so ``prune.remove``
    during training keeps working. Prune again? ``remove()`` the handle and call ``keep_pruned`` again.

    Without ``optimizer`` only gradients are masked; momentum, Adam moments and ``load_state_dict`` can then
    still move pruned weights. Pass every optimizer that updates the model (or use ``add_optimizer`` later).
    """
    if optimizer is None:
        optimizers: list[torch.optim.Optimizer] = []
    elif isinstance(optimizer, (list, tuple)):
        optimizers = list(optimizer)
    else:
        optimizers = [optimizer]
    for opt in optimizers:
        _check_optimizer(opt)
    tensors = find_pruned(model, min_dim=min_dim)
    if not tensors:
        warnings.warn(
            f"keep_pruned: {type(model).__name__} has no pruned entries (no prune masks, no exact zeros in "
            f"parameters with >= {min_dim} dims); nothing is held. Call it after pruning.",
            stacklevel=2,
        )
    return KeepPruned(tensors, optimizers)
