"""Run surgery: resume a run that ended badly, fork a run at a position, restart it afresh.

Logs stay append-only. A resume appends a ``repair`` record that voids,
for replay, what ended the run: its ``end``, the failed completions of
steps and compensations (with their attempts), a cancel event, a deadline's
``timeout``. Replay (:func:`effective`) drops those records, so the failed
commands run again with the current code and a fresh retry budget. A fork
or restart is a new run whose log copies the first entries of the old one;
both logs record who did it, when, and from where.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import socket
import time
import uuid
from typing import Any

from substantial._runs import hold, store_run
from substantial.backends.base import Backend, RunInfo, make_owner, validate_id
from substantial.errors import (
    BackendError,
    InvalidArgument,
    PositionTaken,
    RunConflict,
    RunNotFound,
)
from substantial.records import Record, decode_entry, encode_entry
from substantial.replay import CANCEL_EVENT

__all__ = ["effective", "fork_run", "resume_run", "who"]

RESUMABLE = ("failed", "cancelled", "timed_out")


def who() -> str:
    """Name the person and place behind a repair, for the log."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def _voided(records: list[tuple[int, Record]]) -> list[tuple[int, Record]]:
    failed = {
        r["c"]
        for _, r in records
        if r["k"] in ("step", "compensated") and r.get("error") is not None
    }
    return [
        (position, r)
        for position, r in records
        if r["k"] not in ("end", "timeout")
        and not (r["k"] == "event" and r.get("name") == CANCEL_EVENT)
        and not (r["k"] in ("step", "compensated", "attempt") and r.get("c") in failed)
    ]


def _refuse_deleting(run_id: str, records: list[tuple[int, Record]]) -> None:
    """Refuse to repair a run whose delete has begun (its log ends with the delete's fence)."""
    if records and records[-1][1]["k"] == "repair" and records[-1][1].get("op") == "delete":
        raise RunNotFound(
            f"run {run_id!r} is being deleted: nothing to repair (delete it again to finish)"
        )


def effective(records: list[tuple[int, Record]]) -> tuple[list[tuple[int, Record]], Record | None]:
    """Return the records replay sees, and the latest resume record (or None).

    Each resume voids what ended the run before it; repair records
    themselves are notes, never replayed.
    """
    if not any(r["k"] == "repair" for _, r in records):
        return records, None
    out: list[tuple[int, Record]] = []
    resumed: Record | None = None
    for position, r in records:
        if r["k"] != "repair":
            out.append((position, r))
        elif r.get("op") == "resume":
            out, resumed = _voided(out), r
    return out, resumed


async def _log(backend: Backend, run_id: str) -> tuple[list[bytes], list[tuple[int, Record]]]:
    entries = await backend.read_log(run_id)
    if not entries:
        raise RunNotFound(f"no run with id {run_id!r}: nothing to repair")
    records = [
        (position, r)
        for position, data in enumerate(entries)
        for r in decode_entry(run_id, position, data)
    ]
    return entries, records


async def _note(backend: Backend, run_id: str, record: Record) -> None:
    """Append a repair note to a log, at its end whatever a worker writes meanwhile."""
    for _ in range(20):
        entries = await backend.read_log(run_id)
        position = len(entries)
        if position == 0:
            return  # deleted meanwhile: a note alone would be a log that starts with no run
        last = decode_entry(run_id, position - 1, entries[-1])[-1]
        if last["k"] == "repair" and last.get("op") == "delete":
            return  # being deleted: the note would go with it
        try:
            await backend.append(run_id, position, encode_entry([record]))
            return
        except PositionTaken:
            continue
    raise RunConflict(f"run {run_id!r} kept changing: its log did not take the repair note")


async def resume_run(
    backend: Backend, run_id: str, *, deadline: float | None = None, check: Any = None
) -> RunInfo:
    """Make a failed, cancelled or timed-out run go on from where it stopped.

    ``deadline`` is the resumed run's new deadline (epoch seconds), None for
    none. ``check``, if given, is awaited with the log replay will see and
    must raise if the current code cannot replay it. The run's lease is held
    meanwhile, so a delete cannot take the run from under the resume.
    """
    owner = make_owner("resume-")
    await hold(backend, validate_id("run id", run_id), owner)
    try:
        resumed = await _resume(backend, run_id, deadline, check)
    finally:
        with contextlib.suppress(BackendError):
            await backend.release_lease(run_id, owner)
    # Due again now that nobody holds it: a worker that found it held while resuming waits
    # for the lease to expire, unless its due time moves.
    with contextlib.suppress(BackendError):
        await backend.schedule(run_id, time.time())
    return resumed


async def _resume(backend: Backend, run_id: str, deadline: float | None, check: Any) -> RunInfo:
    info = await backend.get_run(run_id)
    if info is None:
        raise RunNotFound(f"no run with id {run_id!r}: nothing to resume")
    if info.status not in RESUMABLE:
        raise InvalidArgument(
            f"run {run_id!r} is {info.status}: only failed, cancelled or timed-out runs resume"
        )
    entries, records = await _log(backend, run_id)
    _refuse_deleting(run_id, records)
    record: Record = {"k": "repair", "op": "resume", "by": who(), "at": time.time()}
    record["deadline"] = deadline
    if check is not None:
        await check(effective([*records, (len(entries), record)])[0])
    try:
        await backend.append(run_id, len(entries), encode_entry([record]))
    except PositionTaken as exc:
        raise RunConflict(f"run {run_id!r} changed while being resumed: try again") from exc
    now = time.time()
    resumed = RunInfo(
        info.run_id,
        info.workflow,
        "active",
        info.created_at,
        now,
        version=info.version,
        log_start=info.log_start,
        parent=info.parent,
        deadline=deadline,
        published=info.published,
        note=f"resumed by {record['by']}",
    )
    await backend.put_run(resumed)
    await backend.schedule(run_id, now)
    return resumed


async def fork_run(
    backend: Backend,
    run_id: str,
    *,
    at: int | None = None,
    new_id: str | None = None,
    op: str = "fork",
) -> str:
    """Start a new run whose log is the first ``at`` entries of ``run_id``'s; return its id.

    Without ``at``, the whole log, less what ended the run (as a resume
    voids it). ``op="restart"`` with ``at=1`` starts afresh from the same
    arguments.
    """
    entries, records = await _log(backend, validate_id("run id", run_id))
    _refuse_deleting(run_id, records)
    if at is not None and not 1 <= at <= len(entries):
        raise InvalidArgument(
            f"fork at={at!r}: run {run_id!r} has {len(entries)} log entries; pass 1 to "
            f"{len(entries)} (1 keeps only the start)"
        )
    replayed = effective(records)[0]
    kept = _voided(replayed if at is None else [(p, r) for p, r in replayed if p < at])
    new_id = validate_id("run id", new_id) if new_id is not None else uuid.uuid4().hex
    by, now = who(), time.time()
    start = dict(kept[0][1])
    if start.get("k") != "start":
        raise InvalidArgument(f"run {run_id!r} is compacted: fork it at a position after 0")
    start.update(run_id=new_id, at=now)
    start["from"] = {"op": op, "run_id": run_id, "position": at, "by": by}
    start.pop("deadline", None)
    info = RunInfo(new_id, str(start["workflow"]), "active", now, now, version=start.get("version"))
    if not await store_run(backend, info, encode_entry([start]), now):
        raise RunConflict(f"run {new_id!r} already exists: pick another id")
    by_position: dict[int, list[Record]] = {}
    for position, r in kept[1:]:
        by_position.setdefault(position, []).append(r)
    for n, position in enumerate(sorted(by_position), 1):
        await backend.append(new_id, n, encode_entry(by_position[position]))
    note: Record = {"k": "repair", "op": "forked" if op == "fork" else "restarted", "at": now}
    note.update(to=new_id, by=by)
    await _note(backend, run_id, note)
    return new_id
