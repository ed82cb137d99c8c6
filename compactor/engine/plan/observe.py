"""Run the model and watch what each consuming layer receives: min/max per input channel, and the
constants behind a join that a writer lives in (``0 * g``, a constant times a constant gate), proved by
shaking the live writers with noise."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ...inputs import ExampleInputs
from ...layers import Role, Side, role_of, shrinker_for
from ..coupling import ChannelGroup, Member
from .base import InputStats, Modules, all_zero, forgets, mixing, rows_zero

Hook = Callable[..., Any]


def observe_inputs(
    model: nn.Module,
    runs: list[ExampleInputs],
    layers: set[str],
    noise: dict[str, list[int]] | None = None,
) -> InputStats:
    """Run ``model`` on each input and record min/max per input channel of each layer in ``layers``.

    ``noise``: layer -> output channels to which large random noise is added on the way (to prove
    that nothing those channels carry reaches a consumer)."""
    stats = InputStats()
    hooks = []
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        shrinker = shrinker_for(module)
        if shrinker is None:
            continue
        if noise and noise.get(name):
            hooks.append(
                module.register_forward_hook(_noise(noise[name], shrinker.input_channel_dim, generator))
            )
        if name in layers:
            hooks.append(module.register_forward_pre_hook(_recorder(stats, name, shrinker.input_channel_dim)))
    run_with_hooks(model, runs, hooks)
    return stats


def run_with_hooks(model: nn.Module, runs: list[ExampleInputs], hooks: list[Any]) -> None:
    """Run ``model`` on each input without grad, then remove ``hooks`` (installed by the caller), even on error."""
    try:
        with torch.no_grad():
            for run in runs:
                model(*run.args, **run.kwargs)
    finally:
        for h in hooks:
            h.remove()


def _recorder(stats: InputStats, name: str, dim: int) -> Hook:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().double().movedim(dim, 0)
        x = x.reshape(x.shape[0], -1)  # channels first, everything else flat (a 1-D input too)
        lo, hi = x.amin(1), x.amax(1)
        if name in stats.lo:
            lo, hi = torch.minimum(lo, stats.lo[name]), torch.maximum(hi, stats.hi[name])
        stats.lo[name], stats.hi[name] = lo, hi

    return hook


def _noise(channels: list[int], dim: int, generator: torch.Generator) -> Hook:
    idx = torch.tensor(channels, dtype=torch.long)

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        scale = 10.0 * (1.0 + float(out.detach().abs().max()))
        shape = list(out.shape)
        shape[dim] = len(channels)
        noise = (torch.randn(shape, generator=generator, dtype=torch.float64) * scale).to(out)
        return out.index_add(dim, idx.to(out.device), noise)

    return hook


def consumer_layers(groups: list[ChannelGroup], model: nn.Module) -> set[str]:
    modules = dict(model.named_modules())
    return {m.name for g in groups for m in mixing(g.layers(Side.IN), modules)}


def proved_independent(
    model: nn.Module,
    groups: list[ChannelGroup],
    modules: Modules,
    stats: InputStats,
    runs: list[ExampleInputs],
) -> dict[int, set[int]]:
    """Per group index: root channels that no input changes although a writer of them lives.

    Several mixing layers write a group through an add or a multiply; Torch-Pruning does not say which.
    A channel is plainly input-independent when every writer is dead. Behind a multiply (a gate,
    squeeze-excite) one dead factor can be enough: ``0 * g = 0``; a constant times a constant gate (a
    depthwise filter that is zero, times the sigmoid of an expand conv's zero row) is a constant. A
    candidate has a dead writer or a channelwise layer that forgets its input there (:func:`dead_rows`), a
    live writer, and reads one constant at every consumer; it is proved when large random noise added to
    the live writers' channels leaves the same constant at every consumer. One noisy pass serves every
    group: noise elsewhere cannot make a structural constant vary, only expose a false one.
    """
    found: dict[int, tuple[list[Member], list[int]]] = {}
    noise: dict[str, list[int]] = defaultdict(list)
    for i, group in enumerate(groups):
        producers = mixing(group.layers(Side.OUT), modules)
        consumers = [c for c in mixing(group.layers(Side.IN), modules) if c.name in stats.lo]
        if len(producers) < 2 or not consumers:
            continue
        writers = {p.name for p in producers}
        dead = dead_rows(group, modules)
        candidates = [
            r
            for r in range(group.size)
            if any(d[r] for d in dead.values())
            and not all(dead[w][r] for w in writers)
            and reads_constant(stats, consumers, r) is not None
        ]
        if candidates:
            found[i] = (consumers, candidates)
            for p in producers:
                noise[p.name] += [j for r in candidates if not dead[p.name][r] for j in p.idxs[r]]
    if not found:
        return {}
    layers = {c.name for consumers, _ in found.values() for c in consumers}
    shaken = observe_inputs(model, runs, layers, dict(noise))
    return {
        i: {
            r
            for r in candidates
            if _same(reads_constant(stats, consumers, r), reads_constant(shaken, consumers, r))
        }
        for i, (consumers, candidates) in found.items()
    }


def _same(a: list[torch.Tensor] | None, b: list[torch.Tensor] | None) -> bool:
    return a is not None and b is not None and all(torch.equal(x, y) for x, y in zip(a, b))


def dead_rows(group: ChannelGroup, modules: Modules) -> dict[str, list[bool]]:
    """Per writing member of ``group`` (its mixing layers, and its channelwise layers that can forget their
    input: a zero depthwise filter, a BatchNorm of weight 0): per root channel, whether it is dead there
    (a mixing layer's all-zero row; a channelwise layer's output that ignores its input)."""
    dead = {
        p.name: all_zero([p], modules, group.size, rows_zero) for p in mixing(group.layers(Side.OUT), modules)
    }
    for member in group.layers(Side.OUT):
        if role_of(modules.get(member.name)) is Role.CHANNELWISE:
            flags = all_zero([member], modules, group.size, forgets)
            if any(flags):
                dead[member.name] = flags
    return dead


def reads_constant(stats: InputStats, consumers: list[Member], r: int) -> list[torch.Tensor] | None:
    """What each consumer of root channel ``r`` reads there, where every one reads a constant; else None."""
    ks = [stats.constant(c.name, c.idxs[r]) for c in consumers if c.idxs[r]]
    if not ks or any(k is None for k in ks):
        return None
    return [k for k in ks if k is not None]
