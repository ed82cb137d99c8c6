"""Measuring models: parameters and MACs, interleaved latency on each backend (``timing``), and single
layers rebuilt at given widths and timed alone (``probes``). The report renders what is measured here; the
plan's width choice (``engine/plan/autowidth.py``) times its candidates with it."""
