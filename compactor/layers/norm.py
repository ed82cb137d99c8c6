"""Normalisation layers: BatchNorm and InstanceNorm (channelwise), GroupNorm (whole groups), LayerNorm (blocking)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import Index, Role, Shrinker, Side, new_like, register, take

_BatchNorm = nn.modules.batchnorm._BatchNorm


@register(_BatchNorm)
class BatchNormShrinker(Shrinker[Any]):
    """BatchNorm normalises each channel with its running statistics: channelwise.

    Its weight of 0 at a channel makes it emit its bias whatever comes in (network slimming), and a
    constant removed from its input is made up in its running mean: ``(x - k) - (mean - k) = x - mean``.
    """

    role = Role.CHANNELWISE
    shape_attrs = ("num_features",)

    def out_channels(self, m: Any) -> int:
        return int(m.num_features)

    def in_channels(self, m: Any) -> int:
        return int(m.num_features)

    def expected_shapes(self, m: Any) -> dict[str, tuple[int | None, ...]]:
        n = m.num_features
        return {"weight": (n,), "bias": (n,), "running_mean": (n,), "running_var": (n,)}

    def forgets_input(self, m: Any, idx: Index) -> torch.Tensor:
        if m.weight is None:
            return torch.zeros(len(idx), dtype=torch.bool)
        weight: torch.Tensor = m.weight.detach()
        return (weight[idx.to(weight.device)] == 0).cpu()

    def can_absorb_shift(self, m: Any) -> bool:
        return True

    def absorb_shift(self, m: Any, delta: torch.Tensor) -> None:
        if m.running_mean is None:  # without running stats the batch mean absorbs any shift
            return
        with torch.no_grad():
            m.running_mean -= delta.to(m.running_mean)

    def channel_params(self, m: Any, side: Side) -> dict[str, int]:
        return {"weight": 0, "bias": 0} if getattr(m, "affine", True) else {}

    def shrink(self, m: Any, keep_out: Index | None, keep_in: Index | None) -> Any:
        keep = keep_out if keep_out is not None else keep_in
        new = new_like(
            m,
            weight=take(m.weight, 0, keep),
            bias=take(m.bias, 0, keep),
            running_mean=take(m.running_mean, 0, keep),
            running_var=take(m.running_var, 0, keep),
        )
        new.num_features = len(keep) if keep is not None else m.num_features
        return new


@register(nn.modules.instancenorm._InstanceNorm)
class InstanceNormShrinker(BatchNormShrinker):
    """InstanceNorm normalises each channel on its own: channelwise like BatchNorm. Its statistics are
    per sample, so neither the weight-0 shortcut nor the running-mean fold is used for it."""

    def forgets_input(self, m: Any, idx: Index) -> torch.Tensor:
        return torch.zeros(len(idx), dtype=torch.bool)

    def can_absorb_shift(self, m: Any) -> bool:
        return False


@register(nn.GroupNorm)
class GroupNormShrinker(Shrinker[nn.GroupNorm]):
    """GroupNorm normalises each group on its own: whole groups can go, single channels cannot."""

    role = Role.CHANNELWISE
    shape_attrs = ("num_groups", "num_channels")

    def out_channels(self, m: nn.GroupNorm) -> int:
        return m.num_channels

    def in_channels(self, m: nn.GroupNorm) -> int:
        return m.num_channels

    def expected_shapes(self, m: nn.GroupNorm) -> dict[str, tuple[int | None, ...]]:
        if m.num_groups < 1 or m.num_channels % m.num_groups:
            return {"weight": (-1,)}
        return {"weight": (m.num_channels,), "bias": (m.num_channels,)}

    def removable(self, m: nn.GroupNorm, side: Side, idx: Index) -> Index:
        size = m.num_channels // m.num_groups
        chosen = set(idx.tolist())
        whole = [g for g in range(m.num_groups) if all(c in chosen for c in range(g * size, (g + 1) * size))]
        keep = [c for g in whole for c in range(g * size, (g + 1) * size)]
        return torch.tensor(sorted(keep), dtype=torch.long)

    def channel_params(self, m: nn.GroupNorm, side: Side) -> dict[str, int]:
        return {"weight": 0, "bias": 0} if m.affine else {}

    def shrink(self, m: nn.GroupNorm, keep_out: Index | None, keep_in: Index | None) -> nn.GroupNorm:
        keep = keep_out if keep_out is not None else keep_in
        assert keep is not None
        new = new_like(m, weight=take(m.weight, 0, keep), bias=take(m.bias, 0, keep))
        new.num_groups = len(keep) // (m.num_channels // m.num_groups)
        new.num_channels = len(keep)
        return new


@register(nn.LayerNorm)
class LayerNormShrinker(Shrinker[nn.LayerNorm]):
    role = Role.BLOCKING
    blocking_reason = "LayerNorm statistics include every channel, so removing one changes the others"

    def out_channels(self, m: nn.LayerNorm) -> None:
        return None  # never rebuilt: its groups are kept whole

    def in_channels(self, m: nn.LayerNorm) -> None:
        return None


__all__ = ["BatchNormShrinker", "GroupNormShrinker", "InstanceNormShrinker", "LayerNormShrinker"]
