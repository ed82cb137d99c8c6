"""What each decoder block is called with, captured from the model's own forward, and the logits at the end.

The model's forward computes, before its loop over the blocks, everything a block reads besides the hidden
states (rotary cos/sin, causal and sliding-window masks, position ids, an embedding scale). :func:`capture`
runs that forward with every block replaced by a :class:`_Recorder` that keeps its arguments and hands the
hidden states on unchanged; only the parts outside the blocks need their weights. The hidden states the
first block receives are the stream's start. A model that changes the hidden states between blocks (the
tensor a block receives is not the one the block before returned) cannot be streamed and is refused.

:func:`logits` runs the model's forward once more with the blocks replaced (the last returns the given
final hidden states) and the input embedding answering zeros: the model's own final norm, head and logit
soft-capping then give the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import BlocksCaptured, ModelStructureError
from ..io.skeleton import module_name


@dataclass(frozen=True)
class BlockCall:
    """The arguments one block is called with, besides the hidden states (the first argument)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class _Recorder(nn.Module):
    def __init__(self, index: int, calls: dict[int, BlockCall], passed: list[Any], last: bool) -> None:
        super().__init__()
        self.index, self.calls, self.passed, self.last = index, calls, passed, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index and hidden is not self.passed[-1]:
            raise ModelStructureError(
                f"block {self.index} receives other hidden states than block {self.index - 1} returned (the "
                f"model's forward changes them between blocks); such a model cannot be streamed block by "
                f"block: load it with compactor.load and compact the model"
            )
        self.passed.append(hidden)
        self.calls[self.index] = BlockCall(tuple(args[1:]), dict(kwargs))
        if self.last:
            raise BlocksCaptured
        return hidden


class Block(nn.Module):
    """One decoder block as a module of the hidden states alone: what compaction runs on and verifies."""

    def __init__(self, block: nn.Module, call: BlockCall) -> None:
        super().__init__()
        self.block = block
        self.call = call

    def forward(self, hidden_states: torch.Tensor) -> Any:
        return self.block(hidden_states, *self.call.args, **self.call.kwargs)


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states a block returns (a tensor, or the first item of a tuple)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def capture(
    model: nn.Module, blocks: nn.ModuleList, inputs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, list[BlockCall]]:
    """The first block's hidden states and every block's other arguments, for one batch of inputs."""
    calls: dict[int, BlockCall] = {}
    passed: list[Any] = []
    real = list(blocks)
    n = len(real)
    for i in range(n):
        blocks[i] = _Recorder(i, calls, passed, i == n - 1)
    try:
        with torch.no_grad():
            model(**inputs, use_cache=False)
    except BlocksCaptured:
        pass
    finally:
        for i, b in enumerate(real):
            blocks[i] = b
    if len(calls) != n:
        raise ModelStructureError(
            f"the model's forward called {len(calls)} of its {n} blocks; a model that skips blocks cannot be "
            f"streamed: load it with compactor.load and compact the model"
        )
    return passed[0], [calls[i] for i in range(n)]


class _Pass(nn.Module):
    def __init__(self, final: torch.Tensor | None) -> None:
        super().__init__()
        self.final = final

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.final if self.final is not None else (args[0] if args else kwargs["hidden_states"])


class _Zeros(nn.Module):
    def __init__(self, width: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.width, self.dtype = width, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.width, dtype=self.dtype)


def logits(
    model: Any, blocks: nn.ModuleList, inputs: dict[str, torch.Tensor], final: torch.Tensor
) -> torch.Tensor:
    """The model's logits when its blocks leave ``final`` as the last hidden states."""
    real = list(blocks)
    embeddings = model.get_input_embeddings()
    parent, _, attr = module_name(model, embeddings).rpartition(".")
    holder = model.get_submodule(parent) if parent else model
    setattr(holder, attr, _Zeros(final.shape[-1], final.dtype))
    for i in range(len(real)):
        blocks[i] = _Pass(final if i == len(real) - 1 else None)
    try:
        with torch.no_grad():
            out = model(**inputs, use_cache=False)
    finally:
        setattr(holder, attr, embeddings)
        for i, b in enumerate(real):
            blocks[i] = b
    result: torch.Tensor = out.logits if hasattr(out, "logits") else hidden_of(out)
    return result


__all__ = ["Block", "BlockCall", "capture", "hidden_of", "logits"]
