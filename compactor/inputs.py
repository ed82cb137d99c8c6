"""Example inputs: normalise what users pass, call the model with it, draw fresh inputs like it."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from .errors import CompactorError, ExampleInputError, ModelForwardError, first_line


@dataclass(frozen=True)
class ExampleInputs:
    """Positional and keyword tensors for one forward call."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    guess: str | None = None  # how the inputs were guessed, when nobody gave them (infer_example_inputs)

    @classmethod
    def of(cls, value: Any) -> ExampleInputs:
        """Accept a tensor, a tuple/list of tensors (positional) or a dict of tensors (keywords)."""
        if isinstance(value, ExampleInputs):
            return value
        if isinstance(value, torch.Tensor):
            _check_not_empty(value)
            return cls(args=(value,))
        if isinstance(value, Mapping):
            _check_tensors(value.values(), "dict")
            return cls(kwargs={str(k): v for k, v in value.items()})
        if isinstance(value, Sequence) and not isinstance(value, str):
            _check_tensors(value, type(value).__name__)
            return cls(args=tuple(value))
        raise ExampleInputError(
            f"example inputs must be a tensor, a tuple/list of tensors or a dict of tensors, "
            f"found {type(value).__name__}; save one with torch.save(torch.randn(1, 3, 224, 224), 'x.pt')"
        )

    def to(self, device: torch.device) -> ExampleInputs:
        return ExampleInputs(
            args=tuple(t.to(device) for t in self.args),
            kwargs={k: v.to(device) for k, v in self.kwargs.items()},
            guess=self.guess,
        )

    def widened(self, dtype: torch.dtype = torch.float64) -> ExampleInputs:
        """The same inputs with every floating tensor in ``dtype`` (integers, token ids, stay as they are)."""
        return ExampleInputs(
            args=tuple(_as_float(t, dtype) for t in self.args),
            kwargs={k: _as_float(v, dtype) for k, v in self.kwargs.items()},
        )

    def fresh(self, generator: torch.Generator, *, integers: bool = True) -> ExampleInputs:
        """Random inputs of the same shapes and dtypes (integers stay in the example's range; with
        ``integers=False`` they stay the example's own: token ids whose layout the model checks)."""

        def like(t: torch.Tensor) -> torch.Tensor:
            keep = not integers and not (t.is_floating_point() or t.is_complex())
            return t.clone() if keep else _like(t, generator)

        return ExampleInputs(
            args=tuple(like(t) for t in self.args),
            kwargs={k: like(v) for k, v in self.kwargs.items()},
        )

    def resized(self, generator: torch.Generator) -> ExampleInputs | None:
        """Random inputs like :meth:`fresh` at another size: the spatial dimensions of float images and
        signals (rank 3: the last; rank 4 and 5: from the third on) and the sequence dimension of integer
        inputs of rank 2 (token ids, their masks) change by :func:`grown`. None where no dimension can."""

        def like(t: torch.Tensor) -> torch.Tensor:
            dims = _sized_dims(t)
            if not dims:
                return _like(t, generator)
            return _like(
                t, generator, torch.Size(grown(n) if d in dims else n for d, n in enumerate(t.shape))
            )

        tensors = [*self.args, *self.kwargs.values()]
        if not any(_sized_dims(t) for t in tensors):
            return None
        return ExampleInputs(
            args=tuple(like(t) for t in self.args),
            kwargs={k: like(v) for k, v in self.kwargs.items()},
        )

    def transformed(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ExampleInputs:
        """The same inputs with ``fn`` applied to every float tensor (integers, token ids, stay as they are)."""

        def apply(t: torch.Tensor) -> torch.Tensor:
            return fn(t) if t.is_floating_point() else t

        return ExampleInputs(
            args=tuple(apply(t) for t in self.args), kwargs={k: apply(v) for k, v in self.kwargs.items()}
        )

    def repeated(self, n: int) -> ExampleInputs:
        """The same inputs ``n`` times over along the first (batch) dimension."""
        return ExampleInputs(
            args=tuple(torch.cat([t] * n) for t in self.args),
            kwargs={k: torch.cat([v] * n) for k, v in self.kwargs.items()},
        )

    def check_finite(self) -> None:
        """Refuse NaN or Inf in float inputs: outputs computed from them cannot be compared."""
        named = [(f"input {i}", t) for i, t in enumerate(self.args)] + list(self.kwargs.items())
        for name, t in named:
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ExampleInputError(
                    f"example inputs: {name} {_describe(t)} holds {bad} NaN or Inf value(s); give finite inputs "
                    f"(compaction is verified by comparing outputs, and NaN never compares equal)"
                )

    def describe(self) -> str:
        parts = [_describe(t) for t in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        return ", ".join(parts)


def _check_tensors(values: Any, container: str) -> None:
    for v in values:
        if not isinstance(v, torch.Tensor):
            raise ExampleInputError(
                f"example inputs: every item of the {container} must be a tensor, found {type(v).__name__}"
            )
        _check_not_empty(v)


def _check_not_empty(t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise ExampleInputError(
            f"example inputs: a tensor of shape {tuple(t.shape)} holds no values, so nothing can be verified on "
            f"it; give at least one sample (a batch of 1 or more)"
        )


def _as_float(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)}:{str(t.dtype).removeprefix('torch.')}"


def _like(t: torch.Tensor, generator: torch.Generator, shape: torch.Size | None = None) -> torch.Tensor:
    """Random values like ``t``'s (its mean and spread; integers in its range) of ``shape`` (``t``'s)."""
    shape = t.shape if shape is None else shape
    same = shape == t.shape
    if t.dtype == torch.bool:
        if same:
            return t.clone()
        return (
            torch.full(shape, bool(t.flatten()[0]), device=t.device)
            if bool((t == t.flatten()[0]).all())
            else (torch.rand(shape, generator=generator) < 0.5).to(t.device)
        )
    if t.is_complex():
        return torch.complex(_like(t.real, generator, shape), _like(t.imag, generator, shape))
    if t.is_floating_point():
        scale = t.float().std().item() if t.numel() > 1 else 1.0
        scale = scale if scale > 0 else 1.0
        noise = torch.randn(shape, generator=generator, dtype=torch.float32) * scale
        return (noise + t.float().mean()).to(device=t.device, dtype=t.dtype)
    low, high = int(t.min().item()), int(t.max().item())
    if low == high:
        return t.clone() if same else torch.full(shape, low, dtype=t.dtype, device=t.device)
    top = (
        high + 1 if high < torch.iinfo(t.dtype).max else high
    )  # the bound is exclusive: never past the dtype
    return torch.randint(low, top, shape, generator=generator, dtype=t.dtype).to(t.device)


def _sized_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of ``t`` that :meth:`ExampleInputs.resized` grows: positions, not channels or batch."""
    if t.is_floating_point() and t.dim() in (4, 5):
        return tuple(range(2, t.dim()))
    if t.is_floating_point() and t.dim() == 3:
        return (2,)
    if not t.is_floating_point() and not t.is_complex() and t.dim() == 2:
        return (1,)
    return ()


def grown(n: int) -> int:
    """Another size for a dimension of ``n``: ``n`` plus or minus the largest power of two dividing it, at
    most 32, so that strides the example's size allows (a UNet's, a detector's) still fit. Large sizes
    shrink (224 -> 192: the extra run costs less than the example's), small ones grow (8 -> 16)."""
    step = min(n & -n, 32)
    return n - step if n > 64 else n + step


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` -> ``(1, 3, 224, 224)``."""
    try:
        dims = tuple(int(p) for p in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ExampleInputError(
            f"--input-shape {text!r} is not a shape; write positive integers separated by commas, e.g. 1,3,224,224"
        )
    return dims


def from_shape_specs(specs: Sequence[str]) -> ExampleInputs:
    """Random example inputs from ``--input-shape`` specs (``"1,3,224,224"``, ``"1,128:int64"``): floats from a
    normal distribution, integers in ``[0, 10)``, bools; seeded, so runs repeat. The one random-input builder
    (:func:`infer_example_inputs` uses it too)."""
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for spec in specs:
        shape_text, _, dtype_text = spec.partition(":")
        shape = parse_shape(shape_text)
        dtype = _spec_dtype(dtype_text or "float32")
        if math.prod(shape) * max(dtype.itemsize, 4) > 2**33:  # 8 GiB: more than any example needs
            raise ExampleInputError(
                f"--input-shape {spec}: {math.prod(shape):,} values is too large for an example input"
            )
        if dtype.is_floating_point or dtype.is_complex:
            tensors.append(torch.randn(shape, generator=generator).to(dtype))
        elif dtype == torch.bool:
            tensors.append(torch.randint(0, 2, shape, generator=generator).bool())
        else:
            tensors.append(torch.randint(0, 10, shape, generator=generator, dtype=dtype))
    return ExampleInputs(args=tuple(tensors))


def _spec_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.strip(), None)
    if not isinstance(dtype, torch.dtype):
        raise ExampleInputError(f"unknown dtype {name!r} in --input-shape; use e.g. float32, float16, int64")
    return dtype


def infer_example_inputs(model: nn.Module) -> ExampleInputs | None:
    """A float input for models whose first layer fixes the channels (Conv: 1xCx32x32, Linear: 1xF), with
    ``guess`` saying so; the spatial size is a guess that the caller must state."""
    for name, module in model.named_modules():
        shape: tuple[int, ...] | None = None
        if isinstance(module, nn.Conv2d):
            shape = (1, module.in_channels, 32, 32)
        elif isinstance(module, nn.Conv1d):
            shape = (1, module.in_channels, 64)
        elif isinstance(module, nn.Linear):
            shape = (1, module.in_features)
        if shape is not None:
            why = f"{name or 'the model'} ({type(module).__name__}) reads {shape[1]} channels"
            return replace(
                from_shape_specs([",".join(map(str, shape))]), guess=f"{','.join(map(str, shape))} ({why})"
            )
        if isinstance(
            module, (nn.Embedding, nn.LSTM, nn.GRU, nn.MultiheadAttention, nn.TransformerEncoderLayer)
        ):
            return None
    return None


def padded(runs: list[ExampleInputs]) -> list[ExampleInputs]:
    """``runs`` with the first one's ``attention_mask`` (a Hugging Face padding mask of all ones) padding the
    last position of its first sequence: transformers then builds the explicit mask, where on all ones it
    takes a fast path (SDPA's ``is_causal``), so verification covers both sides of that branch."""
    if not runs:
        return runs
    mask = runs[0].kwargs.get("attention_mask")
    if (
        not isinstance(mask, torch.Tensor)
        or mask.dim() != 2
        or mask.shape[1] < 2
        or mask.is_floating_point()
        or mask.is_complex()
        or not bool((mask == 1).all())
    ):
        return runs
    mask = mask.clone()
    mask[0, -1] = 0
    return [replace(runs[0], kwargs={**runs[0].kwargs, "attention_mask": mask}), *runs[1:]]


def run(model: nn.Module, inputs: ExampleInputs) -> Any:
    """Call ``model`` with the example inputs; wrap its failure in one clear line."""
    try:
        return model(*inputs.args, **inputs.kwargs)
    except CompactorError:  # compactor's own refusal from inside the forward (a write into a shared tensor)
        raise
    except Exception as e:  # the model's own code: any failure is the user's to see
        raise ModelForwardError(
            f"the model fails its own forward pass on inputs [{inputs.describe()}]"
            + (" (a guess: no example inputs were given)" if inputs.guess else "")
            + f": {type(e).__name__}: {first_line(e)}; check --input-shape/--example-inputs against what the model expects"
        ) from e


def flatten_outputs(output: Any, prefix: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in nested tuples, lists, dicts and Hugging Face ``ModelOutput``s, with a path name; a KV
    cache's tensors are left out (what a traced or exported graph returns: a cache is state, not output)."""
    return [
        (name, v) for name, v in flatten_values(output, prefix, caches=False) if isinstance(v, torch.Tensor)
    ]


Plain = int | float | bool | complex | str | bytes | None  # a non-tensor output compared by value


class CachePath(str):
    """The path name of a tensor inside a Hugging Face KV cache (``output.past_key_values.layers[0].keys``).

    Verification compares it as any output, except that where the compacted model lost attention heads its
    cache holds only the kept heads: :func:`compactor.engine.verify.compare_outputs` then matches it against
    the masked model's cache head by head."""


def _is_leaf(value: Any) -> bool:
    """A tensor or a plain value: what verification compares as one output."""
    return (
        isinstance(value, torch.Tensor)
        or value is None
        or isinstance(value, (int, float, complex, str, bytes))
    )


def is_hf_cache(value: Any) -> bool:
    """A transformers ``Cache`` (``DynamicCache``, ``EncoderDecoderCache``, ...), known by its class's bases so
    that transformers need not be imported here."""
    return any(
        c.__name__ == "Cache" and c.__module__ == "transformers.cache_utils" for c in type(value).__mro__
    )


_SUB_CACHES = ("self_attention_cache", "cross_attention_cache")  # EncoderDecoderCache
_OLD_LISTS = ("key_cache", "value_cache")  # transformers 4.x DynamicCache


def cache_tensors(cache: Any, prefix: str) -> list[tuple[str, torch.Tensor]] | None:
    """The tensors a transformers cache holds, each with a :class:`CachePath`; None for a cache whose layout
    is not known here (it is then reported as not compared). Per layer, every public tensor attribute
    (``keys``, ``values``, linear attention's ``conv_states``/``recurrent_states`` by index, ...) in name order."""
    subs = [name for name in _SUB_CACHES if is_hf_cache(getattr(cache, name, None))]
    if subs:
        found: list[tuple[str, torch.Tensor]] = []
        for name in subs:
            inner = cache_tensors(getattr(cache, name), f"{prefix}.{name}")
            if inner is None:
                return None
            found += inner
        return found
    layers = getattr(cache, "layers", None)
    if isinstance(layers, list):
        return [
            item for i, layer in enumerate(layers) for item in _layer_tensors(layer, f"{prefix}.layers[{i}]")
        ]
    lists = [v for v in (getattr(cache, name, None) for name in _OLD_LISTS) if isinstance(v, list)]
    if len(lists) == len(_OLD_LISTS):
        return [
            (CachePath(f"{prefix}.{name}[{i}]"), t)
            for name, values in zip(_OLD_LISTS, lists)
            for i, t in enumerate(values)
            if isinstance(t, torch.Tensor)
        ]
    return None


def _layer_tensors(layer: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    found: list[tuple[str, torch.Tensor]] = []
    for name, value in sorted(vars(layer).items()):
        if name.startswith("_"):
            continue
        if isinstance(value, torch.Tensor):
            found.append((CachePath(f"{prefix}.{name}"), value))
        elif isinstance(value, dict):
            found += [
                (CachePath(f"{prefix}.{name}[{k}]"), v)
                for k, v in value.items()
                if isinstance(v, torch.Tensor)
            ]
    return found


def flatten_values(
    output: Any, prefix: str = "output", *, caches: bool = True
) -> list[tuple[str, torch.Tensor | Plain]]:
    """:func:`flatten_outputs` with the plain values too (ints, floats, strings, None, ...) and the tensors of
    Hugging Face KV caches (``caches``; names are :class:`CachePath`): verification compares every leaf a
    model returns, not only its tensors. Other objects are left out."""
    if _is_leaf(output):
        return [(prefix, output)]
    if is_hf_cache(output):
        return [*(cache_tensors(output, prefix) or [])] if caches else []
    items: list[tuple[str, torch.Tensor | Plain]] = []
    if isinstance(output, Mapping):  # ModelOutput is an OrderedDict
        for k, v in output.items():
            items += flatten_values(v, f"{prefix}.{k}", caches=caches)
    elif isinstance(output, (tuple, list)):
        for i, v in enumerate(output):
            items += flatten_values(v, f"{prefix}[{i}]", caches=caches)
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        for f in dataclasses.fields(output):
            items += flatten_values(getattr(output, f.name), f"{prefix}.{f.name}", caches=caches)
    return items


def unchecked_outputs(output: Any, prefix: str = "output") -> list[str]:
    """The leaves of ``output`` that :func:`flatten_values` leaves out (objects that are neither tensors nor
    plain values, nor a cache whose tensors it knows): ``"output[1] (MambaCache)"``. Verification cannot
    compare them."""
    if _is_leaf(output) or (is_hf_cache(output) and cache_tensors(output, prefix) is not None):
        return []
    if isinstance(output, Mapping):
        return [u for k, v in output.items() for u in unchecked_outputs(v, f"{prefix}.{k}")]
    if isinstance(output, (tuple, list)):
        return [u for i, v in enumerate(output) for u in unchecked_outputs(v, f"{prefix}[{i}]")]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [
            u
            for f in dataclasses.fields(output)
            for u in unchecked_outputs(getattr(output, f.name), f"{prefix}.{f.name}")
        ]
    return [f"{prefix} ({type(output).__name__})"]
