"""Which runs went through a queue, from the queue's own run: its log and its inbox.

A run started into queue ``Q`` announces itself to the run ``queue:Q`` with an
``enqueue`` message (docs/PROTOCOL.md §5.1). Until the queue's worker takes
it, the message waits in that run's inbox; then it is recorded in its log,
which is never trimmed, and a snapshot of the queue also holds the runs it
was keeping. So one log and one inbox name every run ever started into the
queue: listing them reads those, never the logs of the runs themselves.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from substantial._queue_flow import MESSAGE
from substantial.backends.base import Backend
from substantial.errors import CorruptRecord, InvalidArgument
from substantial.queues import queue_run_id
from substantial.records import decode_entry

__all__ = ["queued_run_ids"]


def _enqueued(message: Any) -> str | None:
    """Return the run id an ``enqueue`` message names, or None for any other message."""
    if isinstance(message, dict) and message.get("op") == "enqueue":
        run_id = message.get("run_id")
        return run_id if isinstance(run_id, str) else None
    return None


def _kept(kwargs: dict[str, Any]) -> list[str | None]:
    """Return the runs a queue's snapshot keeps: waiting, running, and not yet handled."""
    state = kwargs.get("state")
    out: list[str | None] = []
    for key in ("entries", "running"):
        kept = state.get(key) if isinstance(state, dict) else None
        if isinstance(kept, dict):
            out.extend(k for k in kept if isinstance(k, str))
    pending = kwargs.get("pending")
    out.extend(_enqueued(m) for m in (pending if isinstance(pending, list) else ()))
    return out


def _posted(data: bytes) -> Any:
    """Return the value of a queue message waiting in the inbox, or None."""
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return body.get("value") if isinstance(body, dict) and body.get("name") == MESSAGE else None


async def queued_run_ids(backend: Backend, queue: str) -> list[str]:
    """Return the id of every run started into ``queue``, each once, in arrival order."""
    qid = queue_run_id(queue)
    entries, inbox = await asyncio.gather(backend.read_log(qid), backend.read_inbox(qid))
    if not entries:
        raise InvalidArgument(
            f"no queue named {queue!r} in {backend.describe()}: `substantial queues list` "
            "names the queues of this store"
        )
    found: list[str | None] = []
    for position, data in enumerate(entries):
        try:
            records = decode_entry(qid, position, data)
        except CorruptRecord:
            continue  # a damaged entry hides its own messages, not the others'
        for r in records:
            if r["k"] == "event" and r["name"] == MESSAGE:
                found.append(_enqueued(r.get("value")))
            elif r["k"] == "snapshot":
                found.extend(_kept(r["kwargs"]))
    found.extend(_enqueued(_posted(event.data)) for event in inbox)
    return list(dict.fromkeys(run_id for run_id in found if run_id is not None))
