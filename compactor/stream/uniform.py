"""``--uniform`` for a streamed checkpoint, and the config that states the widths where one can.

Blocks are compacted one at a time, so their widths differ. :func:`targets` gives every layer of a kind (its
name but for the block number) the largest width any block kept; :func:`pad` gives a smaller Linear the
missing channels as zeros (rows of the producer, columns of the consumer: they add exactly nothing) and
each padded block is checked again on the hidden states it was verified on. :func:`config_layout` then asks
whether the config can state the shapes (``intermediate_size`` and the like, found by building on the meta
device): if so the directory loads with stock ``from_pretrained``; if not, it keeps compactor's manifest.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch
from torch import nn

from ..errors import ExampleInputError

_BLOCK = re.compile(r"\.\d+\.")


def kind(name: str) -> str:
    """A layer's name with its block number left out: what ``--uniform`` evens out."""
    return _BLOCK.sub(".*.", name, count=1)


def targets(spec: dict[str, Any]) -> dict[str, tuple[int | None, int | None]]:
    """The widest (out, in) of every kind of layer across the blocks."""
    widest: dict[str, tuple[int | None, int | None]] = {}
    for name, entry in spec["layers"].items():
        k = kind(name)
        old = widest.get(k, (entry["out"], entry["in"]))
        widest[k] = (_max(old[0], entry["out"]), _max(old[1], entry["in"]))
    return widest


def _max(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else max(a, b)


def padded_spec(spec: dict[str, Any]) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """The manifest with every layer at its kind's width, and the tensors whose shapes change."""
    widest = targets(spec)
    layers: dict[str, Any] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in spec["layers"].items():
        out, in_ = widest[kind(name)]
        if (out, in_) == (entry["out"], entry["in"]):
            layers[name] = entry
            continue
        if entry["type"] != "Linear":
            raise ExampleInputError(
                f"--uniform pads Linear layers only; {name} is {entry['type']} and narrower than in another "
                f"block: leave --uniform out (compactor.load reads uneven widths)"
            )
        assert out is not None and in_ is not None
        attrs = {
            **entry["attrs"],
            **{k: v for k, v in (("out_features", out), ("in_features", in_)) if k in entry["attrs"]},
        }
        layers[name] = {
            **entry,
            "out": out,
            "in": in_,
            "bias": None if entry["bias"] is None else [out],
            "attrs": attrs,
        }
        shapes[f"{name}.weight"] = (out, in_)
        if entry["bias"] is not None:
            shapes[f"{name}.bias"] = (out,)
    for name, shape in spec["tensors"].items():
        peers = [s for n, s in spec["tensors"].items() if kind(n) == kind(name)]
        if any(s != shape for s in peers):
            raise ExampleInputError(
                f"--uniform cannot even out {name} (shape {shape}, another block's {next(s for s in peers if s != shape)}); "
                f"leave --uniform out (compactor.load reads uneven widths)"
            )
    return {**spec, "layers": layers}, shapes


def pad(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """``t`` at the top-left of a zero tensor of ``shape``."""
    if tuple(t.shape) == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def config_layout(model: nn.Module) -> tuple[Any | None, str]:
    """A config whose model has exactly ``model``'s shapes (on the meta device), or None and why not."""
    from ..io.hf import uniform_config

    config, why = uniform_config(model)
    if config is not None:
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
    return config, why


__all__ = ["config_layout", "kind", "pad", "padded_spec", "targets"]
