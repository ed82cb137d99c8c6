"""The coupling stage as the pipeline calls it: groups for the eval-mode forward, held where train mode
reads channels too, and a tracer failure turned into a warning (every channel kept) rather than an end."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ...errors import GraphError, SharedWriteError
from ...inputs import ExampleInputs
from ...modules import clone_module, write_guard
from ..coverage import Paths, hold_train_only
from ..options import Options
from . import build_groups
from .groups import ChannelGroup, Coupled


def structure(model: nn.Module, inputs: ExampleInputs, paths: Paths, options: Options) -> tuple[Any, ...]:
    """What :class:`CouplingCache` tells models apart by."""
    modules = tuple((n, type(m).__module__, type(m).__qualname__) for n, m in model.named_modules())
    tensors = tuple(
        (n, tuple(t.shape), str(t.dtype))
        for n, t in [
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ]
    )
    shown = tuple(
        (tuple(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else repr(v)
        for v in [*inputs.args, *(inputs.kwargs[k] for k in sorted(inputs.kwargs))]
    )
    return (
        modules,
        tensors,
        shown,
        tuple(sorted(inputs.kwargs)),
        tuple(sorted(paths.train_only)),
        options.analysis,
    )


def couple(model: nn.Module, inputs: ExampleInputs, paths: Paths, options: Options) -> Coupled:
    """The coupling stage: trace ``model`` on ``inputs`` into groups of coupled channels; where train mode
    runs layers eval mode does not (``paths.train_only``), trace that too and keep the channels it reads.
    With ``options.coupling_cache``, a structure already traced is answered from it."""
    cache = options.coupling_cache
    if cache is not None:
        return cache.answer(
            structure(model, inputs, paths, options), lambda: _couple(model, inputs, paths, options)
        )
    return _couple(model, inputs, paths, options)


def _couple(model: nn.Module, inputs: ExampleInputs, paths: Paths, options: Options) -> Coupled:
    try:
        groups = build_groups(model, inputs, analysis=options.analysis)
    except GraphError as e:  # a tracer failure never ends the run: every channel is kept, and said so
        return Coupled([], [f"{e}: no channel was removed (attention heads may still go)"])
    if paths.train_only and groups:
        options.say("tracing train-mode channel dependencies")
        # on what train mode ran on: the example twice over where BatchNorm needs more than one value
        train_inputs = paths.train_inputs or inputs
        try:
            groups = hold_train_only(
                model, groups, _train_groups(model, train_inputs, options), set(paths.train_only)
            )
        except GraphError as e:  # what the train-mode paths read is unknown: every group stays whole
            why = f"the train-mode forward could not be traced ({e})"
            groups = [replace(g, held=(*g.held, why)) for g in groups]
    return Coupled(groups, [])


def _train_groups(model: nn.Module, inputs: ExampleInputs, options: Options) -> list[ChannelGroup]:
    """The train-mode trace, on a clone that shares the parameters (batch statistics move in its own
    buffers); one whose forward writes its parameters is traced on a copy of everything instead."""
    try:
        with write_guard(model.parameters(), "the train-mode trace"):
            shared = clone_module(model, share_parameters=True)
            return build_groups(shared, inputs, train=True, analysis=options.analysis)
    except (GraphError, SharedWriteError):
        return build_groups(clone_module(model), inputs, train=True, analysis=options.analysis)
