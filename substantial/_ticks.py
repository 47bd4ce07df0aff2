"""When a schedule fires: its spec, its ticks, and which missed ticks to start.

Pure functions of data, shared by the client (validation, backfill) and the
built-in schedule workflow. Cron expressions, time zones and daylight-saving
changes are cronsim's job: a time that does not exist (spring forward) fires
at the first time after it, a time that happens twice (fall back) fires
once, as Debian's cron does.
"""

from __future__ import annotations

import hashlib
import math
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

from substantial.errors import InvalidArgument

__all__ = [
    "CatchUp",
    "ScheduleSpec",
    "jitter_of",
    "late_after",
    "make_spec",
    "next_tick",
    "pick_due",
    "tick_stamp",
    "ticks_between",
]

CatchUp = Literal["latest", "all", "none"]
CATCH_UPS = ("latest", "all", "none")
#: A tick later than this (seconds) is "missed" whatever the period.
MAX_LATE = 60.0
#: ...and one later than this is never missed (a worker picking a tick up late under load).
MIN_LATE = 0.5


class ScheduleSpec(TypedDict):
    """What a schedule starts and when, as stored in the schedule run's log."""

    workflow: str
    version: str | None
    kwargs: dict[str, Any]
    cron: str | None
    every: float | None
    tz: str
    catch_up: CatchUp
    jitter: float | None
    #: Pass the tick's time to the workflow as the keyword ``scheduled_at``.
    pass_time: bool
    queue: str | None


def make_spec(
    workflow: str,
    version: str | None,
    kwargs: dict[str, Any],
    *,
    cron: str | None,
    every: timedelta | float | None,
    tz: str,
    catch_up: str,
    jitter: timedelta | float | None,
    pass_time: bool,
    queue: str | None = None,
) -> ScheduleSpec:
    """Check a schedule's settings and return them as stored data."""
    if (cron is None) == (every is None):
        raise InvalidArgument("a schedule takes exactly one of cron='*/5 * * * *' or every=...")
    period: float | None = None
    if every is not None:
        period = every.total_seconds() if isinstance(every, timedelta) else float(every)
        if not math.isfinite(period) or period < 0.001:
            raise InvalidArgument(f"every= must be at least a millisecond, got {every!r}")
    if not isinstance(tz, str):
        raise InvalidArgument(f"tz= takes a time zone name such as 'Europe/Paris', got {tz!r}")
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidArgument(
            f"unknown time zone {tz!r}: use an IANA name such as 'UTC' or 'America/New_York'"
        ) from exc
    if cron is not None:
        if not isinstance(cron, str):
            raise InvalidArgument(f"cron= takes a cron expression string, got {cron!r}")
        try:
            next(CronSim(cron, datetime.now(zone)))
        except (CronSimError, StopIteration) as exc:
            raise InvalidArgument(
                f"invalid cron expression {cron!r} ({exc or 'it never fires'}): use five fields "
                "'minute hour day-of-month month day-of-week' (or six, seconds first)"
            ) from exc
    if catch_up not in CATCH_UPS:
        raise InvalidArgument(f"catch_up= must be 'latest', 'all' or 'none', got {catch_up!r}")
    spread: float | None = None
    if jitter is not None:
        spread = jitter.total_seconds() if isinstance(jitter, timedelta) else float(jitter)
        if not math.isfinite(spread) or spread < 0:
            raise InvalidArgument(f"jitter= must be a duration >= 0, got {jitter!r}")
    return {
        "workflow": workflow,
        "version": version,
        "kwargs": kwargs,
        "cron": cron,
        "every": period,
        "tz": tz,
        "catch_up": catch_up,  # type: ignore[typeddict-item]
        "jitter": spread or None,
        "pass_time": pass_time,
        "queue": queue,
    }


def next_tick(spec: ScheduleSpec, after: float) -> float:
    """Return the first tick strictly after epoch time ``after``."""
    every = spec["every"]
    if every is not None:
        # Integer microseconds: float multiples of a period can land back on ``after``.
        step = max(1, round(every * 1_000_000))
        return ((math.floor(after * 1_000_000) // step) + 1) * step / 1_000_000
    assert spec["cron"] is not None
    start = datetime.fromtimestamp(after, ZoneInfo(spec["tz"]))
    return next(CronSim(spec["cron"], start)).timestamp()


def ticks_between(spec: ScheduleSpec, after: float, until: float, limit: int) -> list[float]:
    """Return up to ``limit`` ticks ``t`` with ``after < t <= until``, oldest first."""
    out: list[float] = []
    t = after
    while len(out) < limit:
        t = next_tick(spec, t)
        if t > until:
            break
        out.append(t)
    return out


def period(spec: ScheduleSpec, tick: float) -> float:
    """Return the time from ``tick`` to the tick after it."""
    return next_tick(spec, tick) - tick


def late_after(spec: ScheduleSpec, tick: float) -> float:
    """Return how late (seconds) a tick may start and still count as on time."""
    return min(MAX_LATE, max(MIN_LATE, period(spec, tick) / 2))


def pick_due(
    spec: ScheduleSpec, name: str, due: list[float], now: float
) -> tuple[list[float], int]:
    """Choose which due ticks to start per ``catch_up``; return them and how many are skipped.

    A tick is missed when it comes later than :func:`late_after` (after its
    jitter): no worker ran the schedule in time. ``all`` starts every missed
    tick, ``latest`` only the newest missed one (and none if an on-time tick
    follows), ``none`` none. On-time ticks always start.
    """

    def late(t: float) -> bool:
        return now - t - jitter_of(spec, name, t) > late_after(spec, t)

    on_time = [t for t in due if not late(t)]
    missed = [t for t in due if late(t)]
    mode = spec["catch_up"]
    if mode == "all":
        chosen = missed + on_time
    elif mode == "latest":
        chosen = (missed[-1:] if not on_time else []) + on_time
    else:
        chosen = on_time
    return chosen, len(due) - len(chosen)


def jitter_of(spec: ScheduleSpec, name: str, tick: float) -> float:
    """Return how long after ``tick`` its run starts: a spread derived from the tick itself.

    Derived, not drawn, so every replay and every worker computes the same
    value without recording it.
    """
    spread = spec["jitter"]
    if not spread:
        return 0.0
    digest = hashlib.sha256(f"{name}/{tick!r}".encode()).digest()
    return spread * int.from_bytes(digest[:8], "big") / 2**64


def tick_stamp(tick: float) -> str:
    """Render a tick as the UTC stamp in its run id: ``20250101T120000Z``.

    A tick with a fraction of a second gets it after an underscore
    (``20250101T120000_500000Z``), which sorts after ``Z``: run ids of one
    schedule sort in tick order.
    """
    when = datetime.fromtimestamp(round(tick, 6), UTC)
    if when.microsecond:
        return when.strftime("%Y%m%dT%H%M%S_%fZ")
    return when.strftime("%Y%m%dT%H%M%SZ")
