"""The time budget of one compaction: a deadline every long loop checks, so that a model too large to
analyse stops early with one line naming the part that could not be analysed, instead of running for
minutes (``compact(time_limit=...)``, CLI ``--time-limit``).

The deadline lives in a context variable set by :func:`time_limit`, so the stages need no extra argument;
:func:`check` raises :class:`~compactor.errors.TimeLimitError` once it has passed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from ..errors import TimeLimitError

_DEADLINE: ContextVar[tuple[float, float] | None] = ContextVar("compactor_deadline", default=None)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Within the block, :func:`check` raises once ``seconds`` have passed (None: no limit)."""
    if seconds is not None and not seconds > 0:
        raise ValueError(f"time_limit must be a positive number of seconds or None, found {seconds!r}")
    token = _DEADLINE.set(None if seconds is None else (time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check(part: str) -> None:
    """Raise :class:`~compactor.errors.TimeLimitError` naming ``part`` (what was about to be analysed) if the
    deadline has passed."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline[0]:
        raise TimeLimitError(
            f"the time limit of {deadline[1]:g} s was reached before {part} could be analysed; nothing was "
            f"written (raise it with --time-limit SECONDS, Python: time_limit=)"
        )
