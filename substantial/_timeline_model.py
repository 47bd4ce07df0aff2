"""The timeline's data: rows on one time axis, a run's facts beside them, and their text.

:class:`Timeline` and its :class:`Row` objects are what the CLI and the web UI
draw (built by :mod:`substantial.timeline`); :func:`format_duration` and
:func:`pretty_name` are the shared ways of writing durations and step names.
Nothing here escapes text: each renderer makes it safe for its medium.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from substantial.backends.base import TERMINAL_STATUSES, ErrorInfo, Lease
from substantial.records import Record

__all__ = ["Attempt", "Child", "Row", "Timeline", "format_duration", "pretty_name"]


def format_duration(seconds: float) -> str:
    """Render a duration briefly: ``0.8ms``, ``1.25s``, ``2m03s``, ``1h02m``, ``3d04h``."""
    s = max(0.0, seconds)
    if s < 1:
        return f"{s * 1000:.1f}ms" if s < 0.01 else f"{s * 1000:.0f}ms"
    if s < 60:
        return f"{s:.2f}s" if s < 10 else f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def pretty_name(name: str) -> str:
    """Make a step name read well: ``example.<locals>.<lambda>`` becomes ``lambda in example``."""
    if "<locals>" not in name and "<lambda>" not in name:
        return name
    parts = [p for p in name.split(".") if p != "<locals>"]
    last = parts[-1].strip("<>") if parts else name
    outer = ".".join(parts[:-1])
    return f"{last} in {outer}" if outer else last


@dataclass(frozen=True, slots=True)
class Attempt:
    """One failed attempt of a step that was retried."""

    n: int
    error: ErrorInfo | None
    retry_at: float


@dataclass(slots=True)
class Row:
    """One thing the run did or waited for.

    ``end`` is None for an instant (an event, a log line, a published value)
    and for a bar still open (see ``state``). ``state`` is one of ``ok``,
    ``failed``, ``running``, ``retrying``, ``waiting``, ``info``.
    """

    kind: str
    label: str
    start: float
    end: float | None = None
    state: str = "info"
    c: int | None = None
    position: int | None = None
    #: The step's value, the event's value, the published value...
    value: Any = None
    error: ErrorInfo | None = None
    attempts: list[Attempt] = field(default_factory=list)
    #: For a child: the child's run id; for a child-ended event: the child that ended.
    run_id: str | None = None
    #: When a sleep or a wait is due (epoch seconds).
    until: float | None = None

    @property
    def is_bar(self) -> bool:
        """Tell whether the row spans time (a step, a sleep, a child) or is an instant."""
        return self.kind in ("step", "sleep", "timer", "wait", "child", "compensation")

    def to_json(self) -> dict[str, Any]:
        """Return the row as JSON-compatible data."""
        return {
            "kind": self.kind,
            "label": self.label,
            "start": self.start,
            "end": self.end,
            "state": self.state,
            "c": self.c,
            "position": self.position,
            "value": self.value,
            "error": self.error,
            "attempts": [
                {"n": a.n, "error": a.error, "retry_at": a.retry_at} for a in self.attempts
            ],
            "run_id": self.run_id,
            "until": self.until,
            "bar": self.is_bar,
        }


@dataclass(frozen=True, slots=True)
class Child:
    """A child run, as its parent's log and (when loaded) its own metadata tell."""

    run_id: str
    workflow: str
    status: str
    error: ErrorInfo | None = None


@dataclass(slots=True)
class Timeline:
    """A run's rows on one time axis, with what is known about it beside its log."""

    run_id: str
    workflow: str
    status: str
    started_at: float
    #: When the run ended (its end record), or None while it is active.
    ended_at: float | None
    #: The time the timeline was built: the right edge of open bars.
    now: float
    rows: list[Row] = field(default_factory=list)
    version: str | None = None
    parent: str | None = None
    deadline: float | None = None
    value: Any = None
    error: ErrorInfo | None = None
    note: str | None = None
    published: dict[str, Any] = field(default_factory=dict)
    streams: dict[str, list[Any]] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    lease: Lease | None = None
    pending_events: int = 0
    #: Positions whose entry could not be decoded, with why.
    corrupt: list[tuple[int, str]] = field(default_factory=list)
    #: Every decoded record with its log position, in log order.
    records: list[tuple[int, Record]] = field(default_factory=list)
    next_run: str | None = None

    @property
    def duration(self) -> float:
        """Seconds from the start to the end (or to now, while active)."""
        return max(
            0.0, (self.ended_at if self.ended_at is not None else self.now) - self.started_at
        )

    def waiting_for(self) -> str | None:
        """Say in words what an active run waits for, or None if it has ended."""
        if self.status in TERMINAL_STATUSES:
            return None
        if self.note:
            return self.note
        held = self.lease is not None and self.lease.expires_at > self.now
        holder = f" on worker {self.lease.owner}" if held and self.lease is not None else ""
        open_rows = [r for r in self.rows if r.is_bar and r.end is None]
        running = [r for r in open_rows if r.state in ("running", "retrying")]
        if running:
            names = ", ".join(r.label for r in running[:3])
            if held:
                return f"running {names}{holder}"
            return f"{names} was running when its worker left: waiting for a worker to take over"
        if self.pending_events:
            what = f"{self.pending_events} event(s) in the inbox, not yet delivered"
            return what + ("" if held else ": waiting for a worker to pick the run up")
        timers = sorted((r.until, r.kind) for r in open_rows if r.until is not None)
        if timers:
            left = timers[0][0] - self.now
            if left >= 0 and timers[0][1] == "wait":
                return f"an event, or its timeout in {format_duration(left)}"
            if left >= 0:
                return f"a timer due in {format_duration(left)}"
            late = f"a timer that was due {format_duration(-left)} ago"
            return late + ("" if held else ": waiting for a worker to pick the run up")
        children = [r for r in open_rows if r.kind == "child"]
        if children:
            return "child run(s) " + ", ".join(str(r.run_id) for r in children[:3])
        return "an event, or a condition that an event will make true"

    def to_json(self) -> dict[str, Any]:
        """Return the whole timeline as JSON-compatible data (what ``--json`` and the UI use)."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "version": self.version,
            "status": self.status,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "now": self.now,
            "duration": self.duration,
            "parent": self.parent,
            "deadline": self.deadline,
            "value": self.value,
            "error": self.error,
            "note": self.note,
            "waiting_for": self.waiting_for(),
            "published": self.published,
            "streams": self.streams,
            "children": [
                {"run_id": c.run_id, "workflow": c.workflow, "status": c.status, "error": c.error}
                for c in self.children
            ],
            "lease": None
            if self.lease is None
            else {"owner": self.lease.owner, "expires_at": self.lease.expires_at},
            "pending_events": self.pending_events,
            "corrupt": [{"position": p, "error": e} for p, e in self.corrupt],
            "next_run": self.next_run,
            "rows": [r.to_json() for r in self.rows],
            "records": [{"position": p, "record": r} for p, r in self.records],
        }
