"""Measure what compaction bought: multiply-accumulates and latency, dense and compacted side by side.

``count_macs`` counts the multiply-accumulates of one forward pass at the ATen level with
``torch.utils.flop_counter.FlopCounterMode`` (MACs = FLOPs / 2): convolutions with their groups, transposed
convolutions, every matmul (``Linear`` on N-d inputs, ``bmm``, ``einsum``) and scaled-dot-product attention.
Elementwise ops, normalisation and pooling are not counted, by the usual convention.

``latency`` times several models on the same inputs *interleaved* in one loop (A, B, A, B, ...), so that
machine noise (frequency scaling, another process) hits every model alike and the ratio stays honest.
``paired_gap`` compares two models of one such run round by round, and says how far its noise reaches.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..errors import CompactorError
from ..inputs import ExampleInputs
from ..modules import baked, clone_module
from ..util import eval_mode_restored

Backend = Literal["torch-cpu", "onnxruntime-cpu", "cuda"]
BACKENDS: tuple[Backend, ...] = ("torch-cpu", "onnxruntime-cpu", "cuda")


def _sdpa_flops(query_shape: Any, key_shape: Any, value_shape: Any, *_: Any, **__: Any) -> int:
    flops: int = sdpa_flop_count(query_shape, key_shape, value_shape)  # type: ignore[no-untyped-call]  # torch leaves it unannotated
    return flops


# On CPU, ``F.scaled_dot_product_attention`` decomposes (inside the counter) to the fused
# ``_scaled_dot_product_flash_attention_for_cpu``, which FlopCounterMode does not know (it knows the CUDA
# kernels) and would count as zero. The math fallback decomposes to bmm, which it counts already.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass of ``model`` on ``example_inputs`` (batch included).

    The pass runs in eval mode (then the mode is restored): in train mode BatchNorm would update its
    running statistics, and counting must not change the model. Parameters stop requiring grad during the
    pass (then get their flags back): the counter's module tracker hooks the autograd node of every tensor
    that requires grad passed between modules, and under ``no_grad`` or ``inference_mode`` a view of a
    parameter (PiT's and CaiT's ``cls_token.expand(...)``) requires grad yet has no node to hook
    ("'NoneType' object has no attribute 'next_functions'").
    """
    inputs = ExampleInputs.of(example_inputs)
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    with eval_mode_restored(model), _no_grad_params(model), counter, torch.no_grad():
        model(*inputs.args, **inputs.kwargs)
    total: int = counter.get_total_flops()
    return total // 2


@contextlib.contextmanager
def _no_grad_params(model: nn.Module) -> Iterator[None]:
    """Every parameter of ``model`` with ``requires_grad=False`` inside, its own flag back after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


@dataclass(frozen=True)
class Timing:
    """Latency of one model over ``n`` timed calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    n: int
    rounds_ms: tuple[float, ...] = ()  # one call per round, in round order: what :func:`paired_gap` pairs

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def latency(
    models: dict[str, nn.Module | str | Path],
    inputs: Any,
    *,
    backend: Backend = "torch-cpu",
    threads: int | None = None,
    warmup: int = 5,
    repeats: int = 30,
) -> dict[str, Timing]:
    """Time every model in ``models`` on ``inputs``, interleaved, and return one :class:`Timing` per name.

    ``threads``: intra-op threads (``torch.set_num_threads`` / ONNX Runtime ``intra_op_num_threads``);
    ``None`` keeps torch's current setting. Each round calls every model once, in an order that rotates
    each round so no model always runs first. ``backend="cuda"`` synchronises around every call and is
    refused without a GPU; ``"onnxruntime-cpu"`` exports each model to ONNX first, unless its value in
    ``models`` is already the path of an exported ``.onnx`` file.
    """
    if not models:
        raise ValueError("latency: pass at least one model")
    if warmup < 0 or repeats < 1:
        raise ValueError(
            f"latency: need warmup >= 0 and repeats >= 1, found warmup={warmup}, repeats={repeats}"
        )
    example = ExampleInputs.of(inputs)
    threads = threads or torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        for model in models.values():  # timing puts models in eval mode: give each back its own flags
            if isinstance(model, nn.Module):
                stack.enter_context(eval_mode_restored(model, eval=False))
        runners = stack.enter_context(_runners(models, example, backend, threads))
        names = list(runners)
        for _ in range(warmup):
            for name in names:
                runners[name]()
        samples: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                samples[name].append(runners[name]())
    return {name: _summarise(s) for name, s in samples.items()}


def _summarise(seconds: list[float]) -> Timing:
    rounds = tuple(s * 1000 for s in seconds)
    ms = sorted(rounds)
    return Timing(statistics.median(ms), _quantile(ms, 0.1), _quantile(ms, 0.9), len(ms), rounds)


@dataclass(frozen=True)
class Gap:
    """How much slower one model ran than another in the same interleaved run: ``slower`` is the median
    over rounds of their ratio, less one (``0.01``: 1% slower; negative: faster), ``se`` the standard error
    of that median, from the rounds' spread, over ``n`` rounds."""

    slower: float
    se: float
    n: int

    @property
    def noise(self) -> float:
        """Two standard errors: a gap within it is not told apart from two identical models'."""
        return 2 * self.se

    def __str__(self) -> str:
        return f"{self.slower:+.1%} (noise ±{self.noise:.1%}, {self.n} rounds)"


def paired_gap(a: Sequence[float], b: Sequence[float]) -> Gap:
    """``a`` against ``b``: their times of the same rounds of one interleaved run (``Timing.rounds_ms``), in
    round order. Pairing by round cancels what drifts over the run (another process, the clock); the
    median of the per-round log-ratios ignores the rounds one of them was interrupted; its standard
    error is 1.2533 sigma / sqrt(n), with sigma estimated robustly from the interquartile range."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_gap: need two equally long, non-empty runs, found {len(a)} and {len(b)}")
    logs = sorted(math.log(x / y) for x, y in zip(a, b))
    sigma = (_quantile(logs, 0.75) - _quantile(logs, 0.25)) / 1.349
    return Gap(math.expm1(statistics.median(logs)), 1.2533 * sigma / math.sqrt(len(logs)), len(logs))


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of an already sorted list."""
    position = q * (len(sorted_values) - 1)
    low = int(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def bench(
    model: nn.Module,
    compacted: nn.Module,
    inputs: Any,
    *,
    backends: tuple[Backend, ...] = ("torch-cpu",),
    threads: int | None = 1,
    warmup: int = 5,
    repeats: int = 30,
) -> dict[str, Any]:
    """MACs and latency of ``model`` (the dense baseline) against ``compacted``, shaped for
    :meth:`CompactionReport.with_extra`: ``report.with_extra(**bench(model, small, inputs))``.

    ``model`` may still carry pruning masks: a clone with the masks baked in is timed (the hooks would
    add a multiply per layer that is no part of the dense model's cost). A backend that cannot run here
    (``"cuda"`` without a GPU) is left out of ``latency_ms`` and named under ``not_measured``.
    """
    dense = baked(model, copy=False)
    example = ExampleInputs.of(inputs)
    extra: dict[str, Any] = {
        "macs": {"before": count_macs(dense, example), "after": count_macs(compacted, example)}
    }
    timed: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    for backend in backends:
        if backend == "cuda" and not torch.cuda.is_available():
            skipped[backend] = "no GPU (torch.cuda.is_available() is False)"
            continue
        t = latency(
            {"before": dense, "after": compacted},
            example,
            backend=backend,
            threads=threads,
            warmup=warmup,
            repeats=repeats,
        )
        timed[backend] = {"before": t["before"].median_ms, "after": t["after"].median_ms}
    extra["latency_ms"] = timed
    if skipped:
        extra["not_measured"] = skipped
    return extra


Runner = Callable[[], float]  # one forward pass; returns its duration in seconds


@contextlib.contextmanager
def _runners(
    models: dict[str, nn.Module | str | Path], inputs: ExampleInputs, backend: str, threads: int
) -> Iterator[dict[str, Runner]]:
    if backend == "torch-cpu":
        with _torch_threads(threads), torch.inference_mode():
            yield {
                name: _torch_runner(_module(model).eval(), inputs, cuda=False)
                for name, model in models.items()
            }
    elif backend == "cuda":
        if not torch.cuda.is_available():
            raise CompactorError("latency: backend 'cuda' needs a GPU and torch.cuda.is_available() is False")
        device = torch.device("cuda")
        on_gpu = inputs.to(device)
        with torch.inference_mode():
            yield {
                name: _torch_runner(_on(_module(model), device), on_gpu, cuda=True)
                for name, model in models.items()
            }
    elif backend == "onnxruntime-cpu":
        from ..io.onnx import (
            export_onnx,
            ort_session,
        )  # onnx and onnxruntime are imported only when asked for

        with tempfile.TemporaryDirectory(prefix="compactor-latency-") as tmp:
            runners = {}
            for i, (name, model) in enumerate(models.items()):
                if isinstance(model, nn.Module):
                    path = Path(tmp) / f"model{i}.onnx"
                    export_onnx(model, inputs, path)
                else:
                    path = Path(model)
                runners[name] = _ort_runner(ort_session(path, threads=threads), inputs)
            yield runners
    else:
        raise ValueError(f"latency: unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _torch_runner(model: nn.Module, inputs: ExampleInputs, *, cuda: bool) -> Runner:
    args, kwargs = inputs.args, inputs.kwargs

    def call() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()  # kernels are asynchronous: time until they finish
        return time.perf_counter() - start

    return call


def _ort_runner(session: Any, inputs: ExampleInputs) -> Runner:
    from ..io.onnx import ort_feed

    feed = ort_feed(session, inputs)

    def call() -> float:
        start = time.perf_counter()
        session.run(None, feed)
        return time.perf_counter() - start

    return call


def _module(model: nn.Module | str | Path) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise ValueError(f"latency: {model!s} is a file; only backend 'onnxruntime-cpu' times exported files")
    return model


def _on(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` on ``device``: the model itself if it is already there, a moved copy otherwise."""
    if all(p.device == device for p in model.parameters()):
        return model.eval()
    return clone_module(model).to(device).eval()


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
