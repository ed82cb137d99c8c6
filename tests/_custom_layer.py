"""A layer type compactor does not ship, taught to it in this one module (docs/ARCHITECTURE.md, "How to
add a layer type"): a pointwise convolution written with ``einsum``, not a subclass of ``nn.Conv2d``, so
neither compactor nor Torch-Pruning knows it until its shrinker is registered here."""

from __future__ import annotations

import torch
from torch import nn

from compactor.layers import Index, Role, Shrinker, new_like, register, take, zero_along


class PointwiseConv(nn.Module):
    """``y[b, o, h, w] = sum_i W[o, i] x[b, i, h, w] + b[o]``: a 1x1 conv as a matrix product."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels) / in_channels**0.5)
        self.bias = nn.Parameter(torch.randn(out_channels) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oi,bihw->bohw", self.weight, x) + self.bias[:, None, None]


@register(PointwiseConv)
class PointwiseConvShrinker(Shrinker[PointwiseConv]):
    role = Role.MIXING
    shape_attrs = ("in_channels", "out_channels")

    def out_channels(self, m: PointwiseConv) -> int:
        return m.out_channels

    def in_channels(self, m: PointwiseConv) -> int:
        return m.in_channels

    def out_rows_zero(self, m: PointwiseConv, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 0, idx)

    def in_cols_zero(self, m: PointwiseConv, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 1, idx)

    def can_fold(self, m: PointwiseConv) -> bool:
        return True  # no padding: a constant input adds the same amount everywhere

    def fold_delta(self, m: PointwiseConv, idx: Index, k: torch.Tensor) -> torch.Tensor:
        w = m.weight.detach()
        return (w[:, idx] * k.to(w)).sum(1)

    def merge_into(self, m: PointwiseConv, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight[:, carrier] += (m.weight[:, idx] * ratio.to(m.weight)).sum(1)

    def shrink(self, m: PointwiseConv, keep_out: Index | None, keep_in: Index | None) -> PointwiseConv:
        weight = take(take(m.weight, 0, keep_out), 1, keep_in)
        new = new_like(m, weight=weight, bias=take(m.bias, 0, keep_out))
        new.out_channels = len(keep_out) if keep_out is not None else m.out_channels
        new.in_channels = len(keep_in) if keep_in is not None else m.in_channels
        return new
