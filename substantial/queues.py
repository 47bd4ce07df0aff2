"""Queues: limits on how many runs execute at once, how fast they start, and in what order.

``Queue("emails", concurrency=10, per_key_concurrency=1, rate_limit=(100,
timedelta(minutes=1)))`` declared on the Conductor is stored in the backend
as the run ``queue:emails`` (see :mod:`substantial._queue_flow`), so every
worker obeys the same limits. ``conductor.start(wf, kwargs, queue="emails",
key=..., priority=..., dedup_id=..., delay=..., debounce=...)`` creates the
run parked and hands it to the queue, which admits it when the limits allow.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from substantial._outcome import finish_run
from substantial._queue_flow import MESSAGE, QUEUE_WORKFLOW
from substantial._queue_names import check_key_priority, queue_run_id
from substantial._runs import create_run, store_run
from substantial.backends.base import Backend, RunInfo, validate_id
from substantial.errors import InvalidArgument, PositionTaken
from substantial.records import (
    Record,
    StartRecord,
    decode_entry,
    encode_entry,
    encode_value,
    start_record,
)
from substantial.replay import CANCEL_EVENT

if TYPE_CHECKING:
    from substantial.conductor import Conductor

__all__ = ["Queue", "QueueInfo", "queue_run_id"]

#: The due time of a run waiting in a queue: later than any worker looks.
PARKED = 32_503_680_000.0  # 3000-01-01T00:00:00Z: within every store's time keys


def _positive(value: Any, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{what} takes a whole number >= 1 (or None), got {value!r}")
    return value


def _duration(value: timedelta | float | None, what: str) -> float:
    if value is None:
        return 0.0
    secs = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(secs) or secs < 0:
        raise InvalidArgument(f"{what} must be a duration >= 0, got {value!r}")
    return secs


@dataclass(frozen=True)
class Queue:
    """A named queue and its limits, declared with ``Conductor(backend, queues=[...])``.

    ``concurrency``: at most this many of its runs execute at once (None: no
    limit). ``per_key_concurrency``: at most this many runs of one ``key``.
    ``rate_limit=(n, window)``: at most ``n`` runs admitted in any ``window``.
    ``priority``: admit higher ``priority=`` first (FIFO within a priority);
    False keeps plain FIFO.
    """

    name: str
    concurrency: int | None = None
    per_key_concurrency: int | None = None
    rate_limit: tuple[int, timedelta | float] | None = None
    priority: bool = True

    def __post_init__(self) -> None:
        queue_run_id(self.name)
        _positive(self.concurrency, "Queue(concurrency=...)")
        _positive(self.per_key_concurrency, "Queue(per_key_concurrency=...)")
        if self.rate_limit is not None:
            if not isinstance(self.rate_limit, tuple) or len(self.rate_limit) != 2:
                raise InvalidArgument("Queue(rate_limit=...) takes (n, window), e.g. (10, 1.0)")
            _positive(self.rate_limit[0], "the n of Queue(rate_limit=(n, window))")
            if _duration(self.rate_limit[1], "the window of Queue(rate_limit=...)") <= 0:
                raise InvalidArgument("the window of Queue(rate_limit=...) must be > 0")

    def config(self) -> dict[str, Any]:
        """Return the limits as the queue run stores them."""
        rate = self.rate_limit
        return {
            "concurrency": self.concurrency,
            "per_key_concurrency": self.per_key_concurrency,
            "rate_limit": None if rate is None else [rate[0], _duration(rate[1], "window")],
            "priority": bool(self.priority),
        }


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A queue's limits and state, as it last reported them."""

    name: str
    concurrency: int | None
    per_key_concurrency: int | None
    rate_limit: tuple[int, float] | None
    #: Runs waiting and running (None until a worker has run the queue).
    waiting: int | None
    running: int | None
    #: When the run waiting longest was queued (epoch seconds), if any waits.
    oldest: float | None


async def _info(backend: Backend, run: RunInfo) -> QueueInfo | None:
    public = (run.published or {}).get("queue")
    if not isinstance(public, dict):
        # No worker has run the queue yet: its limits are in its start record.
        first = await backend.read_log(run.run_id, 0)
        if not first:
            return None
        start = decode_entry(run.run_id, 0, first[0])[0]["kwargs"]
        public = {"name": start.get("name"), "config": start.get("config"), "waiting": None}
    config = public.get("config") or {}
    rate = config.get("rate_limit")
    waiting, running = public.get("waiting"), public.get("running")
    return QueueInfo(
        name=str(public.get("name")),
        concurrency=config.get("concurrency"),
        per_key_concurrency=config.get("per_key_concurrency"),
        rate_limit=None if rate is None else (int(rate[0]), float(rate[1])),
        waiting=None if waiting is None else int(waiting),
        running=None if running is None else int(running),
        oldest=public.get("oldest"),
    )


async def ensure_queue(backend: Backend, queue: Queue) -> None:
    """Store the queue (create-if-absent), or send it its new limits if they changed."""
    run_id = queue_run_id(queue.name)
    config = queue.config()
    record = start_record(
        run_id, QUEUE_WORKFLOW, None, {"name": queue.name, "config": config}, time.time()
    )
    if await create_run(backend, record):
        return
    info = await backend.get_run(run_id)
    stored = ((info.published if info else None) or {}).get("queue", {}).get("config")
    if stored is None:
        first = await backend.read_log(run_id, 0)
        stored = decode_entry(run_id, 0, first[0])[0]["kwargs"]["config"] if first else None
    if stored != config:
        await _message(
            backend, run_id, f"config.{time.time_ns()}", {"op": "config", "config": config}
        )


async def _message(backend: Backend, queue_id: str, event_id: str, body: dict[str, Any]) -> None:
    data = encode_value({"name": MESSAGE, "value": body})
    await backend.send_event(queue_id, event_id[-200:].lstrip(".-:=+"), data)


async def start_queued(
    backend: Backend,
    record: StartRecord,
    queue: str,
    *,
    key: str | None = None,
    priority: int = 0,
    delay: float = 0.0,
    debounce: float = 0.0,
) -> bool:
    """Create a run parked, then hand it to ``queue``; False if the run existed.

    The hand-over is sent even for an existing run (its event id is fixed),
    so a start retried after a crash between the two writes is not lost.
    """
    queue_id = queue_run_id(queue)
    rec: Any = record
    rec["queue"] = queue
    info = RunInfo(
        record["run_id"],
        record["workflow"],
        "active",
        record["at"],
        record["at"],
        version=record["version"],
        parent=record.get("parent"),
        deadline=record.get("deadline"),
        note=f"waiting in queue {queue!r}",
    )
    created = await store_run(backend, info, encode_entry([dict(record)]), PARKED)
    wait = max(delay, debounce)
    body: dict[str, Any] = {
        "op": "enqueue",
        "run_id": record["run_id"],
        "priority": priority,
        "key": key,
        "at": record["at"],
        "not_before": record["at"] + wait if wait else 0.0,
    }
    if debounce:
        body["debounce"] = f"{record['workflow']}/{key or ''}"
    await _message(backend, queue_id, f"enqueue.{record['run_id']}", body)
    return created


def check_options(
    key: str | None, priority: int, delay: Any, debounce: Any, dedup_id: str | None
) -> tuple[float, float]:
    """Check a queued start's options; return ``delay`` and ``debounce`` in seconds."""
    check_key_priority(key, priority)
    if dedup_id is not None:
        validate_id("dedup id", dedup_id)
    return _duration(delay, "delay="), _duration(debounce, "debounce=")


# -- the worker's side -------------------------------------------------------------


async def admitted(backend: Backend, run_id: str, records: list[tuple[int, Record]]) -> bool:
    """Tell whether a queued run may execute; park it (or end it if cancelled) if not.

    A queued run's log holds only its start record until the queue admits it.
    A cancel sent while it waits ends it at once (create-if-absent at position
    1 decides between that end and the queue's admit).
    """
    if any(position > 0 or r["k"] == "snapshot" for position, r in records):
        return True
    cancelled = any(_event_name(e.data) == CANCEL_EVENT for e in await backend.read_inbox(run_id))
    if cancelled:
        end: Record = {"k": "end", "status": "cancelled", "t": time.time()}
        try:
            await backend.append(run_id, 1, encode_entry([end]))
        except PositionTaken:
            return True  # admitted (or ended) meanwhile: the worker reads the log again
        info = await backend.get_run(run_id)
        start = records[0][1]
        if info is not None:
            await finish_run(backend, info, start, end)
        await released(backend, start, run_id)
        return False
    await backend.schedule(run_id, PARKED)
    # An admit written between our read and the line above made the run due, and we
    # have just parked it: look once more.
    return len(await backend.read_log(run_id, 1)) > 0


def _event_name(data: bytes) -> Any:
    import orjson

    try:
        return orjson.loads(data).get("name")
    except (orjson.JSONDecodeError, AttributeError):
        return None


async def released(backend: Backend, start: Record, run_id: str) -> None:
    """Give a queued run's slot back: tell its queue the run ended (once, by event id)."""
    queue = start.get("queue")
    if isinstance(queue, str):
        await _message(
            backend, queue_run_id(queue), f"done.{run_id}", {"op": "done", "run_id": run_id}
        )


async def list_queues(conductor: Conductor, *, limit: int = 1000) -> list[QueueInfo]:
    """Return the queues stored in the backend with their state."""
    out: list[QueueInfo] = []
    after: str | None = None
    while len(out) < limit:
        page = await conductor.backend.list_runs(
            workflow=QUEUE_WORKFLOW, status="active", limit=500, after=after
        )
        for run in page:
            info = await _info(conductor.backend, run)
            if info is not None:
                out.append(info)
        if len(page) < 500:
            break
        after = page[-1].run_id
    return out[:limit]
