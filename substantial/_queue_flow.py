"""The built-in workflow that admits the runs of one queue.

A queue is a run with id ``queue:<name>`` of the workflow
``substantial.queue``. Runs started into the queue are created parked (due
at a time no worker reaches) and announce themselves to it with an
``enqueue`` event; a run that ends sends it ``done``. The queue run keeps the
waiting runs in priority order (FIFO within a priority) and admits a run by
writing an ``admit`` record at position 1 of the run's log (create-if-absent:
a run is admitted once) and making it due. A worker only executes a queued
run whose log goes past its start record, so at no instant do more runs of
the queue execute than its limits allow: a slot is taken by the admit write
and given back by the ``done`` the run's end sends, with no clock involved.
The log of the queue run is the one place its decisions are made, fenced by
create-if-absent like any run's: two workers can never both admit.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import heapq
import math
import time
from typing import Any

from substantial._outcome import finish_run
from substantial.backends.base import TERMINAL_STATUSES, Backend
from substantial.context import Context
from substantial.errors import PositionTaken
from substantial.records import decode_entry, encode_entry
from substantial.workflow import Workflow

__all__ = ["MESSAGE", "QUEUE_WORKFLOW", "queue_workflow"]

QUEUE_WORKFLOW = "substantial.queue"
#: The event name of every message sent to a queue run.
MESSAGE = "substantial.queue.message"
#: Most runs admitted by one step.
BATCH = 256
#: Seconds between two publications of a busy queue's figures.
PUBLISH_EVERY = 1.0


async def admit_runs(backend: Backend, queue: str, run_ids: list[str], at: float) -> list[str]:
    """Admit each run (``admit`` at position 1, then due now); return those that are gone.

    Idempotent: a run already admitted (this step ran before a crash) is
    still running; one whose position 1 holds anything else has ended
    (cancelled while it waited, or collapsed by a debounce).
    """
    entry = encode_entry([{"k": "admit", "queue": queue, "t": at}])

    async def admit(run_id: str) -> str:
        try:
            await backend.append(run_id, 1, entry)
        except PositionTaken:
            info = await backend.get_run(run_id)
            if info is None or info.status in TERMINAL_STATUSES:
                return "gone"
            second = await backend.read_log(run_id, 1)
            kinds = [r["k"] for r in decode_entry(run_id, 1, second[0])] if second else []
            if "admit" not in kinds:
                return "gone"
        await backend.schedule(run_id, time.time())
        return "running"

    # Side by side: on a store with slow requests (S3) a batch costs one round trip, not many.
    outcomes = await asyncio.gather(*(admit(run_id) for run_id in run_ids))
    return [run_id for run_id, what in zip(run_ids, outcomes, strict=True) if what == "gone"]


async def collapse(backend: Backend, old: str, new: str) -> bool:
    """End a waiting run as continued by ``new`` (a debounce); False if it was admitted first."""
    end = {"k": "end", "status": "continued", "next": new, "t": time.time()}
    try:
        await backend.append(old, 1, encode_entry([end]))
    except PositionTaken:
        return False
    info = await backend.get_run(old)
    first = await backend.read_log(old, 0)
    if info is not None and first:
        await finish_run(backend, info, decode_entry(old, 0, first[0])[0], end)
    return True


class _State:
    """The queue's waiting, delayed and running runs (rebuilt from its log on replay)."""

    def __init__(self, name: str, config: dict[str, Any], saved: dict[str, Any] | None) -> None:
        self.name = name
        self.config = config
        saved = saved or {}
        #: run id -> [priority, seq, key, not_before, debounce key, enqueued at]
        self.entries: dict[str, list[Any]] = dict(saved.get("entries", {}))
        self.running: dict[str, str | None] = dict(saved.get("running", {}))
        self.admitted: collections.deque[float] = collections.deque(saved.get("admitted", ()))
        self.seq = int(saved.get("seq", 0))
        self.debounced: dict[str, str] = dict(saved.get("debounced", {}))
        self.heap: list[tuple[int, int, str]] = []
        self.delayed: list[tuple[float, int, str]] = []
        self.blocked: dict[str, list[tuple[int, int, str]]] = {}
        self.per_key: collections.Counter[str] = collections.Counter(
            k for k in self.running.values() if k is not None
        )
        self.requeue()

    def requeue(self) -> None:
        """Rebuild the orders from the entries (on a restart, or once the limits change)."""
        self.heap, self.blocked = [], {}
        self.delayed = [(e[3], e[1], run_id) for run_id, e in self.entries.items()]
        heapq.heapify(self.delayed)

    def saved(self) -> dict[str, Any]:
        return {
            "entries": self.entries,
            "running": self.running,
            "admitted": list(self.admitted),
            "seq": self.seq,
            "debounced": self.debounced,
        }

    def _order(self, prio: int, seq: int, run_id: str) -> tuple[int, int, str]:
        return (-prio if self.config.get("priority", True) else 0, seq, run_id)

    def enqueue(self, msg: dict[str, Any], now: float) -> str | None:
        """Add a run; return the id of a waiting run its debounce replaces, if any."""
        run_id = str(msg["run_id"])
        if run_id in self.entries or run_id in self.running:
            return None
        self.seq += 1
        prio, key = int(msg.get("priority") or 0), msg.get("key")
        not_before = float(msg.get("not_before") or 0.0)
        dkey = msg.get("debounce")
        self.entries[run_id] = [prio, self.seq, key, not_before, dkey, float(msg.get("at") or now)]
        heapq.heappush(self.delayed, (not_before, self.seq, run_id))
        if dkey is None:
            return None
        previous = self.debounced.get(dkey)
        self.debounced[dkey] = run_id
        return previous if previous in self.entries else None

    def drop(self, run_id: str) -> None:
        """Forget a run that will not run (collapsed or ended while waiting)."""
        entry = self.entries.pop(run_id, None)
        if entry is not None and entry[4] is not None and self.debounced.get(entry[4]) == run_id:
            del self.debounced[entry[4]]

    def done(self, run_id: str) -> None:
        key = self.running.pop(run_id, "\0absent")
        if key == "\0absent":
            self.drop(run_id)
            return
        if key is not None:
            self.per_key[key] -= 1
            for item in self.blocked.pop(key, []):
                heapq.heappush(self.heap, item)

    def _ripen(self, now: float) -> None:
        while self.delayed and self.delayed[0][0] <= now:
            _nb, seq, run_id = heapq.heappop(self.delayed)
            entry = self.entries.get(run_id)
            if entry is not None:
                heapq.heappush(self.heap, self._order(entry[0], seq, run_id))

    def choose(self, now: float) -> tuple[list[str], float | None]:
        """Pick the runs to admit now; return them and when to look again (None: on news)."""
        self._ripen(now)
        limit = self.config.get("concurrency")
        per_key = self.config.get("per_key_concurrency")
        rate = self.config.get("rate_limit")
        window = float(rate[1]) if rate else 0.0
        if rate:
            while len(self.admitted) > int(rate[0]):
                self.admitted.popleft()
        chosen: list[str] = []
        retry: float | None = None
        while self.heap and len(chosen) < BATCH:
            if limit is not None and len(self.running) >= limit:  # chosen ones included
                break
            if rate and len(self.admitted) >= int(rate[0]):
                free_at = self.admitted[0] + window
                if free_at > now:
                    retry = free_at
                    break
            item = heapq.heappop(self.heap)
            run_id = item[2]
            entry = self.entries.get(run_id)
            if entry is None:
                continue  # dropped while it waited
            key = entry[2]
            if key is not None and per_key is not None:
                if self.per_key[key] >= per_key:
                    self.blocked.setdefault(key, []).append(item)
                    continue
                self.per_key[key] += 1
            chosen.append(run_id)
            self.running[run_id] = key
            del self.entries[run_id]
            if entry[4] is not None and self.debounced.get(entry[4]) == run_id:
                del self.debounced[entry[4]]
            if rate:
                self.admitted.append(now)
                if len(self.admitted) > int(rate[0]):
                    self.admitted.popleft()
        if self.delayed:
            nb = self.delayed[0][0]
            retry = nb if retry is None else min(retry, nb)
        return chosen, retry

    def has_room(self) -> bool:
        """Tell whether a slot is free (rate and keys aside)."""
        limit = self.config.get("concurrency")
        return limit is None or len(self.running) < limit

    def stats(self) -> dict[str, Any]:
        # Entries keep their arrival order: the first one left is the oldest.
        oldest = next(iter(self.entries.values()))[5] if self.entries else None
        return {
            "name": self.name,
            "config": self.config,
            "waiting": len(self.entries),
            "running": len(self.running),
            "oldest": oldest,
        }


def _shape(stats: dict[str, Any] | None) -> tuple[bool, bool] | None:
    """Whether runs wait, and whether runs run: what a publication must not lag on."""
    return None if stats is None else (stats["waiting"] > 0, stats["running"] > 0)


def queue_workflow(backend: Backend) -> Workflow[None]:
    """Build the queue workflow; its steps admit runs on ``backend``."""

    async def body(
        c: Context,
        name: str,
        config: dict[str, Any],
        state: dict[str, Any] | None = None,
        pending: list[Any] | None = None,
    ) -> None:
        s = _State(name, config, state)
        inbox: list[Any] = list(pending or ())
        c.handle(MESSAGE, inbox.append)
        handled = 0
        published: dict[str, Any] | None = None
        published_at = -math.inf
        woken = False
        while handled < max(2000, 4 * (len(s.entries) + len(s.running))):
            if woken and s.has_room() and inbox[0].get("op") == "enqueue":
                # Woken by the first new run of a delivery, with room for it: let the driver
                # deliver the rest (a zero timer completes after them), so that one turn
                # chooses among them all and a backlog is admitted in priority order.
                await c.sleep(0)
            woken = False
            now = c.now().timestamp()
            batch, inbox[:] = list(inbox), []
            handled += len(batch) + 1
            for msg in batch:
                if not isinstance(msg, dict):
                    continue
                kind = msg.get("op")
                if kind == "enqueue" and isinstance(msg.get("run_id"), str):
                    replaced = s.enqueue(msg, now)
                    if replaced is not None:
                        fold = functools.partial(collapse, backend, replaced, msg["run_id"])
                        await c.save(fold, name="debounce")
                        s.drop(replaced)
                elif kind == "done" and isinstance(msg.get("run_id"), str):
                    s.done(msg["run_id"])
                elif kind == "config" and isinstance(msg.get("config"), dict):
                    s.config = msg["config"]
                    s.requeue()
            chosen, retry = s.choose(now)
            if chosen:
                step = functools.partial(admit_runs, backend, name, chosen, now)
                for run_id in await c.save(step, name="admit"):
                    s.done(run_id)  # ended while it waited: it holds no slot
            stats = s.stats()
            # Published for people (queues list) at most once a second while the queue is
            # busy, so a busy queue does not pay a write per turn; at once when runs start
            # or stop waiting or running, so the figures never say idle when it is not.
            if stats != published:
                if now - published_at >= PUBLISH_EVERY or _shape(stats) != _shape(published):
                    c.publish("queue", stats)
                    published, published_at = stats, now
                else:
                    later = published_at + PUBLISH_EVERY
                    retry = later if retry is None else min(retry, later)
            if chosen or inbox:
                continue
            if retry is None:
                await c.ensure(lambda: bool(inbox))
            else:
                try:
                    async with asyncio.timeout(max(0.0, retry - now)):
                        await c.ensure(lambda: bool(inbox))
                except TimeoutError:
                    pass
            woken = bool(inbox) and isinstance(inbox[0], dict)
        # ``inbox`` itself, not a copy: compact() hands the handler what arrived just before
        # it snapshots, and the snapshot must carry those messages.
        await c.compact(state=s.saved(), pending=inbox)

    return Workflow(fn=body, name=QUEUE_WORKFLOW)
