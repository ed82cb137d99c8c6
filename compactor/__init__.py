"""compactor: make pruned PyTorch models physically smaller, losslessly, and prove it.

>>> small, report = compactor.compact(model, example_inputs)
>>> small = compactor.load("small.pt")          # .pt, .pt2, .safetensors (with arch=): in eval mode

The package follows the pipeline: ``io`` (load, save: every file format), ``engine`` (masks, heads,
coupling, plan, rebuild, verify: one stage function each, one frozen ``Options``), ``layers`` (the shrinker
registry: one module per layer family), ``measure`` (timing, MACs), ``report`` (the report and its
rendering), ``training`` (keep_pruned, Lightning callbacks); ``api`` calls the stages in order and ``cli`` is
the ``compact`` command.
"""

from .api import compact
from .errors import CompactorError
from .io.load import load
from .report.report import CompactionReport
from .training.finetune import KeepPruned, keep_pruned

__all__ = ["CompactionReport", "CompactorError", "KeepPruned", "compact", "keep_pruned", "load"]
__version__ = "0.1.0"
