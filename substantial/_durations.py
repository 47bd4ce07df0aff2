"""Durations and timeouts a user passes: checked once, here, with errors that say what to pass.

A duration ends up as a due time in the store (a sleep, a receive timeout,
a run's deadline, a retry's next attempt) or as a wait of a process (a
lease, a poll, a client's timeout). NaN, infinities and negative values
have no meaning there, and neither do durations so long that the due time
no longer fits the stores' sortable time keys: each is refused up front,
before anything is recorded, so a run never holds a time another worker
cannot read.
"""

from __future__ import annotations

import math
import numbers
from datetime import timedelta

from substantial.errors import InvalidArgument

__all__ = ["MAX_SECONDS", "seconds"]

#: The longest duration accepted: 1000 years. Due times up to year ~5000 fit every
#: store's time keys (17 digits of microseconds on fs and S3).
MAX_SECONDS = 1000 * 365.25 * 86400.0


def seconds(
    delta: timedelta | float | int,
    what: str = "a duration",
    *,
    positive: bool = False,
    instead: str = "",
) -> float:
    """Return ``delta`` in seconds, or raise :class:`InvalidArgument` naming ``what``.

    Accepted: a ``timedelta`` or a real number (not a bool), finite, from 0
    (or above 0 when ``positive``) up to :data:`MAX_SECONDS`. ``instead`` is
    appended to the error, to say what to pass for "no limit".
    """
    if isinstance(delta, timedelta):
        value = delta.total_seconds()
    elif isinstance(delta, numbers.Real) and not isinstance(delta, bool):
        try:
            value = float(delta)
        except OverflowError:
            value = math.inf if delta > 0 else -math.inf
    else:
        raise InvalidArgument(
            f"{what} takes a number of seconds or a datetime.timedelta, "
            f"got {type(delta).__name__} {delta!r}{instead}"
        )
    low_ok = value > 0 if positive else value >= 0
    if not (math.isfinite(value) and low_ok and value <= MAX_SECONDS):
        low = "above 0" if positive else "from 0"
        raise InvalidArgument(
            f"{what} takes a finite number of seconds {low} up to {MAX_SECONDS:.0f} "
            f"(1000 years), got {delta!r}{instead}"
        )
    return value
