"""Turn a run's records into timeline rows, walking the log once in order.

The log records when commands *complete* (``t``), not when the workflow
issued them; a command's start is taken as the workflow's clock when it was
issued, i.e. the time of the latest completion recorded before the first
record of that command or of any later one (:func:`issue_times`).
"""

from __future__ import annotations

from typing import Any

from substantial._timeline_model import Attempt, Child, Row, Timeline, pretty_name
from substantial.backends.base import ErrorInfo
from substantial.records import Record
from substantial.replay import CANCEL_EVENT, CHILD_EVENT

__all__ = ["add_rows", "error_info", "issue_times", "number", "optional_number"]


def issue_times(records: list[tuple[int, Record]], start: float) -> dict[int, float]:
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


def error_info(value: Any) -> ErrorInfo | None:
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value  # type: ignore[return-value]
    return None


def optional_number(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def number(value: Any, default: float) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return default


def add_rows(tl: Timeline, records: list[tuple[int, Record]]) -> None:
    """Walk the records in log order and add a row per thing the run did."""
    issued = issue_times(records, tl.started_at)
    right = tl.ended_at if tl.ended_at is not None else tl.now
    ended = tl.ended_at is not None
    steps: dict[int, Row] = {}
    timers: dict[int, Row] = {}
    children: dict[str, Row] = {}
    clock = tl.started_at
    for position, r in records:
        kind = r["k"]
        t = number(r.get("t"), clock)
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
                retry_at = number(r.get("retry_at"), t)
                row.attempts.append(Attempt(int(r["n"]), error_info(r.get("error")), retry_at))
                row.state = "retrying"
                row.error = error_info(r.get("error"))
            else:
                row.end = t
                row.position = position
                if "error" in r:
                    row.state, row.error = "failed", error_info(r.get("error"))
                else:
                    row.state, row.error, row.value = "ok", None, r.get("value")
        elif kind == "sleep":
            assert c is not None
            why = r.get("for")
            until = number(r.get("until"), at)
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
                row.state, row.error, row.end = "failed", error_info(r.get("error")), t
            else:
                row.state = "running"
            children.setdefault(child_id, row)
            tl.children.append(Child(child_id, str(r.get("name", "?")), row.state, row.error))
            tl.rows.append(row)
        elif kind == "sent":
            row = Row("send", "sent an event to a child", t, c=c, position=position)
            if "error" in r:
                row.state, row.error = "failed", error_info(r.get("error"))
            tl.rows.append(row)
        elif kind == "compensated":
            row = Row("compensation", f"compensate {pretty_name(str(r['name']))}", at, t, "ok", c)
            row.position = position
            if "error" in r:
                row.state, row.error = "failed", error_info(r.get("error"))
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
        elif kind == "repair":
            tl.rows.append(_repair_row(r, number(r.get("at"), clock), position))
        elif kind == "end":
            status = str(r["status"])
            state = "ok" if status in ("completed", "continued") else "failed"
            row = Row("end", f"ended {status}", t, state=state, position=position)
            row.value, row.error = r.get("value"), error_info(r.get("error"))
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
            child.value, child.error = value.get("value"), error_info(value.get("error"))
        row = Row("event", f"child {child_id} ended {status}", t, position=position, value=value)
        row.run_id = child_id
        return row
    if name == CANCEL_EVENT:
        return Row("event", "cancel requested", t, state="failed", position=position)
    return Row("event", f"event {name}", t, position=position, value=value)


def _repair_row(r: Record, at: float, position: int) -> Row:
    """Say who resumed, forked or restarted the run, and into which run."""
    op, by = str(r["op"]), r.get("by")
    to = r.get("to") if isinstance(r.get("to"), str) else None
    if op == "resume":
        label = "resumed"
    elif op in ("forked", "restarted"):
        label = f"{op} as {to}"
    else:
        label = f"repair: {op}"
    if by:
        label += f" by {by}"
    return Row("repair", label, at, position=position, run_id=to)
