"""compactor: make pruned PyTorch models physically smaller, losslessly, and prove it.

>>> small, report = compactor.compact(model, example_inputs)
"""

from .api import compact
from .errors import CompactorError
from .load import load_module
from .report import CompactionReport

__all__ = ["CompactionReport", "CompactorError", "compact", "load_module"]
__version__ = "0.1.0"
