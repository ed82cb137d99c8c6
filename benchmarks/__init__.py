"""The benchmark zoo and runner: ``python -m benchmarks --help``."""
