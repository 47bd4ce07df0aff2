"""How a run ends: its end record, its snapshot, and what an end changes elsewhere."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from substantial import _clock, telemetry
from substantial._runs import create_run
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo, error_info
from substantial.errors import BackendError, SerializationError, WorkflowTimeout
from substantial.records import Record, encode_value, error_of, start_record
from substantial.replay import (
    CANCEL_EVENT,
    CHILD_EVENT,
    Cancelled,
    Compact,
    ContinueAs,
    Evicted,
    Execution,
    Reverted,
)

__all__ = ["Outcome", "end_of", "finish_run", "snapshot_of", "start_successor", "successor_id"]

#: How many consumed event ids a snapshot remembers, to drop late duplicate sends.
SEEN_IDS_KEPT = 10_000


@dataclass
class Outcome:
    """What the workflow's main task came to."""

    end: Record
    compact: dict[str, Any] | None = None
    successor: dict[str, Any] | None = None


def successor_id(run_id: str) -> str:
    """Return the id of the run that continues ``run_id``."""
    base, sep, gen = run_id.rpartition("+")
    if sep and gen.isdigit():
        return f"{base}+{int(gen) + 1}"
    return f"{run_id}+1"


def end_of(x: Execution) -> Outcome:
    """Classify how the main task ended, as the end record to write."""
    main = x.main
    assert main is not None and main.done()
    end: Record = {"k": "end", "t": x.now()}
    exc: BaseException | None
    if x.failure is not None:
        exc = x.failure
    elif main.cancelled():
        exc = Cancelled() if x.cancelled else WorkflowTimeout("deadline") if x.timed_out else None
        if exc is None:
            exc = RuntimeError("the workflow's main task was cancelled")
    else:
        exc = main.exception()
    if exc is None:
        value = main.result()
        try:
            encode_value(value, "the workflow's return value")
            end.update(status="completed", value=value)
        except SerializationError as err:
            end.update(status="failed", error=error_of(err))
    elif isinstance(exc, Cancelled) or (isinstance(exc, asyncio.CancelledError) and x.cancelled):
        end["status"] = "cancelled"
    elif isinstance(exc, Reverted):
        end["status"] = "reverted"
    elif isinstance(exc, Compact):
        return Outcome(end, compact=exc.kwargs)
    elif isinstance(exc, ContinueAs):
        end.update(status="continued", next=successor_id(x.run_id))
        successor = {"workflow": exc.workflow, "version": exc.version, "kwargs": exc.kwargs}
        _cancel_children(x, end)
        return Outcome(end, successor=successor)
    elif isinstance(exc, WorkflowTimeout) or (
        x.timed_out and isinstance(exc, asyncio.CancelledError)
    ):
        end.update(status="timed_out", error=error_of(exc))
    elif isinstance(exc, Evicted):
        raise exc
    else:
        end.update(status="failed", error=error_of(exc))
    _cancel_children(x, end)
    return Outcome(end)


def _cancel_children(x: Execution, end: Record) -> None:
    unfinished = [
        cid for cid, abandon in x.children.items() if not abandon and cid not in x.child_outcomes
    ]
    if unfinished:
        end["cancel_children"] = unfinished


def snapshot_of(x: Execution, start: Record, kwargs: dict[str, Any]) -> Record:
    """Build the snapshot record ``compact()`` writes."""
    return {
        "k": "snapshot",
        "start": start,
        "kwargs": kwargs,
        "keys": x.keys,
        # Ids guard against a sender retrying an event already consumed; keep the latest.
        "seen": list(x.seen_ids)[-SEEN_IDS_KEPT:],
        "mailbox": [{"id": m.event_id, "name": m.name, "value": m.value} for m in x.mailbox],
        "next_c": x.next_c,
        "published": x.published,
    }


def _event_id(prefix: str, run_id: str) -> str:
    eid = f"{prefix}.{run_id}"
    return eid if len(eid) <= 200 else f"{prefix}.{hashlib.sha256(run_id.encode()).hexdigest()}"


async def finish_run(
    backend: Backend, info: RunInfo, start: Record, end: Record, seen: Container[str] = ()
) -> None:
    """Bring metadata, children, parent and the due index in step with an ended log.

    Idempotent: a worker that finds an ended log whose metadata is behind
    (the previous one died half-way) runs it again, and nothing is done twice
    that matters (events are posted with fixed ids). ``seen``: the ids of the
    events the log holds, acknowledged if they are in the inbox again.
    """
    status = end["status"]
    output: Any = None
    if status == "completed":
        output = end.get("value")
    elif status == "continued":
        output = {"next": end["next"]}
    await backend.put_run(
        info.with_status(status, error=error_info(end.get("error")), output=output)
    )
    for child in end.get("cancel_children", ()):
        with contextlib.suppress(BackendError):
            child_info = await backend.get_run(child)
            if child_info is not None and child_info.status not in TERMINAL_STATUSES:
                body = encode_value({"name": CANCEL_EVENT, "value": None})
                await backend.send_event(child, _event_id("parent-ended", info.run_id), body)
    parent = start.get("parent")
    if parent is not None and status != "continued":
        reported: dict[str, Any] = {
            "run_id": start.get("reports_as", info.run_id),
            "status": status,
        }
        if status == "completed":
            reported["value"] = end.get("value")
        elif "error" in end:
            reported["error"] = end["error"]
        body = encode_value({"name": CHILD_EVENT, "value": reported})
        await backend.send_event(parent, _event_id("child-ended", info.run_id), body)
    try:
        await backend.unschedule(info.run_id)
        # Read after leaving the due index: an event posted later makes the run due again,
        # and whoever takes it comes here too.
        if status == "continued":
            # A sender that saw this run active may have posted after the forwarding; now
            # that the status says "continued", senders forward themselves.
            for event in await backend.read_inbox(info.run_id):
                await backend.send_event(end["next"], event.event_id, event.data)
        elif seen:
            # A child that died after reporting its end reports again when finished anew.
            inbox = await backend.read_inbox(info.run_id)
            stale = [event.event_id for event in inbox if event.event_id in seen]
            if stale:
                await backend.ack_events(info.run_id, stale)
    except BackendError:
        # The unschedule may have landed (its reply lost): keep the run due, to finish anew.
        with contextlib.suppress(BackendError):
            await backend.schedule(info.run_id, _clock.now())
        raise


async def start_successor(
    backend: Backend, x: Execution, start: Record, successor: dict[str, Any], end: Record
) -> None:
    """Start the successor of a run that called ``continue_using``; forward its events."""
    next_id = end["next"]
    forwarded = {d.event_id for d in x.mailbox}
    seen = [i for i in x.seen_ids if i not in forwarded][-10_000:]
    record = start_record(
        next_id,
        successor["workflow"],
        successor["version"],
        successor["kwargs"],
        _clock.now(),
        seen=seen,
        parent=start.get("parent"),
        deadline=start.get("deadline"),
        abandon=bool(start.get("abandon")),
        # The successor goes on in the trace of the run it continues.
        trace=(telemetry.carrier() if telemetry.on else None) or start.get("trace"),
    )
    if "parent" in start:
        record["reports_as"] = start.get("reports_as", start["run_id"])  # type: ignore[typeddict-unknown-key]
    if await create_run(backend, record) and telemetry.on:
        telemetry.run_started(successor["workflow"])
    # Events that arrived for this run and were never consumed go to its successor.
    for delivered in x.mailbox:
        body = encode_value({"name": delivered.name, "value": delivered.value})
        await backend.send_event(next_id, delivered.event_id, body)
    for event in await backend.read_inbox(x.run_id):
        if event.event_id not in x.seen_ids:
            await backend.send_event(next_id, event.event_id, event.data)
