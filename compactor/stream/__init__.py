"""Checkpoints too big to hold: a Hugging Face directory compacted block by block (:func:`compact_checkpoint`)."""

from .driver import compact_checkpoint
from .report import BlockResult, StreamReport

__all__ = ["BlockResult", "StreamReport", "compact_checkpoint"]
