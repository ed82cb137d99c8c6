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


Placed = dict[str, tuple[int, list[int]]]  # tensor -> (dimension, where each of its slices lands)


def padded_spec(
    spec: dict[str, Any], head_dims: dict[str, int] | None = None
) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], Placed]:
    """The manifest with every layer at its kind's width, the tensors whose shapes change, and those whose
    slices do not simply come first (:func:`_grouped`: query heads of grouped-query attention)."""
    widest = targets(spec)
    modules, placed = _grouped(spec, widest, head_dims or {})
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
    padded = {**spec, "layers": layers}
    if modules:
        padded["modules"] = modules
    return padded, shapes, placed


def _grouped(
    spec: dict[str, Any], widest: dict[str, tuple[int | None, int | None]], head_dims: dict[str, int]
) -> tuple[dict[str, Any], Placed]:
    """Head counts for padded blocks: every module's counts (``modules``: heads, query heads per key/value
    head) at the most its kind keeps in any block, so that each block reads all the heads it is padded to
    (added heads are zero rows of q/k/v and zero columns of the output projection: nothing). Padded heads
    come after the kept ones, except in grouped-query attention whose blocks kept different numbers of query
    heads per key/value group: there each group's query heads (rows of ``q_proj``, columns of ``o_proj``)
    move to the start of their group's slot, and ``widest`` is updated in place for ``q_proj`` and
    ``o_proj``. Returns the modules' counts and the moves."""
    counts = spec.get("modules", {})
    most: dict[str, dict[str, int]] = {}
    for name, attrs in counts.items():
        peak = most.setdefault(kind(name), {})
        for attr, value in attrs.items():
            peak[attr] = max(peak.get(attr, 0), value)
    even = {name: {attr: most[kind(name)][attr] for attr in attrs} for name, attrs in counts.items()}
    uneven = {
        kind(name)
        for name, attrs in counts.items()
        if attrs.get("num_key_value_groups", 0) != most[kind(name)].get("num_key_value_groups", 0)
    }
    placed: Placed = {}
    for name, attrs in counts.items():
        if kind(name) not in uneven:
            continue
        layers = {w: spec["layers"].get(f"{name}.{w}_proj") for w in "qko"}
        if any(v is None for v in layers.values()) or name not in head_dims:
            raise ExampleInputError(
                f"--uniform cannot even out the query heads of {name} (no q/k/o projections of a known head size "
                f"there); leave --uniform out (compactor.load reads uneven widths)"
            )
        hd, groups, target = (
            head_dims[name],
            attrs["num_key_value_groups"],
            most[kind(name)]["num_key_value_groups"],
        )
        units = widest[kind(f"{name}.k_proj")][0]
        assert units is not None
        width = units // hd * target * hd
        q, o = kind(f"{name}.q_proj"), kind(f"{name}.o_proj")
        widest[q] = (width, widest[q][1])
        widest[o] = (widest[o][0], width)
        if groups != target:
            own = layers["q"]["out"]
            at = [r // (groups * hd) * target * hd + r % (groups * hd) for r in range(own)]
            placed[f"{name}.q_proj.weight"] = (0, at)
            placed[f"{name}.q_proj.bias"] = (0, at)
            placed[f"{name}.o_proj.weight"] = (1, at)
    return even, placed


def pad(t: torch.Tensor, shape: tuple[int, ...], placed: tuple[int, list[int]] | None = None) -> torch.Tensor:
    """``t`` at the top-left of a zero tensor of ``shape``; along ``placed``'s dimension, its slices at the
    given positions instead."""
    if tuple(t.shape) == shape:
        return t
    out = torch.zeros(shape, dtype=t.dtype)
    if placed is None:
        out[tuple(slice(0, n) for n in t.shape)] = t
        return out
    dim, at = placed
    region = tuple(slice(None) if d == dim else slice(0, n) for d, n in enumerate(t.shape))
    out[region].index_copy_(dim, torch.tensor(at, dtype=torch.long), t)
    return out


def config_layout(model: nn.Module) -> tuple[Any | None, str]:
    """A config whose model has exactly ``model``'s shapes (on the meta device), or None and why not."""
    from ..io.hf import uniform_config

    config, why = uniform_config(model)
    if config is not None:
        config = copy.deepcopy(config)
        config.architectures = [type(model).__name__]
    return config, why


__all__ = ["Placed", "config_layout", "kind", "pad", "padded_spec", "targets"]
