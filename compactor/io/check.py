"""The check every written file passes before it lands: reloaded, it reproduces the model's outputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ExportError
from ..inputs import ExampleInputs
from ..outputs import Outputs, compare


def expect_same(
    candidate: nn.Module,
    runs: list[ExampleInputs],
    references: list[Outputs],
    tolerance: float,
    file: Path,
    kind: str,
) -> None:
    """Raise :class:`ExportError` unless ``candidate`` (reloaded from ``file``) reproduces ``references``."""
    verdict = compare(candidate, runs, references, tolerance)
    if not verdict.ok:
        raise ExportError(
            f"the {kind} file does not reproduce the model ({verdict.summary()}); nothing was written: "
            f"report this, and save as .pt meanwhile"
        )


class CallableModule(nn.Module):
    """Holds a callable that refuses ``.eval()`` (``torch.export``'s module) out of the module tree."""

    fn: Callable[..., Any]

    def __init__(self, fn: Callable[..., Any]) -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)
