"""compactor: make pruned PyTorch models physically smaller, losslessly, and prove it.

>>> small, report = compactor.compact(model, example_inputs)
>>> small = compactor.load("small.pt")          # .pt, .pt2, .safetensors (with arch=): in eval mode

The package follows the pipeline: ``io`` (load, save: every file format), ``engine`` (masks, heads,
graph, plan, rebuild, verify), ``layers`` (the shrinker registry: one module per layer family),
``report`` (report, measure), ``training`` (keep_pruned, Lightning callbacks); ``api`` strings the stages
together and ``cli`` is the ``compact`` command.
"""

from .api import compact
from .errors import CompactorError
from .io.load import load
from .report.report import CompactionReport
from .training.finetune import KeepPruned, keep_pruned

__all__ = ["CompactionReport", "CompactorError", "KeepPruned", "compact", "keep_pruned", "load"]
__version__ = "0.1.0"
