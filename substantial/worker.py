"""The agent loop: find due runs, lease them, replay them, persist what they do.

A worker keeps each live run's coroutine in memory while it holds the
run's lease, so a run that waits N times costs N steps, not N replays.
Runs idle for longer than ``idle_timeout`` are evicted: their coroutine is
dropped, their next wake-up time goes back into the due index, and any
worker replays them from the log when they are due again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from substantial.backends.base import Backend, RunInfo, make_owner
from substantial.context import Context
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    CorruptRecord,
    NonDeterminismError,
    SerializationError,
)
from substantial.records import Record, decode_entry, encode_entry, encode_value
from substantial.replay import (
    Cancelled,
    Compact,
    ContinueAs,
    Delivered,
    Evicted,
    Execution,
    Fenced,
    Reverted,
)

if TYPE_CHECKING:
    from substantial.conductor import Conductor
    from substantial.workflow import Workflow

__all__ = ["Worker"]

logger = logging.getLogger("substantial.worker")

#: How early a timer is armed before its due time, to absorb the event loop's lateness.
TIMER_EARLY = 0.002

#: How many consumed event ids a snapshot remembers, to drop late duplicate sends.
SEEN_IDS_KEPT = 10_000


@dataclass
class LiveRun:
    """A run this worker holds: its lease, its task and its replay state."""

    run_id: str
    known_at: float
    task: asyncio.Task[None] | None = None
    execution: Execution | None = None
    timer: asyncio.TimerHandle | None = None
    #: Another worker took the lease: hand nothing back to the due index.
    lost: bool = False


def error_text(exc: BaseException) -> str:
    """Render an exception as ``Type: message`` for run metadata."""
    return f"{type(exc).__name__}: {exc}"


class Worker:
    """Run due workflows from one backend until stopped."""

    def __init__(
        self,
        conductor: Conductor,
        *,
        concurrency: int = 1000,
        lease_ttl: float = 30.0,
        idle_timeout: float = 60.0,
        poll_interval: float = 5.0,
        shutdown_grace: float = 10.0,
    ) -> None:
        self.conductor = conductor
        self.backend: Backend = conductor.backend
        self.owner = make_owner("w")
        self.concurrency = concurrency
        self.lease_ttl = lease_ttl
        self.idle_timeout = idle_timeout
        self.poll_interval = poll_interval
        self.shutdown_grace = shutdown_grace
        self.runs: dict[str, LiveRun] = {}
        self._skip_until: dict[str, float] = {}
        self._missing: set[tuple[str, str | None]] = set()
        self._stopping = False

    # -- main loop -------------------------------------------------------------

    async def run(self) -> None:
        """Serve due runs until cancelled; on cancellation, hand back what is held."""
        housekeeping = asyncio.create_task(self._housekeeping())
        try:
            while not self._stopping:
                try:
                    await self._poll_once()
                    timeout = await self._next_wait()
                except BackendUnavailable as exc:
                    logger.warning("backend unavailable, retrying: %s", exc)
                    timeout = min(self.poll_interval, 1.0)
                await self.backend.wait_for_work(timeout)
        finally:
            self._stopping = True
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            await asyncio.shield(self._shutdown())

    async def _poll_once(self) -> None:
        now = time.time()
        batch = max(64, 2 * self.concurrency) if self.concurrency < 512 else 1024
        for run_id, at in await self.backend.due(now, batch):
            live = self.runs.get(run_id)
            if live is not None:
                if at != live.known_at:
                    live.known_at = at
                    if live.execution is not None:
                        live.execution.poke()
                continue
            if len(self.runs) >= self.concurrency:
                break
            if self._skip_until.get(run_id, 0.0) > now:
                continue
            if await self.backend.try_lease(run_id, self.owner, self.lease_ttl):
                live = LiveRun(run_id, at)
                self.runs[run_id] = live
                live.task = asyncio.create_task(self._drive(live), name=f"substantial:{run_id}")
            else:
                lease = await self.backend.get_lease(run_id)
                retry = lease.expires_at if lease is not None else now + 1.0
                self._skip_until[run_id] = min(retry, now + self.lease_ttl)

    async def _next_wait(self) -> float:
        nxt = await self.backend.next_due_at()
        now = time.time()
        wait = self.poll_interval
        if nxt is not None and nxt > now:
            wait = min(wait, nxt - now)
        # Runs set aside (leased elsewhere, backend errors) are retried when their time comes.
        later = [t for t in self._skip_until.values() if t > now]
        if later:
            wait = min(wait, min(later) - now)
        return max(wait, 0.001)

    async def _housekeeping(self) -> None:
        """Renew leases, forget stale skips and evict idle runs."""
        period = max(0.05, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(min(period, self.idle_timeout / 2))
            now = time.time()
            self._skip_until = {k: v for k, v in self._skip_until.items() if v > now}
            for live in list(self.runs.values()):
                x = live.execution
                if (
                    x is not None
                    and x.waiting is not None
                    and time.monotonic() - x.last_active > self.idle_timeout
                ):
                    await self._evict(live)
                    continue
                try:
                    held = await self.backend.acquire_lease(live.run_id, self.owner, self.lease_ttl)
                except BackendError as exc:
                    logger.warning("could not renew lease of %s: %s", live.run_id, exc)
                    continue
                if not held and live.execution is not None:
                    logger.warning("lost the lease of run %s; dropping it", live.run_id)
                    live.lost = True
                    live.execution.stop()

    # -- one run ---------------------------------------------------------------

    async def _drive(self, live: LiveRun) -> None:
        run_id = live.run_id
        release = True
        try:
            release = await self._execute(live)
        except asyncio.CancelledError:
            pass
        except Evicted:
            x = live.execution
            if not live.lost and x is not None and x.stopped_waiting is not None:
                await self._reschedule(run_id, x.stopped_waiting[0])
        except Fenced:
            logger.info("run %s was extended by another worker; dropped here", run_id)
        except CorruptRecord as exc:
            logger.error("%s", exc)
            await self._note_error(run_id, exc)
            await self.backend.schedule(run_id, time.time() + 60)
        except BackendError as exc:
            logger.warning("run %s: backend error, will retry: %s", run_id, exc)
            self._skip_until[run_id] = time.time() + 1.0
        except Exception:
            logger.exception("run %s: unexpected engine error", run_id)
        finally:
            if live.timer is not None:
                live.timer.cancel()
            self.runs.pop(run_id, None)
            if release:
                with contextlib.suppress(BackendError):
                    await self.backend.release_lease(run_id, self.owner)

    async def _note_error(self, run_id: str, exc: BaseException) -> None:
        with contextlib.suppress(BackendError):
            info = await self.backend.get_run(run_id)
            if info is not None:
                await self.backend.put_run(info.with_status(info.status, error=error_text(exc)))

    async def _execute(self, live: LiveRun) -> bool:
        """Load, replay and run one run; return whether to release its lease."""
        run_id = live.run_id
        info = await self.backend.get_run(run_id)
        start_at = info.log_start if info is not None else 0
        entries = await self.backend.read_log(run_id, start_at)
        if start_at and not (
            entries
            and any(r["k"] == "snapshot" for r in decode_entry(run_id, start_at, entries[0]))
        ):
            start_at, entries = 0, await self.backend.read_log(run_id)
        if not entries:
            # Created by a start that has not written its first entry yet, or never will.
            self._skip_until[run_id] = time.time() + 1.0
            return True
        records: list[tuple[int, Record]] = []
        for i, data in enumerate(entries):
            records.extend((start_at + i, r) for r in decode_entry(run_id, start_at + i, data))
        next_position = start_at + len(entries)
        start = next(r for _, r in records if r["k"] == "start") if start_at == 0 else None
        snapshot_index = max(
            (i for i, (_, r) in enumerate(records) if r["k"] == "snapshot"), default=None
        )
        if start is None and snapshot_index is not None:
            start = records[snapshot_index][1]["start"]
        if start is None:
            raise CorruptRecord(run_id, start_at, "the log does not begin with a start record")
        if info is None:
            now = time.time()
            info = RunInfo(
                run_id,
                start["workflow"],
                "active",
                start.get("at", now),
                now,
                version=start.get("version"),
            )
        end = records[-1][1]
        if end["k"] == "end":
            await self._finish_metadata(info, end)
            return True
        wf = self.conductor.lookup(start["workflow"], start.get("version"))
        if wf is None:
            key = (start["workflow"], start.get("version"))
            if key not in self._missing:
                self._missing.add(key)
                logger.warning(
                    "run %s needs workflow %r version %r, which this worker has not registered; "
                    "leaving it for a worker that has",
                    run_id,
                    key[0],
                    key[1],
                )
            self._skip_until[run_id] = time.time() + 60
            return True
        kwargs: dict[str, Any] = dict(start.get("kwargs") or {})
        # A successor inherits its predecessor's consumed ids: a resend is not a new event.
        seen: list[str] = list(start.get("seen") or ())
        keys: dict[str, Any] = {}
        mailbox: list[Delivered] = []
        if snapshot_index is not None:
            snap = records[snapshot_index][1]
            kwargs.update(snap.get("kwargs") or {})
            seen = list(snap.get("seen") or seen)
            keys.update(snap.get("keys") or {})
            mailbox = [
                Delivered(m["id"], m["name"], m.get("value")) for m in snap.get("mailbox", ())
            ]
            records = records[snapshot_index + 1 :]
        else:
            records = [(p, r) for p, r in records if r["k"] != "start"]
        while True:
            x = Execution(self.backend, run_id, records, next_position, seen_ids=seen, keys=keys)
            x.mailbox = mailbox
            x.on_suspend = functools.partial(self._on_suspend, live)
            live.execution = x
            outcome = await self._run_function(wf, x, kwargs, info)
            if not isinstance(outcome, Compact):
                return outcome
            snapshot: dict[str, Any] = {
                "k": "snapshot",
                "start": start,
                "kwargs": {**kwargs, **outcome.kwargs},
                "keys": x.keys,
                # Ids guard against a sender retrying an event already consumed; keep the latest.
                "seen": list(x.seen_ids)[-SEEN_IDS_KEPT:],
                "mailbox": [
                    {"id": m.event_id, "name": m.name, "value": m.value} for m in x.mailbox
                ],
            }
            await x.flush(snapshot)
            info = replace(info, log_start=x.position - 1, updated_at=time.time())
            await self.backend.put_run(info)
            kwargs, seen, keys, records = snapshot["kwargs"], snapshot["seen"], dict(x.keys), []
            mailbox = list(x.mailbox)
            next_position = x.position

    async def _run_function(
        self, wf: Workflow[Any], x: Execution, kwargs: dict[str, Any], info: RunInfo
    ) -> bool | Compact:
        """Run the workflow to its end or next eviction; return whether to release, or a Compact."""
        c = Context(x, x.run_id)
        end: Record
        try:
            value = await wf.fn(c, **kwargs)
            x.check_health()
            try:
                encode_value(value)
                end = {"k": "end", "status": "completed", "value": value}
            except SerializationError as exc:
                end = {"k": "end", "status": "failed", "error": _err(exc)}
        except Compact as compact:
            x.check_health()
            return compact
        except Cancelled:
            end = {"k": "end", "status": "cancelled"}
        except Reverted:
            end = {"k": "end", "status": "reverted"}
        except ContinueAs as cont:
            x.check_health()
            end = await self._continue(x, info, cont)
        except (Fenced, Evicted, asyncio.CancelledError, BackendError):
            raise
        except NonDeterminismError as exc:
            end = {"k": "end", "status": "failed", "error": _err(exc)}
        except Exception as exc:
            end = {"k": "end", "status": "failed", "error": _err(x.nondeterminism or exc)}
        if (
            x.nondeterminism is not None
            and end.get("error", {}).get("type") != "NonDeterminismError"
        ):
            end = {"k": "end", "status": "failed", "error": _err(x.nondeterminism)}
        if x.replaying and x.nondeterminism is None:
            # The log holds more than this code produced: that is a divergence too.
            end = {
                "k": "end",
                "status": "failed",
                "error": _err(x.fail_nondeterministic("the end of the workflow")),
            }
            x.cursor = len(x.records)
        await x.flush(end)
        await self._finish_metadata(info, end)
        return True

    async def _continue(self, x: Execution, info: RunInfo, cont: ContinueAs) -> Record:
        next_id = _successor_id(x.run_id)
        forwarded = {d.event_id for d in x.mailbox}
        seen = [i for i in x.seen_ids if i not in forwarded][-SEEN_IDS_KEPT:]
        await self.conductor._create(cont.workflow, cont.version, cont.kwargs, next_id, seen=seen)
        # Events that arrived for this run and were never consumed go to its successor.
        for delivered in x.mailbox:
            body = encode_value({"name": delivered.name, "value": delivered.value})
            await self.backend.send_event(next_id, delivered.event_id, body)
        for event in await self.backend.read_inbox(x.run_id):
            if event.event_id not in x.seen_ids:
                await self.backend.send_event(next_id, event.event_id, event.data)
        return {"k": "end", "status": "continued", "next": next_id}

    async def _finish_metadata(self, info: RunInfo, end: Record) -> None:
        status = end["status"]
        error = None
        output: Any = None
        if status == "completed":
            output = end.get("value")
        elif status == "continued":
            output = {"next": end["next"]}
        elif status == "failed":
            err = end.get("error") or {}
            error = f"{err.get('type')}: {err.get('message')}"
        await self.backend.put_run(info.with_status(status, error=error, output=output))
        await self.backend.unschedule(info.run_id)
        if status == "continued":
            # A sender that saw this run active may have posted after the forwarding in
            # _continue; now that the status says "continued", senders forward themselves.
            for event in await self.backend.read_inbox(info.run_id):
                await self.backend.send_event(end["next"], event.event_id, event.data)
        self.conductor._run_ended(info.run_id)

    # -- waiting, eviction and shutdown -------------------------------------------

    def _on_suspend(self, live: LiveRun, x: Execution) -> None:
        if live.timer is not None:
            live.timer.cancel()
            live.timer = None
        waiting = x.waiting
        if waiting is not None and waiting.until is not None:
            loop = asyncio.get_running_loop()
            # The loop's timers wake up to a millisecond late (epoll rounds up), so
            # aim a millisecond early and finish the wait in _fire.
            delay = max(0.0, waiting.until - time.time() - TIMER_EARLY)
            live.timer = loop.call_later(delay, self._fire, live, x, waiting.until)

    def _fire(self, live: LiveRun, x: Execution, until: float) -> None:
        if time.time() >= until:
            live.timer = None
            x.wake()
        else:
            live.timer = asyncio.get_running_loop().call_later(0, self._fire, live, x, until)

    async def _evict(self, live: LiveRun) -> None:
        """Drop an idle run's coroutine; it hands its wake-up time back to the due index.

        The run stops inside its wait (raising ``Evicted``), never by task
        cancellation, so the workflow's ``finally`` blocks cannot record anything.
        """
        x = live.execution
        if x is None or x.waiting is None or live.task is None:
            return
        x.stop()
        await asyncio.wait([live.task])

    async def _reschedule(self, run_id: str, until: float | None) -> None:
        if until is not None:
            await self.backend.schedule(run_id, until)
        else:
            await self.backend.unschedule(run_id)
        # An event posted between our last inbox read and this write must not wait for the
        # timer (or, with no timer, forever): its own schedule may have been overwritten.
        if await self.backend.read_inbox(run_id):
            await self.backend.schedule(run_id, time.time())

    async def _shutdown(self) -> None:
        """Let running steps finish and be recorded (bounded), then hand every run back."""
        for live in list(self.runs.values()):
            if live.execution is not None:
                live.execution.stop()
        tasks = [lv.task for lv in self.runs.values() if lv.task is not None]
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=self.shutdown_grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)


def _err(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


def _successor_id(run_id: str) -> str:
    base, sep, gen = run_id.rpartition("+")
    if sep and gen.isdigit():
        return f"{base}+{int(gen) + 1}"
    return f"{run_id}+1"


def encode_start(
    run_id: str,
    workflow: str,
    version: str | None,
    kwargs: dict[str, Any],
    at: float,
    seen: list[str] | None = None,
) -> bytes:
    """Encode the first entry of a run; ``seen`` carries a predecessor's consumed event ids."""
    record: Record = {
        "k": "start",
        "run_id": run_id,
        "workflow": workflow,
        "version": version,
        "kwargs": kwargs,
        "at": at,
    }
    if seen:
        record["seen"] = seen
    return encode_entry([record])
