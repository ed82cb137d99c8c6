"""Sparsity that compaction cannot remove: a warning when zeros form no whole channel."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

UNSTRUCTURED_WARNING_AT = 0.05  # fraction of the compacted model's weights still zero


def unstructured_warnings(model: nn.Module, stacks: frozenset[str] = frozenset()) -> Iterator[str]:
    """Zeros outside whole zero slices (a kept carrier or channel is one) cannot shrink any layer. ``stacks``:
    parameters whose ``[e]`` slices are matrices of their own (fused experts): zero rows and columns of each
    count as whole slices."""
    scattered = {
        name: sum(_scattered_zeros(w) for w in p.detach()) if name in stacks else _scattered_zeros(p.detach())
        for name, p in model.named_parameters()
        if p.dim() >= 2
    }
    sizes = {name: p.numel() for name, p in model.named_parameters() if p.dim() >= 2}
    zeros, total = sum(scattered.values()), sum(sizes.values())
    if not total or zeros / total < UNSTRUCTURED_WARNING_AT:
        return
    worst = sorted(scattered, key=lambda name: -scattered[name] / sizes[name])[:3]
    yield (
        f"{zeros:,} weights ({zeros / total:.0%} of all) are still zero but form no whole channel (unstructured "
        f"masks), so no layer can shrink by them; most in "
        + ", ".join(f"{name} {scattered[name] / sizes[name]:.0%}" for name in worst)
        + ". --sparse-storage (compactor.io.sparse.save_sparse) stores them compressed"
    )


def _scattered_zeros(w: torch.Tensor) -> int:
    """Zero entries of ``w`` that lie in no all-zero slice along dim 0 or dim 1."""
    zero = w == 0
    count = int(torch.count_nonzero(zero))
    if not count:
        return 0
    rows = int(zero.flatten(1).all(1).sum())  # each holds numel / shape[0] zeros
    cols = int(zero.movedim(1, 0).flatten(1).all(1).sum())  # each numel / shape[1]
    n, d0, d1 = w.numel(), w.shape[0], w.shape[1]
    return count - rows * (n // d0) - cols * (n // d1) + rows * cols * (n // (d0 * d1))
