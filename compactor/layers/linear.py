"""Linear, transformers' Conv1D (a Linear with its weight transposed) and Embedding."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import (
    Index,
    Role,
    Shrinker,
    Side,
    must_take,
    new_like,
    register,
    register_by_name,
    take,
    zero_along,
)


@register(nn.Linear)
class LinearShrinker(Shrinker[nn.Linear]):
    """Linear. weight: [out, in]. A constant input always folds into the bias."""

    role = Role.MIXING
    input_channel_dim = -1
    shape_attrs = ("in_features", "out_features")

    def expected_shapes(self, m: nn.Linear) -> dict[str, tuple[int | None, ...]]:
        return {"weight": (m.out_features, m.in_features), "bias": (m.out_features,)}

    def out_rows_zero(self, m: nn.Linear, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 0, idx)

    def in_cols_zero(self, m: nn.Linear, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 1, idx)

    def can_fold(self, m: nn.Linear) -> bool:
        return True

    def fold_delta(self, m: nn.Linear, idx: Index, k: torch.Tensor) -> torch.Tensor:
        w = m.weight.detach()
        return (w[:, idx] * k.to(w)).sum(1)

    def merge_into(self, m: nn.Linear, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight[:, carrier] += (m.weight[:, idx] * ratio.to(m.weight)).sum(1)

    def out_channels(self, m: nn.Linear) -> int:
        return m.out_features

    def in_channels(self, m: nn.Linear) -> int:
        return m.in_features

    def probe_inputs(self, m: nn.Linear) -> list[torch.Tensor]:
        return [torch.randn(2, m.in_features, generator=torch.Generator().manual_seed(0)).to(m.weight)]

    def channel_params(self, m: nn.Linear, side: Side) -> dict[str, int]:
        return {"weight": 0, "bias": 0} if side is Side.OUT else {"weight": 1}

    def shrink(self, m: nn.Linear, keep_out: Index | None, keep_in: Index | None) -> nn.Linear:
        new = new_like(
            m, weight=must_take(must_take(m.weight, 0, keep_out), 1, keep_in), bias=take(m.bias, 0, keep_out)
        )
        new.out_features = len(keep_out) if keep_out is not None else m.out_features
        new.in_features = len(keep_in) if keep_in is not None else m.in_features
        return new


@register_by_name("transformers.pytorch_utils", "Conv1D")
class Conv1DShrinker(Shrinker[Any]):
    """transformers' ``Conv1D`` (GPT-2, GPT, ImageGPT): ``y = x @ W + b`` with weight ``[nx, nf]`` (inputs,
    outputs): a Linear whose weight is stored transposed. Registered by name: compactor does not import
    transformers for it."""

    role = Role.MIXING
    input_channel_dim = -1
    shape_attrs = ("nf", "nx")

    def expected_shapes(self, m: Any) -> dict[str, tuple[int | None, ...]]:
        return {"weight": (m.nx, m.nf), "bias": (m.nf,)}

    def out_rows_zero(self, m: Any, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 1, idx)

    def in_cols_zero(self, m: Any, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 0, idx)

    def can_fold(self, m: Any) -> bool:
        return True

    def fold_delta(self, m: Any, idx: Index, k: torch.Tensor) -> torch.Tensor:
        w: torch.Tensor = m.weight.detach()
        return (w[idx, :] * k.to(w)[:, None]).sum(0)

    def merge_into(self, m: Any, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        with torch.no_grad():
            m.weight[carrier, :] += (m.weight[idx, :] * ratio.to(m.weight)[:, None]).sum(0)

    def out_channels(self, m: Any) -> int:
        return int(m.nf)

    def in_channels(self, m: Any) -> int:
        return int(m.nx)

    def probe_inputs(self, m: Any) -> list[torch.Tensor]:
        return [torch.randn(2, m.nx, generator=torch.Generator().manual_seed(0)).to(m.weight)]

    def channel_params(self, m: Any, side: Side) -> dict[str, int]:
        return {"weight": 1, "bias": 0} if side is Side.OUT else {"weight": 0}

    def shrink(self, m: Any, keep_out: Index | None, keep_in: Index | None) -> Any:
        weight = must_take(must_take(m.weight, 1, keep_out), 0, keep_in)
        new = new_like(m, weight=weight, bias=take(m.bias, 0, keep_out))
        new.nf = len(keep_out) if keep_out is not None else m.nf
        new.nx = len(keep_in) if keep_in is not None else m.nx
        return new


@register(nn.Embedding)
class EmbeddingShrinker(Shrinker[nn.Embedding]):
    """Embedding produces channels only (weight: [num_embeddings, dim]); a zero column emits 0."""

    role = Role.MIXING
    output_channel_dim = -1  # [..., embedding_dim]
    shape_attrs = ("num_embeddings", "embedding_dim")

    def expected_shapes(self, m: nn.Embedding) -> dict[str, tuple[int | None, ...]]:
        return {"weight": (m.num_embeddings, m.embedding_dim)}

    def out_rows_zero(self, m: nn.Embedding, idx: Index) -> torch.Tensor:
        return zero_along(m.weight, 1, idx)

    def in_cols_zero(self, m: nn.Embedding, idx: Index) -> torch.Tensor:
        return torch.zeros(len(idx), dtype=torch.bool)

    def fold_delta(self, m: nn.Embedding, idx: Index, k: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an embedding has no input channels")

    def merge_into(self, m: nn.Embedding, carrier: int, idx: Index, ratio: torch.Tensor) -> None:
        raise NotImplementedError("an embedding has no input channels")

    def out_channels(self, m: nn.Embedding) -> int:
        return m.embedding_dim

    def in_channels(self, m: nn.Embedding) -> None:
        return None  # token ids, not channels

    def channel_params(self, m: nn.Embedding, side: Side) -> dict[str, int]:
        return {"weight": 1} if side is Side.OUT else {}

    def shrink(self, m: nn.Embedding, keep_out: Index | None, keep_in: Index | None) -> nn.Embedding:
        new = new_like(m, weight=must_take(m.weight, 1, keep_out))
        new.embedding_dim = len(keep_out) if keep_out is not None else m.embedding_dim
        return new
