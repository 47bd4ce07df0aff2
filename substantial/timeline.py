"""What a run did, as rows on one time axis: the model the CLI and the web UI draw.

:func:`build` turns a run's records into :class:`Row` objects (steps with
their attempts, sleeps, waits, events, children, sends, published values,
compensations, the end); :func:`load` reads them, with the run's metadata,
lease, inbox and children, from any backend through the Backend contract.

The log records when commands *complete* (``t``), not when the workflow
issued them; a command's start is taken as the workflow's clock when it was
issued, i.e. the time of the latest completion recorded before the first
record of that command or of any later one. A step's bar therefore runs from
when the workflow asked for it to when its result was recorded.

Nothing here escapes text: labels and values are plain data, and each
renderer (terminal, HTML) makes them safe for its medium.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from substantial.backends.base import TERMINAL_STATUSES, Backend, ErrorInfo, Lease, RunInfo
from substantial.errors import RunNotFound, SubstantialError
from substantial.records import Record, decode_entry
from substantial.replay import CANCEL_EVENT, CHILD_EVENT

__all__ = [
    "Attempt",
    "Child",
    "Row",
    "Timeline",
    "build",
    "format_duration",
    "load",
    "pretty_name",
]


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


def _issue_times(records: list[tuple[int, Record]], start: float) -> dict[int, float]:
    """Estimate when each command was issued: the clock before its (or a later one's) records."""
    clock = start
    clock_before: list[float] = []
    first_index: dict[int, int] = {}
    for i, (_, record) in enumerate(records):
        clock_before.append(clock)
        c = record.get("c")
        if isinstance(c, int) and c not in first_index:
            first_index[c] = i
        t = record.get("t")
        if isinstance(t, (int, float)) and not isinstance(t, bool):
            clock = max(clock, float(t))
    out: dict[int, float] = {}
    earliest = len(records)
    for c in sorted(first_index, reverse=True):
        earliest = min(earliest, first_index[c])
        out[c] = clock_before[earliest] if earliest < len(clock_before) else clock
    return out


def _error(value: Any) -> ErrorInfo | None:
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value  # type: ignore[return-value]
    return None


def _opt_num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _num(value: Any, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def build(
    run_id: str,
    entries: list[bytes],
    info: RunInfo | None = None,
    *,
    now: float | None = None,
) -> Timeline:
    """Turn a run's log entries (and its metadata, if known) into a :class:`Timeline`.

    An entry that cannot be decoded becomes a ``corrupt`` row; the rest of
    the log is still shown.
    """
    now = time.time() if now is None else now
    records: list[tuple[int, Record]] = []
    corrupt: list[tuple[int, str]] = []
    for position, data in enumerate(entries):
        try:
            records.extend((position, r) for r in decode_entry(run_id, position, data))
        except SubstantialError as exc:
            corrupt.append((position, str(exc)))
    start_rec = next((r for _, r in records if r["k"] == "start"), None)
    started_at = _num(start_rec.get("at") if start_rec else None, info.created_at if info else now)
    end_rec = next((r for _, r in reversed(records) if r["k"] == "end"), None)
    tl = Timeline(
        run_id=run_id,
        workflow=str(start_rec["workflow"]) if start_rec else (info.workflow if info else "?"),
        status=str(end_rec["status"]) if end_rec else (info.status if info else "active"),
        started_at=started_at,
        ended_at=_num(end_rec.get("t"), now) if end_rec else None,
        now=now,
        version=start_rec.get("version") if start_rec else (info.version if info else None),
        parent=start_rec.get("parent") if start_rec else (info.parent if info else None),
        deadline=_opt_num(start_rec.get("deadline")) if start_rec else None,
        records=records,
        corrupt=corrupt,
    )
    if info is not None:
        tl.note = info.note
        tl.deadline = tl.deadline or info.deadline
    _rows(tl, records)
    for position, message in corrupt:
        tl.rows.append(Row("corrupt", message, tl.now, state="failed", position=position))
    if end_rec is not None:
        tl.value = end_rec.get("value")
        tl.error = _error(end_rec.get("error"))
        tl.next_run = end_rec.get("next") if isinstance(end_rec.get("next"), str) else None
    elif info is not None and info.status in TERMINAL_STATUSES:
        tl.value, tl.error = info.output, info.error
    if info is not None and info.published:
        tl.published = {**tl.published, **info.published}
    tl.rows.sort(key=lambda r: (r.start, r.position if r.position is not None else -1))
    return tl


def _rows(tl: Timeline, records: list[tuple[int, Record]]) -> None:
    """Walk the records in log order and add a row per thing the run did."""
    issued = _issue_times(records, tl.started_at)
    right = tl.ended_at if tl.ended_at is not None else tl.now
    ended = tl.ended_at is not None
    steps: dict[int, Row] = {}
    timers: dict[int, Row] = {}
    children: dict[str, Row] = {}
    clock = tl.started_at
    for position, r in records:
        kind = r["k"]
        t = _num(r.get("t"), clock)
        c = r.get("c") if isinstance(r.get("c"), int) else None
        at = issued.get(c, clock) if c is not None else clock
        if kind == "start":
            label = f"started {tl.workflow}"
            tl.rows.append(Row("start", label, t if "t" in r else tl.started_at, position=position))
        elif kind in ("attempt", "step"):
            assert c is not None
            row = steps.get(c)
            if row is None:
                row = steps[c] = Row("step", pretty_name(str(r["name"])), at, c=c)
                row.position = position
                row.state = "running"
                tl.rows.append(row)
            if kind == "attempt":
                retry_at = _num(r.get("retry_at"), t)
                row.attempts.append(Attempt(int(r["n"]), _error(r.get("error")), retry_at))
                row.state = "retrying"
                row.error = _error(r.get("error"))
            else:
                row.end = t
                row.position = position
                if "error" in r:
                    row.state, row.error = "failed", _error(r.get("error"))
                else:
                    row.state, row.error, row.value = "ok", None, r.get("value")
        elif kind == "sleep":
            assert c is not None
            why = r.get("for")
            until = _num(r.get("until"), at)
            label = {"receive": "wait for an event", "timer": "timer"}.get(str(why), "sleep")
            row = Row("wait" if why == "receive" else "sleep", label, at, c=c, position=position)
            row.until, row.state = until, "waiting"
            timers[c] = row
            tl.rows.append(row)
        elif kind == "timer":
            row = timers.get(c) if c is not None else None
            if row is not None:
                row.end, row.state = t, "ok"
                if row.kind == "wait":
                    row.label, row.state = "wait for an event: timed out", "failed"
        elif kind == "event":
            tl.rows.append(_event_row(r, t, position, children))
            for wait in timers.values():
                # A receive whose timeout never fired got its event: close its bar there.
                if (
                    wait.kind == "wait"
                    and wait.end is None
                    and wait.start <= t <= (wait.until or t)
                ):
                    wait.end, wait.state = t, "ok"
                    break
        elif kind == "child":
            child_id = str(r["run_id"])
            label = f"child {r.get('name', '?')} {child_id}"
            row = Row("child", label, t, c=c, position=position, run_id=child_id)
            if "error" in r:
                row.state, row.error, row.end = "failed", _error(r.get("error")), t
            else:
                row.state = "running"
            children.setdefault(child_id, row)
            tl.children.append(Child(child_id, str(r.get("name", "?")), row.state, row.error))
            tl.rows.append(row)
        elif kind == "sent":
            row = Row("send", "sent an event to a child", t, c=c, position=position)
            if "error" in r:
                row.state, row.error = "failed", _error(r.get("error"))
            tl.rows.append(row)
        elif kind == "compensated":
            row = Row("compensation", f"compensate {pretty_name(str(r['name']))}", at, t, "ok", c)
            row.position = position
            if "error" in r:
                row.state, row.error = "failed", _error(r.get("error"))
            tl.rows.append(row)
        elif kind == "publish":
            key = str(r["key"])
            tl.published[key] = r.get("value")
            row = Row("publish", f"publish {key}", at, c=c, position=position, value=r.get("value"))
            tl.rows.append(row)
        elif kind == "emit":
            stream = str(r["stream"])
            tl.streams.setdefault(stream, []).append(r.get("value"))
            tl.rows.append(
                Row("emit", f"emit {stream}", at, c=c, position=position, value=r.get("value"))
            )
        elif kind == "log":
            tl.rows.append(
                Row("log", str(r["msg"]), at, c=c, position=position, value=r.get("data"))
            )
        elif kind == "timeout":
            tl.rows.append(Row("timeout", "deadline passed", t, state="failed", position=position))
        elif kind == "snapshot":
            tl.rows.append(
                Row("snapshot", "compacted: replay restarts here", clock, position=position)
            )
        elif kind == "end":
            status = str(r["status"])
            state = "ok" if status in ("completed", "continued") else "failed"
            row = Row("end", f"ended {status}", t, state=state, position=position)
            row.value, row.error = r.get("value"), _error(r.get("error"))
            tl.rows.append(row)
        if "t" in r:
            clock = max(clock, t)
    for row in tl.rows:
        if row.is_bar and row.end is None and ended:
            # The run ended with this still open: it was cut short, not left running.
            row.end = right
            if row.state in ("running", "retrying", "waiting"):
                row.state = "cancelled"


def _event_row(r: Record, t: float, position: int, children: dict[str, Row]) -> Row:
    name = str(r["name"])
    value = r.get("value")
    if name == CHILD_EVENT and isinstance(value, dict):
        child_id = str(value.get("run_id"))
        status = str(value.get("status"))
        child = children.get(child_id)
        if child is not None and child.end is None:
            child.end = t
            child.state = "ok" if status == "completed" else "failed"
            child.value, child.error = value.get("value"), _error(value.get("error"))
        row = Row("event", f"child {child_id} ended {status}", t, position=position, value=value)
        row.run_id = child_id
        return row
    if name == CANCEL_EVENT:
        return Row("event", "cancel requested", t, state="failed", position=position)
    return Row("event", f"event {name}", t, position=position, value=value)


async def load(backend: Backend, run_id: str, *, now: float | None = None) -> Timeline:
    """Read a run's log, metadata, lease, inbox and children's status; build its timeline.

    Raises :class:`RunNotFound` if the store has no such run.
    """
    info, entries, lease, inbox = await asyncio.gather(
        backend.get_run(run_id),
        backend.read_log(run_id),
        backend.get_lease(run_id),
        backend.read_inbox(run_id),
    )
    if info is None and not entries:
        raise RunNotFound(
            f"no run {run_id!r} in {backend.describe()}: check the id and the --backend URL"
        )
    tl = build(run_id, entries, info, now=now)
    tl.lease = lease
    tl.pending_events = len(inbox)
    if tl.children:
        infos = await asyncio.gather(*(backend.get_run(c.run_id) for c in tl.children))
        tl.children = [
            Child(c.run_id, c.workflow, i.status, i.error) if i is not None else c
            for c, i in zip(tl.children, infos, strict=True)
        ]
    return tl
