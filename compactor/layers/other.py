"""Per-channel parameters (PReLU, a bare LayerScale parameter) and the sequence layers kept whole."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Index, Role, Shrinker, Side, must_take, new_like, register


@register(nn.PReLU)
class PReLUShrinker(Shrinker[nn.PReLU]):
    role = Role.CHANNELWISE
    shape_attrs = ("num_parameters",)

    def out_channels(self, m: nn.PReLU) -> int | None:
        return m.num_parameters if m.num_parameters > 1 else None

    def in_channels(self, m: nn.PReLU) -> int | None:
        return self.out_channels(m)

    def channel_params(self, m: nn.PReLU, side: Side) -> dict[str, int]:
        return {"weight": 0} if m.num_parameters > 1 else {}

    def shrink(self, m: nn.PReLU, keep_out: Index | None, keep_in: Index | None) -> nn.PReLU:
        if m.num_parameters == 1:
            return m
        keep = keep_out if keep_out is not None else keep_in
        new = new_like(m, weight=must_take(m.weight, 0, keep))
        new.num_parameters = len(keep) if keep is not None else m.num_parameters
        return new


@register(nn.Parameter)
class ParameterShrinker(Shrinker[Any]):
    """A bare parameter multiplied into a channel stream (LayerScale): channelwise along its pruning dim.

    Its width and its smaller copy depend on the dimension Torch-Pruning found the channels on, so the
    coupling stage measures it and the rebuild stage slices it (``rebuild._replace_parameter``)."""

    role = Role.CHANNELWISE

    def out_channels(self, m: Any) -> None:
        return None

    def in_channels(self, m: Any) -> None:
        return None

    def shrink(self, m: Any, keep_out: Index | None, keep_in: Index | None) -> Any:
        raise NotImplementedError(
            "a bare parameter is sliced along its pruning dimension by the rebuild stage"
        )


@register(nn.MultiheadAttention, nn.LSTM, nn.GRU, nn.RNN)
class SequenceShrinker(Shrinker[nn.Module]):
    role = Role.BLOCKING
    blocking_reason = "attention and recurrent layers are not compacted yet"

    def out_channels(self, m: nn.Module) -> None:
        return None

    def in_channels(self, m: nn.Module) -> None:
        return None
