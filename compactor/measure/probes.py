"""Time single layers in isolation on a backend, at the widths a plan would give them.

A *probe* is one layer rebuilt at given input and output widths (by its shrinker, so every registered layer
type works) with the input shape it really sees in the model (recorded with forward hooks on the example
inputs, the channel dimension set to the probe's input width). ``--round-to auto`` times a group's layers at
each candidate width; the report's "why not faster" section times each rebuilt layer dense and compacted.

A :class:`Timer` turns probes into seconds and times whole models: :class:`BackendTimer` measures on
``torch-cpu``, ``onnxruntime-cpu`` (each probe exported with the TorchScript exporter, which takes tens of
milliseconds, not seconds) or ``cuda``; tests inject their own. Probes of identical layers on identical
shapes (the repeated blocks of a ResNet stage) are timed once and the timing is reused.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ..inputs import ExampleInputs
from ..layers import Role, Side, shrinker_for
from .timing import Backend, latency


@dataclass(frozen=True)
class Probe:
    """``layer`` rebuilt as ``module`` (widths ``in_width`` → ``out_width``), run on a tensor of ``shape``
    ``calls`` times per forward of the model."""

    layer: str
    module: nn.Module = field(repr=False, compare=False)
    shape: tuple[int, ...]
    dtype: torch.dtype
    in_width: int | None
    out_width: int | None
    calls: int = 1

    @property
    def key(self) -> tuple[str, str, tuple[int, ...], str]:
        """Identical layers on identical inputs share one timing."""
        return type(self.module).__name__, repr(self.module), self.shape, str(self.dtype)


@dataclass(frozen=True)
class Seen:
    """What a layer was called with during the example forward: its first input's shape, and how often."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    calls: int


def timed_kind(module: Any) -> bool:
    """Layers worth timing: mixing layers (conv, linear) and channelwise ones that hold more than a scale per
    channel (a depthwise conv). A BatchNorm's cost hardly depends on its width, and backends fold it away."""
    shrinker = shrinker_for(module)
    if shrinker is None or not isinstance(module, nn.Module):
        return False
    role = shrinker.role_of(module)
    if role is Role.MIXING:
        return True
    return role is Role.CHANNELWISE and any(p.dim() > 1 for p in module.parameters(recurse=False))


def record_inputs(model: nn.Module, inputs: ExampleInputs, names: set[str]) -> dict[str, Seen]:
    """Per named layer: the shape of the first tensor it was called with on ``inputs``, and the call count."""
    seen: dict[str, Seen] = {}
    handles = []
    modules = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple[Any, ...]) -> None:
            first = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if first is None:
                return
            old = seen.get(name)
            seen[name] = Seen(
                old.shape if old else tuple(first.shape), first.dtype, (old.calls if old else 0) + 1
            )

        return record

    for name in sorted(names):
        if name in modules:
            handles.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            model(*inputs.args, **inputs.kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def rebuilt(module: nn.Module, in_width: int | None, out_width: int | None) -> nn.Module:
    """A copy of ``module`` at ``in_width`` → ``out_width`` (None: as it is), built by its shrinker; a
    channelwise layer takes ``out_width`` (or ``in_width``) for both."""
    shrinker = shrinker_for(module)
    assert shrinker is not None, f"{type(module).__name__}: no shrinker"
    if shrinker.role_of(module) is Role.CHANNELWISE:
        keep_out, keep_in = (
            _keep(shrinker, module, Side.OUT, out_width if out_width is not None else in_width),
            None,
        )
    else:
        keep_out, keep_in = (
            _keep(shrinker, module, Side.OUT, out_width),
            _keep(shrinker, module, Side.IN, in_width),
        )
    if keep_out is None and keep_in is None:
        return copy.deepcopy(module)
    new: nn.Module = shrinker.shrink(module, keep_out, keep_in)
    return new


def probe(name: str, module: nn.Module, seen: Seen, in_width: int | None, out_width: int | None) -> Probe:
    """``module`` rebuilt at ``in_width`` → ``out_width`` (:func:`rebuilt`), with the input shape it saw
    (its channel dimension at the new input width)."""
    new = rebuilt(module, in_width, out_width).eval()
    shrinker = shrinker_for(new)
    assert shrinker is not None
    shape = list(seen.shape)
    width = shrinker.in_channels(new)
    if width is not None and shape:
        shape[shrinker.input_channel_dim] = width
    return Probe(name, new, tuple(shape), seen.dtype, width, shrinker.out_channels(new), seen.calls)


def _keep(shrinker: Any, module: Any, side: Side, n: int | None) -> torch.Tensor | None:
    now = shrinker.out_channels(module) if side is Side.OUT else shrinker.in_channels(module)
    if n is None or now is None or n == now:
        return None
    keep: torch.Tensor = shrinker.layout(module, side, n)
    return keep


class Timer(Protocol):
    """On one backend (``target``): seconds per call of each probe; and of each whole model, one forward
    per round of an interleaved run, in round order (the lists pair round by round: ``paired_gap``)."""

    target: str

    def layers(self, probes: Sequence[Probe]) -> list[float]: ...

    def models(self, models: dict[str, nn.Module], inputs: ExampleInputs) -> dict[str, list[float]]: ...


def rounds_of(timed: dict[str, Any]) -> dict[str, list[float]]:
    """A :meth:`Timer.models` answer as seconds per round; a single number per model (what a timer written
    before rounds were kept returns) is one round."""
    return {n: [float(v)] if isinstance(v, (int, float)) else [float(x) for x in v] for n, v in timed.items()}


def _give_back_memory() -> None:
    """``malloc_trim`` where glibc has it: freed memory of ONNX Runtime's sessions (hundreds of MiB for a
    large model) otherwise stays resident for the rest of the run."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    if trim is not None:
        trim(0)


WHOLE_REPEATS = 20  # interleaved rounds per whole-model run (identical models' medians differ by ~1% over 20)


class BackendTimer:
    """Times probes interleaved (every probe once per round, the order rotating), the fastest of ``repeats``
    calls (another process on the machine only ever adds time: the minimum is the layer's own cost); a probe
    whose layer and shape were timed before is not timed again. ``threads``: intra-op threads. Whole models
    get every round of interleaved calls, as ``--bench`` times them."""

    def __init__(
        self, target: Backend = "torch-cpu", *, threads: int = 1, warmup: int = 1, repeats: int = 5
    ) -> None:
        if target == "cuda" and not torch.cuda.is_available():
            raise ValueError("target 'cuda' needs a GPU and torch.cuda.is_available() is False")
        self.target: str = target
        self.threads = threads
        self.warmup = warmup
        self.repeats = repeats
        self._cache: dict[tuple[str, str, tuple[int, ...], str], float] = {}

    def layers(self, probes: Sequence[Probe]) -> list[float]:
        todo = {p.key: p for p in probes if p.key not in self._cache}
        if todo:
            with self._runners(list(todo.values())) as runners:
                keys = list(todo)
                for _ in range(self.warmup):
                    for k in keys:
                        runners[k]()
                samples: dict[Any, list[float]] = {k: [] for k in keys}
                for r in range(self.repeats):
                    for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
                        samples[k].append(runners[k]())
            self._cache.update({k: min(s) for k, s in samples.items()})
        return [self._cache[p.key] for p in probes]

    def models(self, models: dict[str, nn.Module], inputs: ExampleInputs) -> dict[str, list[float]]:
        """Seconds of one forward of each per round, interleaved (ONNX Runtime: all exported first)."""
        with contextlib.ExitStack() as stack:
            runnable: dict[str, Any] = dict(models)
            if self.target == "onnxruntime-cpu":
                import tempfile
                from pathlib import Path

                from ..io.onnx import export_onnx

                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="compactor-auto-")))
                runnable = {
                    n: export_onnx(m, inputs, tmp / f"model{i}.onnx", dynamo=False).path
                    for i, (n, m) in enumerate(models.items())
                }
            t = latency(
                runnable,
                inputs,
                backend=self.target,  # type: ignore[arg-type]  # checked in __init__'s caller
                threads=self.threads,
                warmup=1,
                repeats=max(WHOLE_REPEATS, self.repeats),
            )
        _give_back_memory()  # the runtime's sessions are gone: hand their memory back to the system
        return {n: [ms / 1000 for ms in t[n].rounds_ms] for n in models}

    @contextlib.contextmanager
    def _runners(self, probes: list[Probe]) -> Iterator[dict[Any, Callable[[], float]]]:
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                if self.target == "onnxruntime-cpu":
                    yield {p.key: _ort_runner(p, self.threads) for p in probes}
                else:
                    yield {p.key: _torch_runner(p, cuda=self.target == "cuda") for p in probes}
        finally:
            torch.set_num_threads(previous)


def _input(p: Probe, device: torch.device | None = None) -> torch.Tensor:
    if p.dtype.is_floating_point:
        return torch.randn(p.shape, dtype=p.dtype, device=device)
    return torch.randint(0, 2, p.shape, dtype=p.dtype, device=device)


def _torch_runner(p: Probe, *, cuda: bool) -> Callable[[], float]:
    device = torch.device("cuda") if cuda else None
    module = p.module.to(device) if cuda else p.module
    x = _input(p, device)

    def call() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        module(x)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return call


def _ort_runner(p: Probe, threads: int) -> Callable[[], float]:
    from ..io.onnx import ort_session

    buffer = io.BytesIO()
    x = _input(p)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(p.module, (x,), buffer, dynamo=False, input_names=["x"])  # type: ignore[arg-type]  # a file object works with dynamo=False
    session = ort_session(buffer.getvalue(), threads=threads)
    feed = {"x": x.numpy()}

    def call() -> float:
        start = time.perf_counter()
        session.run(None, feed)
        return time.perf_counter() - start

    return call


def layer_times(
    dense: nn.Module, small: nn.Module, inputs: ExampleInputs, timer: Timer
) -> list[dict[str, Any]]:
    """Every timed layer whose widths compaction changed, alone on its real input, dense and compacted
    (ms per forward of the model): the report's "why not faster" section."""
    after_modules = dict(small.named_modules())
    names = set()
    for name, module in dense.named_modules():
        new = after_modules.get(name)
        if name and new is not None and timed_kind(module) and _widths_of(module) != _widths_of(new):
            names.add(name)
    seen_before, seen_after = record_inputs(dense, inputs, names), record_inputs(small, inputs, names)
    names = {n for n in names if n in seen_before and n in seen_after}
    ordered = sorted(names)
    before = [probe(n, dense.get_submodule(n), seen_before[n], None, None) for n in ordered]
    after = [probe(n, small.get_submodule(n), seen_after[n], None, None) for n in ordered]
    seconds = timer.layers(before + after)
    return [
        {
            "layer": b.layer,
            "before_ms": sb * b.calls * 1000,
            "after_ms": sa * a.calls * 1000,
            "widths": f"{b.in_width}→{b.out_width} / {a.in_width}→{a.out_width}",
        }
        for b, a, sb, sa in zip(before, after, seconds[: len(ordered)], seconds[len(ordered) :])
    ]


def _widths_of(module: nn.Module) -> tuple[int | None, int | None]:
    shrinker = shrinker_for(module)
    assert shrinker is not None
    return shrinker.in_channels(module), shrinker.out_channels(module)
