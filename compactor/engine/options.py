"""The options every stage reads: one frozen object, checked once, passed down.

:func:`compactor.compact` builds it from its keyword arguments; a driver that runs the stages itself (one
block of a streamed checkpoint at a time) builds one and passes it to each stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..measure.probes import Timer
from ..measure.timing import BACKENDS, Backend
from ..outputs import DEFAULT_TOLERANCE
from .coupling import ANALYSES, Analysis

if TYPE_CHECKING:
    from .coupling.groups import CouplingCache

Log = Callable[[str], None]


def _quiet(_message: str) -> None:
    return None


@dataclass(frozen=True)
class Options:
    """What :func:`compactor.compact` documents, one field per keyword argument."""

    tolerance: float = DEFAULT_TOLERANCE
    round_to: int | Literal["auto"] = 1
    strict: bool = False
    uniform: bool = False
    target: Backend | None = None
    timer: Timer | None = None
    analysis: Analysis = "auto"
    log: Log | None = None
    # the coupling stage's answers by model structure (:class:`~.coupling.groups.CouplingCache`), shared
    # between calls on models built alike: a streamed checkpoint's blocks are traced once per structure
    coupling_cache: CouplingCache | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        r = self.round_to
        if r != "auto" and (not isinstance(r, int) or isinstance(r, bool) or r < 1):
            raise ValueError(f"round_to must be a positive integer or 'auto', found {r!r}")
        if self.target is not None and self.target not in BACKENDS:
            raise ValueError(f"target must be one of {', '.join(BACKENDS)}, found {self.target!r}")
        if self.analysis not in ANALYSES:
            raise ValueError(f"analysis must be one of {', '.join(ANALYSES)}, found {self.analysis!r}")

    @property
    def auto(self) -> bool:
        """``round_to="auto"``: widths chosen by timing."""
        return self.round_to == "auto"

    @property
    def step(self) -> int:
        """The multiple every rebuilt width keeps (1 under ``auto``, whose choice comes later)."""
        return 1 if self.round_to == "auto" else self.round_to

    def say(self, message: str) -> None:
        """One line of progress, to ``log`` if there is one."""
        (self.log or _quiet)(message)
