"""What a run changed and bought: the report (table and JSON from one object) and measurement (MACs,
interleaved latency)."""
