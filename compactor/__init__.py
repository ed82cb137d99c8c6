"""compactor: make pruned PyTorch models physically smaller, losslessly, and prove it.

>>> small, report = compactor.compact(model, example_inputs)
>>> small, report = compactor.compact("pruned-llama/", output="small-llama/")   # streamed block by block
>>> small = compactor.load("small.pt")          # .pt, .pt2, .safetensors (with arch=): in eval mode

The package follows the pipeline: ``io`` (load, save: every file format), ``engine`` (masks, heads,
coupling, plan, rebuild, verify: one stage function each, one frozen ``Options``), ``layers`` (the shrinker
registry: one module per layer family), ``measure`` (timing, MACs), ``report`` (the report and its
rendering), ``training`` (keep_pruned, Lightning callbacks); ``api`` calls the stages in order and ``cli`` is
the ``compact`` command.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, overload

from torch import nn

from .api import compact as compact_module
from .errors import CompactorError
from .io.load import load
from .report.report import CompactionReport
from .stream import StreamReport, compact_checkpoint
from .training.finetune import KeepPruned, keep_pruned
from .training.prune import PrunePlan, prune_channels


@overload
def compact(
    model: nn.Module, example_inputs: Any = None, **options: Any
) -> tuple[nn.Module, CompactionReport]: ...
@overload
def compact(
    model: str | os.PathLike[str], example_inputs: Any = None, **options: Any
) -> tuple[nn.Module, CompactionReport | StreamReport]: ...
def compact(
    model: nn.Module | str | os.PathLike[str], example_inputs: Any = None, **options: Any
) -> tuple[nn.Module, CompactionReport | StreamReport]:
    """A physically smaller copy of ``model`` that computes the same function, and a report.

    ``model``: a module (see :func:`compactor.api.compact` for the options), a model file
    (:func:`compactor.load`, then the same), or a Hugging Face checkpoint directory, compacted block by block
    (:func:`compactor.stream.compact_checkpoint`: options ``output``, the directory to write, else a
    temporary one that is loaded back and removed; ``tolerance``, ``uniform``, ``max_shard_size``,
    ``progress``, ``trust_remote_code``); the report is then a :class:`~compactor.stream.StreamReport`.
    """
    if isinstance(model, nn.Module):
        return compact_module(model, example_inputs, **options)
    if not Path(model).is_dir():
        return compact_module(load(model), example_inputs, **options)
    output = options.pop("output", None)
    scratch = None if output is not None else Path(tempfile.mkdtemp(prefix="compactor-"))
    target = Path(output) if scratch is None else scratch / "out"
    try:
        report = compact_checkpoint(Path(model), target, example_inputs=example_inputs, **options)
        return load(target, trust_remote_code=options.get("trust_remote_code", False)), report
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


__all__ = [
    "CompactionReport",
    "CompactorError",
    "KeepPruned",
    "PrunePlan",
    "StreamReport",
    "compact",
    "keep_pruned",
    "load",
    "prune_channels",
]
__version__ = "0.1.0"
