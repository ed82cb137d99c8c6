"""Training around compaction: ``keep_pruned`` (pruned weights stay zero while fine-tuning) and optional
PyTorch Lightning callbacks (``compactor.training.lightning``, imported only on request)."""
