"""compactor: make pruned PyTorch models physically smaller, losslessly, and prove it.

>>> small, report = compactor.compact(model, example_inputs)
"""

from .api import compact
from .errors import CompactorError
from .finetune import KeepPruned, keep_pruned
from .load import load_module
from .report import CompactionReport

__all__ = ["CompactionReport", "CompactorError", "KeepPruned", "compact", "keep_pruned", "load_module"]
__version__ = "0.1.0"
