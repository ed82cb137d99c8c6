"""Every error compactor raises on purpose.

Each message says what is wrong, where, and how to fix it, in one line: the CLI prints it as
``error: <message>`` and exits 2. Bad input subclasses ``ValueError`` so that callers of the Python
API can catch it the conventional way.
"""

from __future__ import annotations


class CompactorError(Exception):
    """Base class of every error compactor raises on purpose."""


class InputFileError(CompactorError, ValueError):
    """The model file is missing, unreadable, or not what was expected."""


class UnsafePickleError(InputFileError):
    """The pickle needs a global that the safe loader does not allow."""


class UnsafeCodeError(InputFileError):
    """Loading the input would run code it ships (a Hugging Face directory's ``auto_map``) untrusted."""


class ExampleInputError(CompactorError, ValueError):
    """Example inputs are missing, malformed, or do not fit the model."""


class ModelStructureError(CompactorError, ValueError):
    """A layer's attributes and tensors disagree (built or edited inconsistently), or it has no channels."""


class SharedWriteError(ModelStructureError):
    """A forward tried to write in place into a parameter compactor shares with the user's model (refused
    before the write: the user's model stays as it was)."""


class ModelForwardError(CompactorError, RuntimeError):
    """The model fails its own forward pass on the example inputs."""


class OutputPathError(CompactorError, ValueError):
    """The output path cannot be written, or would overwrite the input."""


class GraphError(CompactorError, RuntimeError):
    """Torch-Pruning could not build a dependency graph for the model."""


class VerificationError(CompactorError, RuntimeError):
    """The compacted model does not compute the same function (never shipped)."""


class ExportError(CompactorError, RuntimeError):
    """Writing or checking an export format (ONNX, torch.export, safetensors) failed."""


class ArchitectureError(InputFileError):
    """``--arch module:callable`` cannot be imported or called, or does not build an ``nn.Module``."""


class StateDictError(InputFileError):
    """A weights file does not fit the architecture: missing or unexpected keys, or shapes that differ."""


class UnsupportedFormatError(OutputPathError):
    """The output path's suffix (or ``--format``) names no format compactor writes."""


class UnverifiedPathError(CompactorError, ValueError):
    """``--strict``: the model has paths the example inputs do not take (a branch on tensor values, a layer
    no forward called), which verification cannot prove."""


class CouplingUnsettled(GraphError):
    """Torch-Pruning's channel coupling from one root never settles (it cycles, as through a rotary
    embedding). Caught by the coupling stage, which keeps that root's channels with the message as reason."""


class CouplingByRule(GraphError):
    """Torch-Pruning's channel coupling reached an op it maps by rule (a reshape, permute, split...): its
    groups would not be trusted, so the walk stops there and compactor's own labels answer instead."""


class TimeLimitError(CompactorError, RuntimeError):
    """Compaction ran past its time limit (``--time-limit``); the message names the part it could not analyse."""


class CouplingUnmapped(GraphError):
    """Torch-Pruning could not compute the index mapping of an op (a concatenation it cannot size, a
    reshape it divides by zero on) that one root's channels reach. Caught by the coupling stage, which keeps
    that root's channels with the message as reason."""


class CouplingUnfollowed(GraphError):
    """compactor's channel labels cannot follow an op: replaying it on the label tensors fails (the tracer
    keeps the channels that reach it, the op's name as reason, and goes on), or the model's own op fails
    under the label trace (the coupling stage falls back on Torch-Pruning's groups). Any other exception
    from the label trace is compactor's own bug, and is raised as it is."""


def first_line(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of an exception's message, for one-line errors (its type name if it has none).

    ``with_type``: prefix the type, ``"ValueError: ..."``.
    """
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return f"{type(e).__name__}: {line}" if with_type and text else line


class BlocksCaptured(Exception):
    """Not an error: raised by the last block's stand-in once every block's arguments are captured, so that
    nothing after the blocks runs (their weights are not loaded yet); caught by :mod:`compactor.stream.capture`."""
