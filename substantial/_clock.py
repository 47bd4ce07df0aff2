"""The engine's wall clock: real time, or real time plus a test's jump ahead.

Everything that decides *when* in a run (due times, timers, deadlines,
retry pauses, the times recorded in the log) reads :func:`now`. Tests that
skip time (:func:`substantial.testing.running` with ``time_skipping``)
move :data:`offset` forward; stores keep real time for their leases.
"""

from __future__ import annotations

import time

__all__ = ["advance", "now", "reset"]

#: Seconds added to real time; only the time-skipping test kit changes it.
offset = 0.0


def now() -> float:
    """Return the current time (epoch seconds) as the engine sees it."""
    return time.time() + offset


def advance(seconds: float) -> None:
    """Move the engine's clock ``seconds`` forward (never back)."""
    global offset
    offset += max(0.0, seconds)


def reset() -> None:
    """Return to real time."""
    global offset
    offset = 0.0
