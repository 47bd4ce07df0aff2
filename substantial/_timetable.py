"""Timetables a workflow declares with ``@workflow(schedule=...)``.

``@workflow(schedule="*/5 * * * *")`` reads a cron expression in UTC,
``@workflow(schedule=timedelta(minutes=5))`` a period; :class:`Cron` and
:class:`Every` add the other settings of ``conductor.schedule`` (time zone,
catch-up, jitter, arguments, the schedule's name). Checked when the module
that declares them is imported; stored by the Conductor the workflow is
registered on when it starts a worker (:mod:`substantial._flow`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from substantial._ticks import make_spec
from substantial.errors import InvalidArgument
from substantial.records import as_stored

__all__ = ["Cron", "Every", "Timetable", "timetable"]


@dataclass(frozen=True)
class Cron:
    """Start the workflow on a cron timetable, read in ``tz``: ``Cron("30 2 * * *", tz=...)``.

    ``catch_up``, ``jitter`` and ``kwargs`` are those of
    ``conductor.schedule``; ``name`` is the schedule's (default: the
    workflow's name).
    """

    expression: str
    tz: str = "UTC"
    catch_up: str = "latest"
    jitter: timedelta | float | None = None
    kwargs: dict[str, Any] | None = None
    name: str | None = None

    def settings(self) -> dict[str, Any]:
        """Return the keyword arguments of ``conductor.schedule`` this stands for."""
        return {
            "cron": self.expression,
            "tz": self.tz,
            "catch_up": self.catch_up,
            "jitter": self.jitter,
            "kwargs": self.kwargs,
        }


@dataclass(frozen=True)
class Every:
    """Start the workflow every ``period`` (ticks aligned to the Unix epoch): ``Every(60)``.

    ``catch_up``, ``jitter`` and ``kwargs`` are those of
    ``conductor.schedule``; ``name`` is the schedule's (default: the
    workflow's name).
    """

    period: timedelta | float
    catch_up: str = "latest"
    jitter: timedelta | float | None = None
    kwargs: dict[str, Any] | None = None
    name: str | None = None

    def settings(self) -> dict[str, Any]:
        """Return the keyword arguments of ``conductor.schedule`` this stands for."""
        return {
            "every": self.period,
            "catch_up": self.catch_up,
            "jitter": self.jitter,
            "kwargs": self.kwargs,
        }


Timetable = Cron | Every


def timetable(value: Any) -> Timetable | None:
    """Return what ``@workflow(schedule=value)`` declares, checked; None for no schedule."""
    if value is None:
        return None
    declared: Timetable
    if isinstance(value, str):
        declared = Cron(value)
    elif isinstance(value, timedelta):
        declared = Every(value)
    elif isinstance(value, (Cron, Every)):
        declared = value
    else:
        raise InvalidArgument(
            f"@workflow(schedule=...) takes a cron expression ('*/5 * * * *'), a timedelta, "
            f"Cron(...) or Every(...), got {value!r} (for seconds: Every({value!r}))"
        )
    if declared.kwargs is not None:
        if not isinstance(declared.kwargs, dict):
            raise InvalidArgument("@workflow(schedule=...) takes the run's arguments as a dict")
        as_stored(dict(declared.kwargs), "the arguments of @workflow(schedule=...)")
    options = declared.settings()
    options.pop("kwargs")
    options.setdefault("cron", None)
    options.setdefault("every", None)
    options.setdefault("tz", "UTC")
    make_spec("check", None, {}, pass_time=False, **options)  # raises on a bad setting
    return declared
