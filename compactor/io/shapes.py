"""Exports that run at any batch size: dynamic dimensions for ``torch.export`` and the ONNX exporter.

By default the batch dimension (dim 0) of every input is dynamic, and so is the sequence length (dim 1) of
integer inputs of two or more dimensions (token ids, attention masks). torch specializes a dimension whose
example size is 1, so a batch of one is traced as a batch of two. A dimension the model's code fixes (a
``view(1, -1)``) stays static: the export says so, and the check runs where it is dynamic only.

The exported program returns plain tensors, tuples and dicts (a Hugging Face ``ModelOutput`` becomes a
dict of its fields), so that loading it needs nothing but torch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.export import Dim

from ..inputs import ExampleInputs


@dataclass
class ExportShapes:
    """What an export was asked for and what it gave: which dimensions stayed dynamic, what it returns."""

    static: bool  # --static-shapes: every dimension as in the example
    asked: dict[str, tuple[int, ...]]  # input -> dims asked to be dynamic
    fixed: dict[str, tuple[int, ...]]  # input -> asked dims that stayed static (the model's code fixes them)
    sizes: dict[str, tuple[int, ...]]  # input -> the example's shape
    outputs: str = "tensor"  # what the exported program returns: tensor, tuple or dict
    fallback: str | None = None  # why a dynamic export failed and a static one was written instead

    @property
    def dynamic(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(d for d in dims if d not in self.fixed.get(k, ())) for k, dims in self.asked.items()}

    def notes(self) -> list[str]:
        """One line per dimension that had to stay static, for stderr and the report."""
        if self.fallback is not None:
            return [f"the dynamic-shape export failed ({self.fallback}): exported at the example's shapes"]
        return [
            f"{name} dim {d} is fixed by the model's code: exported static at {self.sizes[name][d]}"
            for name, dims in self.fixed.items()
            for d in dims
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "static_shapes": self.static,
            "dynamic": {k: list(v) for k, v in self.dynamic.items() if v},
            "fixed_by_model": {k: list(v) for k, v in self.fixed.items() if v},
            "outputs": self.outputs,
            "notes": self.notes(),
        }


def input_names(example: ExampleInputs) -> list[str]:
    """The exported program's parameter names: ``input_0``... for positional inputs, then the keywords."""
    return [f"input_{i}" for i in range(len(example.args))] + list(example.kwargs)


def asked_dims(example: ExampleInputs, static: bool) -> dict[str, tuple[int, ...]]:
    """Per input: the batch dimension, and the sequence dimension of integer inputs (none if ``static``)."""
    asked = {}
    for name, t in zip(input_names(example), [*example.args, *example.kwargs.values()]):
        dims: tuple[int, ...] = ()
        if not static and t.dim() >= 1:
            dims = (0, 1) if t.dim() >= 2 and not (t.is_floating_point() or t.is_complex()) else (0,)
        asked[name] = dims
    return asked


def trace_inputs(example: ExampleInputs, asked: dict[str, tuple[int, ...]]) -> ExampleInputs:
    """The inputs to trace: a batch of one as a batch of two (torch would specialize a size of 1)."""
    if any(asked.values()) and all(
        t.dim() >= 1 and t.shape[0] == 1 for t in [*example.args, *example.kwargs.values()]
    ):
        return example.repeated(2)
    return example


def export_spec(example: ExampleInputs, asked: dict[str, tuple[int, ...]]) -> dict[str, Any] | None:
    """``dynamic_shapes`` for ``torch.export`` of :func:`plain_outputs`'s wrapper, keyed by parameter name."""
    if not any(asked.values()):
        return None
    return {name: ({d: Dim.AUTO for d in asked[name]} or None) for name in input_names(example)}


def fixed_dims(
    program: Any, example: ExampleInputs, asked: dict[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    """The asked dimensions that the exported ``program`` left static (the model's code fixes them)."""
    shapes = [
        n.meta["val"].shape
        for n in program.graph.nodes
        if n.op == "placeholder" and n.name in _user_inputs(program)
    ]
    fixed = {}
    for name, shape in zip(input_names(example), shapes):
        fixed[name] = tuple(d for d in asked[name] if d < len(shape) and isinstance(shape[d], int))
    return fixed


def _user_inputs(program: Any) -> set[str]:
    return set(program.graph_signature.user_inputs)


def second_inputs(
    example: ExampleInputs, dynamic: dict[str, tuple[int, ...]], generator: torch.Generator
) -> ExampleInputs | None:
    """Inputs at another batch size (and sequence length) than the example, where those are dynamic; None
    when nothing is. Values are drawn like the example's (integers in its range)."""
    if not any(dynamic.values()):
        return None
    fresh = example.fresh(generator)

    def resize(name: str, t: torch.Tensor) -> torch.Tensor:
        for d in dynamic.get(name, ()):
            n = t.shape[d]
            target = n + 1 if d == 0 else (n - 1 if n > 2 else n + 1)
            t = _resize(t, d, target)
        return t

    names = input_names(example)
    return ExampleInputs(
        args=tuple(resize(n, t) for n, t in zip(names, fresh.args)),
        kwargs={k: resize(k, v) for k, v in fresh.kwargs.items()},
    )


def _resize(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    if size <= t.shape[dim]:
        return t.narrow(dim, 0, size).clone()
    reps = -(-size // t.shape[dim])
    return torch.cat([t] * reps, dim).narrow(dim, 0, size).clone()


_EXPORT_LOGGERS = (
    "torch.onnx",
    "onnxscript",
    "torch._export",
    "torch.export",
    "torch._subclasses.fake_tensor",
    "torch.fx.experimental.symbolic_shapes",
    "torch._dynamo",
)


@contextlib.contextmanager
def quiet_loggers() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _EXPORT_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


# --- plain outputs ---------------------------------------------------------------------------------------
class PlainOutputs(nn.Module):
    """``model`` returning only tensors, plain values, tuples and dicts: a ``ModelOutput`` becomes a dict of
    its fields, other objects (a key/value cache) are left out. What an exported program can return without
    its classes registered. Build it with :func:`plain_outputs`, which names its parameters after the inputs."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return plain(self.model(*args, **kwargs))


def plain_outputs(model: nn.Module, example: ExampleInputs) -> PlainOutputs:
    """A :class:`PlainOutputs` of ``model`` whose ``forward`` signature names the example's inputs
    (``input_0``..., then the keywords): torch.export keys dynamic shapes, and the exported program its
    parameters, by these names."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [inspect.Parameter("self", kind)]
    parameters += [inspect.Parameter(f"input_{i}", kind) for i in range(len(example.args))]
    parameters += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in example.kwargs]

    def forward(self: PlainOutputs, *args: Any, **kwargs: Any) -> Any:
        positional = [
            kwargs.pop(f"input_{i}") for i in range(len(args), len(example.args)) if f"input_{i}" in kwargs
        ]
        return plain(self.model(*args, *positional, **kwargs))

    forward.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]  # read by inspect.signature
    named = type("PlainOutputs", (PlainOutputs,), {"forward": forward})
    wrapper: PlainOutputs = named(model)
    return wrapper.eval()


def plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, bool, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items() if _keeps(v)}
    if isinstance(value, (tuple, list)):
        return tuple(plain(v) for v in value if _keeps(v))
    return None


def _keeps(value: Any) -> bool:
    if isinstance(value, torch.Tensor) or value is None or isinstance(value, (int, float, bool, str)):
        return True
    if isinstance(value, Mapping):
        return any(_keeps(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return any(_keeps(v) for v in value)
    return False


def kind_of_outputs(container: type | None) -> str:
    """ "tensor", "tuple" or "dict": what an exported program returns (its output spec's container type;
    None for a single tensor), for the report."""
    return "dict" if container is dict else "tuple" if container in (tuple, list) else "tensor"
