"""PyTorch Lightning callbacks: hold pruned weights at zero while fitting, compact when fitting ends.

Optional: needs ``lightning`` (``pip install lightning``, or ``pip install -e ".[lightning]"`` in a checkout). ``import compactor`` never imports
this module; import it explicitly:

>>> from compactor.training.lightning import CompactOnFitEnd, KeepPrunedCallback
>>> trainer = Trainer(callbacks=[KeepPrunedCallback(), CompactOnFitEnd(torch.randn(1, 3, 32, 32), "small.pt")])

``KeepPrunedCallback(amount=0.3, example_inputs=x)`` also makes the masks when fitting starts
(:func:`compactor.prune_channels`), so that the channels it masks are the ones compaction removes whole.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities import rank_zero_info
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "compactor.training.lightning needs PyTorch Lightning (the `lightning` package); "
        "install it with: pip install lightning"
    ) from e

from ..api import compact, resolve_example_inputs
from ..io.atomic import check_output_path
from ..io.save import save_output
from ..outputs import DEFAULT_TOLERANCE
from ..report.report import CompactionReport
from ..util import set_submodule
from .finetune import KeepPruned, keep_pruned
from .prune import Importance, PrunePlan, prune_channels

__all__ = ["CompactOnFitEnd", "KeepPrunedCallback"]


def _target(pl_module: LightningModule, attr: str | None, callback: str) -> nn.Module:
    if not attr:
        return pl_module
    try:
        module = pl_module.get_submodule(attr)
    except AttributeError as e:
        children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
        raise AttributeError(
            f"{callback}: {type(pl_module).__name__} has no submodule {attr!r} (its children: {children}); "
            f"pass attr='<child name>' naming the network to compact, or attr=None for the whole module"
        ) from e
    return module


def _replace(pl_module: LightningModule, attr: str | None, small: nn.Module) -> None:
    if attr:
        set_submodule(pl_module, attr, small)
        return
    # The Trainer holds pl_module itself, so move the compacted copy's contents into it.
    pl_module._modules.update(small._modules)
    pl_module._parameters.update(small._parameters)
    pl_module._buffers.update(small._buffers)


class CompactOnFitEnd(Callback):
    """At the end of ``trainer.fit``, replace ``pl_module.<attr>`` with its compacted copy.

    ``example_inputs``: what ``compactor.compact`` takes (a tensor, a tuple of tensors, a dict of keyword
    tensors; ``None`` to infer a shape). ``attr``: the (dotted) name of the network inside the LightningModule;
    ``None`` compacts the LightningModule itself (its ``forward`` must be the network's) and swaps the
    compacted layers into it. ``output``: also pickle the compacted network there (global rank 0 only).

    The report is printed on rank 0, its headline numbers go to the trainer's loggers, and it stays in
    ``self.report``; the compacted network is ``self.model``. Missing attributes and unwritable outputs are
    caught when fitting starts, not after training.
    """

    def __init__(
        self,
        example_inputs: Any = None,
        output: str | os.PathLike[str] | None = None,
        attr: str | None = "model",
        *,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        self.example_inputs = example_inputs
        self.output = output
        self.attr = attr
        self.tolerance = tolerance
        self.report: CompactionReport | None = None
        self.model: nn.Module | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _target(pl_module, self.attr, type(self).__name__)
        if self.output is not None:
            check_output_path(self.output, None, force=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = _target(pl_module, self.attr, type(self).__name__)
        inputs = resolve_example_inputs(target, self.example_inputs)
        small, report = compact(target, inputs, tolerance=self.tolerance)
        _replace(pl_module, self.attr, small)
        self.model, self.report = small, report
        if self.output is not None and trainer.is_global_zero:
            written = save_output(small, self.output, inputs, format="pt", tolerance=self.tolerance)
            rank_zero_info(f"compactor: saved the compacted model to {self.output} ({written:,} bytes)")
        rank_zero_info(report.table())
        metrics = {
            "compactor/params_before": float(report.params["before"]),
            "compactor/params_after": float(report.params["after"]),
            "compactor/file_bytes_after": float(report.file_bytes["after"]),
            "compactor/max_abs_error": report.max_abs_error,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class KeepPrunedCallback(Callback):
    """Hold pruned weights at exactly zero during ``trainer.fit`` (:func:`compactor.keep_pruned`).

    The masks are taken when fitting starts, once the optimizers exist, from ``pl_module.<attr>`` (``None``:
    the whole LightningModule); the hooks are removed when fitting ends or fails. The handle is ``self.handle``.

    ``amount``: first mask that share of every group of coupled channels with :func:`compactor.prune_channels`
    (on ``example_inputs``, scored by ``importance``, widths kept multiples of ``round_to``), so that
    :class:`CompactOnFitEnd` removes them whole; its plan is ``self.plan``. The optimizers keep their
    parameters: a pruned tensor's ``*_orig`` is the parameter they hold.
    """

    def __init__(
        self,
        attr: str | None = None,
        *,
        min_dim: int = 2,
        amount: float | None = None,
        example_inputs: Any = None,
        importance: Importance = "l1",
        round_to: int | None = None,
    ) -> None:
        self.attr = attr
        self.min_dim = min_dim
        self.amount, self.example_inputs = amount, example_inputs
        self.importance, self.round_to = importance, round_to
        self.handle: KeepPruned | None = None
        self.plan: PrunePlan | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        target = _target(pl_module, self.attr, type(self).__name__)
        if self.amount is not None:  # every rank makes the same masks: the analysis is deterministic
            self.plan = prune_channels(
                target, self.example_inputs, self.amount, self.importance, self.round_to
            )
            rank_zero_info(f"compactor: {self.plan.summary()}")
        self.handle = keep_pruned(target, list(trainer.optimizers), min_dim=self.min_dim)
        rank_zero_info(f"compactor: holding {self.handle.zeros:,} pruned weights at zero while fitting")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self.handle is not None:
            self.handle.remove()
