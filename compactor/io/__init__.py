"""Files in and out: reading models and state_dicts safely, building architectures, atomic writing, and
one module per output format (``pt``, ``pt2``, ``onnx``, ``safetensors``, ``sparse``). ``load`` is the
loader behind ``compactor.load``; ``save`` picks the writer for an output path."""
