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

from substantial._timeline_model import (
    Attempt,
    Child,
    Row,
    Timeline,
    format_duration,
    pretty_name,
)
from substantial._timeline_rows import add_rows, error_info, number, optional_number
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo
from substantial.errors import RunNotFound, SubstantialError
from substantial.records import Record, decode_entry

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
    started_at = number(
        start_rec.get("at") if start_rec else None, info.created_at if info else now
    )
    # A resume voids the end before it: the run's end, if any, is one written after it.
    resumed = max(
        (i for i, (_, r) in enumerate(records) if r["k"] == "repair" and r["op"] == "resume"),
        default=-1,
    )
    end_rec = next((r for _, r in reversed(records[resumed + 1 :]) if r["k"] == "end"), None)
    tl = Timeline(
        run_id=run_id,
        workflow=str(start_rec["workflow"]) if start_rec else (info.workflow if info else "?"),
        status=str(end_rec["status"]) if end_rec else (info.status if info else "active"),
        started_at=started_at,
        ended_at=number(end_rec.get("t"), now) if end_rec else None,
        now=now,
        version=start_rec.get("version") if start_rec else (info.version if info else None),
        parent=start_rec.get("parent") if start_rec else (info.parent if info else None),
        deadline=optional_number(start_rec.get("deadline")) if start_rec else None,
        records=records,
        corrupt=corrupt,
    )
    if info is not None:
        tl.note = info.note
        tl.deadline = tl.deadline or info.deadline
    add_rows(tl, records)
    for position, message in corrupt:
        tl.rows.append(Row("corrupt", message, tl.now, state="failed", position=position))
    if end_rec is not None:
        tl.value = end_rec.get("value")
        tl.error = error_info(end_rec.get("error"))
        tl.next_run = end_rec.get("next") if isinstance(end_rec.get("next"), str) else None
    elif info is not None and info.status in TERMINAL_STATUSES:
        tl.value, tl.error = info.output, info.error
    if info is not None and info.published:
        tl.published = {**tl.published, **info.published}
    tl.rows.sort(key=lambda r: (r.start, r.position if r.position is not None else -1))
    return tl


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
