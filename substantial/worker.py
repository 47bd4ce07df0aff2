"""The agent loop: find due runs, lease them, replay them, persist what they do.

A worker keeps each live run's workflow in memory while it holds the run's
lease, so a run that waits N times costs N steps, not N replays. Runs idle
for longer than ``idle_timeout`` are evicted: their workflow is torn down,
their next wake-up time goes back into the due index, and any worker
replays them from the log when they are due again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from substantial import _clock, queues, telemetry
from substantial._durations import seconds
from substantial._effects import RunEffects
from substantial._handback import hand_back
from substantial._held import LiveRun, keep_leases, lease_end, retake
from substantial._live import Driver
from substantial._outcome import Outcome, end_of, finish_run, snapshot_of, start_successor
from substantial._peers import Peers, claim_order
from substantial._repair import effective
from substantial._runs import check_protocol, take_lease
from substantial._steps import Pace
from substantial.backends.base import Backend, Lease, RunInfo, make_owner
from substantial.context import Context
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    CorruptRecord,
    InvalidArgument,
    ProtocolMismatch,
)
from substantial.records import Record, decode_entry, decode_log
from substantial.replay import Evicted, Execution, Fenced
from substantial.retention import Retention, alongside
from substantial.workflow import Registry

__all__ = ["Worker"]

logger = logging.getLogger("substantial.worker")

#: The first and the longest pause before a run whose try failed is taken again.
RUN_RETRY_FIRST = 1.0
RUN_RETRY_MAX = 60.0
#: The first pause of the poll loop when the store is unreachable (it doubles up to
#: ``poll_interval``).
OUTAGE_RETRY_FIRST = 0.25


class Worker:
    """Run due workflows from one backend until stopped."""

    def __init__(
        self,
        registry: Registry,
        backend: Backend,
        *,
        on_ended: Callable[[str], None] | None = None,
        queue_ready: Callable[[str], Awaitable[None]] | None = None,
        concurrency: int = 1000,
        lease_ttl: float = 30.0,
        idle_timeout: float = 60.0,
        poll_interval: float = 5.0,
        shutdown_grace: float = 10.0,
        step_threads: int = 64,
        inline_below: float = 0.001,
        retention: Retention | None = None,
    ) -> None:
        self.registry = registry
        self.retention = retention
        self.backend = backend
        self.on_ended = on_ended or (lambda _run_id: None)
        self.queue_ready = queue_ready  # stores a queue a child is started into
        self.owner = make_owner("w")
        for name, n, least in (("concurrency", concurrency, 1), ("step_threads", step_threads, 0)):
            if not isinstance(n, int) or isinstance(n, bool) or n < least:
                raise InvalidArgument(f"{name}= takes a whole number >= {least}, got {n!r}")
        self.concurrency = concurrency
        # A NaN or infinite lease would be stored unreadable, a NaN poll would spin: refuse them.
        self.lease_ttl = seconds(lease_ttl, "lease_ttl=", positive=True)
        self.idle_timeout = seconds(idle_timeout, "idle_timeout=")
        self.poll_interval = seconds(poll_interval, "poll_interval=", positive=True)
        self.shutdown_grace = seconds(shutdown_grace, "shutdown_grace=")
        inline_below = seconds(inline_below, "inline_below=")
        self.runs: dict[str, LiveRun] = {}
        self._skip_until: dict[str, float] = {}
        #: The due time of each run skipped because its lease was held: due anew, it is tried.
        self._skipped_at: dict[str, float] = {}
        self._next_due: float | None = None
        #: The last poll left due runs for want of room: a run that ends polls again.
        self._short = False
        self._peers = Peers(self.owner)
        self._noted: set[str] = set()
        #: Consecutive failed tries per run, for its backoff; cleared by a try that works.
        self._failures: dict[str, int] = {}
        self._stopping = False
        self._executor = (
            ThreadPoolExecutor(step_threads, thread_name_prefix="substantial-step")
            if step_threads > 0
            else None
        )
        self._pace = Pace(inline_below)

    # -- main loop -------------------------------------------------------------

    async def run(self) -> None:
        """Serve due runs until cancelled; on cancellation, hand back what is held."""
        housekeeping = asyncio.create_task(alongside(self._housekeeping, self))
        try:
            # During an outage: when it began, and the pause before the next try.
            outage: float | None = None
            pause = OUTAGE_RETRY_FIRST
            while not self._stopping:
                try:
                    await self._poll_once()
                    timeout = await self._next_wait()
                    if outage is not None:
                        lasted = asyncio.get_running_loop().time() - outage
                        logger.warning("backend reachable again after %.1fs", lasted)
                        outage, pause = None, OUTAGE_RETRY_FIRST
                    await self.backend.wait_for_work(timeout)
                except BackendUnavailable as exc:
                    # One warning per outage, not one per try: a long outage is no log storm.
                    if outage is None:
                        outage = asyncio.get_running_loop().time()
                        logger.warning("backend unavailable, retrying with backoff: %s", exc)
                    else:
                        logger.debug("backend still unavailable: %s", exc)
                    await asyncio.sleep(pause * random.uniform(0.5, 1.0))
                    pause = min(pause * 2, max(self.poll_interval, OUTAGE_RETRY_FIRST))
        finally:
            self._stopping = True
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            await asyncio.shield(self._shutdown())
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    async def _poll_once(self) -> None:
        now = _clock.now()
        batch = max(64, 2 * self.concurrency) if self.concurrency < 512 else 1024
        wanted: list[tuple[str, float]] = []
        due = await self.backend.due(now, batch)
        self._next_due = due.next_at
        for run_id, at in due:
            live = self.runs.get(run_id)
            if live is not None:
                if at != live.known_at:
                    live.known_at = at
                    if live.driver is not None:
                        live.driver.poke()
            elif self._skip_until.get(run_id, 0.0) <= now or self._skipped_at.get(run_id, at) != at:
                wanted.append((run_id, at))
        room = self.concurrency - len(self.runs)
        wanted = await self._first_choices(wanted, now) if wanted else wanted
        self._short = len(wanted) > room or (due.next_at is not None and due.next_at <= now)
        if not wanted:
            return  # woken for runs held here (an event): they are poked, nothing to take
        wanted = claim_order(self.owner, wanted, room)
        # Side by side: the leases of one poll share a commit (or overlap their round trips).
        taken = await asyncio.gather(*(self._take(r) for r, _ in wanted), return_exceptions=True)
        pairs = sorted(zip(wanted, taken, strict=True), key=lambda pair: pair[1] is not True)
        for (run_id, at), outcome in pairs:  # the runs taken first: a raise strands no lease
            if outcome is True:
                self._skipped_at.pop(run_id, None)
                self._peers.taken(run_id)
                live = self.runs[run_id] = LiveRun(
                    run_id, at, lease_until=lease_end(now, self.lease_ttl)
                )
                live.task = asyncio.create_task(self._drive(live), name=f"substantial:{run_id}")
            elif outcome is False:
                self._skipped_at[run_id] = at
            elif isinstance(outcome, BackendError) and not isinstance(outcome, BackendUnavailable):
                self._set_aside(run_id, outcome)  # one bad record must not stop the worker
            elif isinstance(outcome, BaseException):
                raise outcome  # an outage (or a bug) is the poll loop's to handle

    async def _first_choices(self, wanted: list[tuple[str, float]], now: float) -> list[Any]:
        """Leave other workers' first choices to them; read the leases of those left a while."""
        mine, look = self._peers.split(wanted, now)
        leases = await asyncio.gather(
            *(self.backend.get_lease(r) for r, _ in look), return_exceptions=True
        )
        for (run_id, at), lease in zip(look, leases, strict=True):
            if isinstance(lease, Lease) and lease.owner != self.owner and lease.expires_at > now:
                self._held_elsewhere(run_id, lease, now)
                self._skipped_at[run_id] = at
            else:
                mine.append((run_id, at))  # free, or unreadable: the take decides
        return mine

    async def _take(self, run_id: str) -> bool:
        lease = await take_lease(self.backend, run_id, self.owner, self.lease_ttl)
        if lease is not None and lease.owner == self.owner:
            return True
        self._held_elsewhere(run_id, lease, _clock.now())
        return False

    def _held_elsewhere(self, run_id: str, lease: Lease | None, now: float) -> None:
        """Skip a run another worker holds until its lease expires; note that worker."""
        self._skip_until[run_id] = min(lease.expires_at if lease else now + 1, now + self.lease_ttl)
        if lease is not None:
            self._peers.saw(lease.owner, now)

    def _set_aside(self, run_id: str, exc: BaseException | str, seconds: float = 60.0) -> None:
        if run_id not in self._noted:
            self._noted.add(run_id)
            logger.error("run %s set aside: %s", run_id, exc)
        self._skip_until[run_id] = _clock.now() + seconds

    async def _next_wait(self) -> float:
        nxt = self._next_due  # from the last poll's due(): the run after those it returned
        now = _clock.now()
        wait = self.poll_interval
        if nxt is not None and nxt > now:
            wait = min(wait, nxt - now)
        # Runs set aside (leased elsewhere, backend errors) are retried when their time comes.
        later = [t for t in self._skip_until.values() if t > now]
        deferred = self._peers.next_at(now)
        if deferred is not None:
            later.append(deferred)
        if later:
            wait = min(wait, min(later) - now)
        return max(wait, 0.001)

    async def _housekeeping(self) -> None:
        """Renew leases and forget stale skips; a failure is logged, never the end of it."""
        period = max(0.05, self.lease_ttl / 3)
        while True:
            await asyncio.sleep(period)
            now = _clock.now()
            self._skip_until = {k: v for k, v in self._skip_until.items() if v > now}
            self._peers.forget(now)
            self._skipped_at = {k: v for k, v in self._skipped_at.items() if k in self._skip_until}
            try:
                await keep_leases(self.backend, self, period, now)
            except Exception:
                # Ended, this task would renew no lease again while the worker runs on.
                logger.exception("keeping leases failed; trying again in %.2fs", period)

    # -- one run ---------------------------------------------------------------

    async def _drive(self, live: LiveRun) -> None:
        run_id = live.run_id
        release = True
        try:
            work = self._execute(live)
            await (telemetry.run(work, live) if telemetry.on else work)
            self._failures.pop(run_id, None)
        except asyncio.CancelledError:
            pass
        except Evicted:
            self._failures.pop(run_id, None)
            driver = live.driver
            if not live.lost and driver is not None and not live.parked:
                await self._reschedule(run_id, driver)
        except Fenced:
            logger.info("run %s was extended by another worker; dropped here", run_id)
        except ProtocolMismatch as exc:
            self._set_aside(run_id, exc, 3600.0)
            await self._note(live, str(exc))
        except CorruptRecord as exc:
            self._set_aside(run_id, exc)
            await self._note(live, str(exc))
        except BackendError as exc:
            pause = self._backoff(run_id)
            logger.warning("run %s: backend error, retrying in %.1fs: %s", run_id, pause, exc)
            self._skip_until[run_id] = _clock.now() + pause
        except Exception:
            pause = self._backoff(run_id, first=5.0)
            logger.exception("run %s: unexpected engine error, retrying in %.1fs", run_id, pause)
            self._skip_until[run_id] = _clock.now() + pause
        finally:
            self.runs.pop(run_id, None)
            if release:
                with contextlib.suppress(BackendError):
                    await self.backend.release_lease(run_id, self.owner)
            if self._short:
                self._short = False
                self.backend.waker.notify()

    def _backoff(self, run_id: str, first: float = RUN_RETRY_FIRST) -> float:
        """Return how long to leave a run whose try just failed: doubling, capped, jittered.

        A run whose writes keep failing (a full disk, an outage) is not taken again at
        once: each replay would run its unrecorded steps again. Jitter keeps workers that
        failed together from retrying together.
        """
        failures = self._failures[run_id] = self._failures.get(run_id, 0) + 1
        pause = min(RUN_RETRY_MAX, first * 2.0 ** min(failures - 1, 16))
        return pause * random.uniform(0.5, 1.0)

    async def _note(self, live: LiveRun, note: str) -> None:
        """Say on the run's metadata why it is not progressing."""
        with contextlib.suppress(BackendError):
            info = live.info or await self.backend.get_run(live.run_id)
            if info is not None and info.note != note and info.status == "active":
                await self.backend.put_run(replace(info, note=note, updated_at=_clock.now()))

    async def _execute(self, live: LiveRun) -> None:
        """Load, replay and run one run until it ends or leaves this worker."""
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
            self._skip_until[run_id] = _clock.now() + 1.0
            return
        # The first entry alone, first: older records are not corrupt, only old.
        check_protocol(run_id, decode_entry(run_id, start_at, entries[0]))
        marks = {"snapshot": -1, "repair": -1}
        records = decode_log(run_id, start_at, entries, marks)
        next_position = start_at + len(entries)
        if marks["repair"] >= 0:  # a resume voids what ended the run before it
            records, resumed = effective(records)
            marks["snapshot"] = max(
                (i for i, (_, r) in enumerate(records) if r["k"] == "snapshot"), default=-1
            )
        else:
            resumed = None
        snapshot_index = marks["snapshot"] if marks["snapshot"] >= 0 else None
        if snapshot_index is not None:
            snap = records[snapshot_index][1]
            start = snap["start"]
        elif records[0][1]["k"] == "start":
            start, snap = records[0][1], None
        else:
            raise CorruptRecord(run_id, start_at, "the log does not begin with a start record")
        if resumed is not None:
            start = {**start, "deadline": resumed.get("deadline")}
        if telemetry.on:
            telemetry.joined(start)  # the attempt's span, in the trace the start carries
        if info is None:
            info = RunInfo(
                run_id,
                start["workflow"],
                "active",
                start["at"],
                _clock.now(),
                version=start.get("version"),
                parent=start.get("parent"),
                deadline=start.get("deadline"),
            )
        live.info = info
        if records[-1][1]["k"] == "end":
            # Events recorded before the end but never acknowledged (a crash in between).
            recorded = {r["id"] for _, r in records if r["k"] == "event"}
            inbox = await self.backend.read_inbox(run_id)
            stale = [e.event_id for e in inbox if e.event_id in recorded]
            if stale:
                await self.backend.ack_events(run_id, stale)
            await self._finish(live, start, records[-1][1], recorded)
            return
        if "queue" in start and not await queues.admitted(self.backend, run_id, records):
            return  # waiting for its queue to admit it
        wf = self.registry.lookup(start["workflow"], start.get("version"))
        if wf is None:
            version = start.get("version")
            note = f"waiting for a worker that registers workflow {start['workflow']!r}" + (
                f" (version {version!r})" if version is not None else ""
            )
            self._set_aside(run_id, note)
            await self._note(live, note)
            return
        kwargs: dict[str, Any] = dict(start["kwargs"])
        seen: list[str] = list(start.get("seen") or ())
        keys: dict[str, Any] = {}
        published = dict(info.published or {})
        next_c = 0
        mailbox: list[dict[str, Any]] = []
        if snap is not None:
            kwargs.update(snap.get("kwargs") or {})
            seen = list(snap.get("seen") or seen)
            keys.update(snap.get("keys") or {})
            published.update(snap.get("published") or {})
            next_c = int(snap["next_c"])
            mailbox = list(snap.get("mailbox") or ())
            records = records[snapshot_index + 1 :]  # type: ignore[operator]
        else:
            records = records[1:]
        while True:
            x = Execution(
                run_id,
                records,
                next_position,
                next_c=next_c,
                seen_ids=seen,
                keys=keys,
                published=published,
                started_at=float(start["at"]),
            )
            for m in mailbox:
                x.apply({"k": "event", "id": m["id"], "name": m["name"], "value": m.get("value")})
            ctx = Context(x, run_id, wf.retry)
            effects = RunEffects(self.backend, live, self.queue_ready)
            driver = Driver(
                x,
                self.backend,
                effects,
                executor=self._executor,
                pace=self._pace,
                idle_timeout=self.idle_timeout,
                deadline=start.get("deadline"),
            )
            live.driver = driver
            driver.retake = functools.partial(
                retake, self.backend, live, self.owner, self.lease_ttl
            )
            try:
                await driver.run(functools.partial(wf.fn, ctx, **kwargs))
            finally:
                driver.handback_at = _clock.now() if x.has_work() else x.next_wakeup()
                x.stop()
            outcome: Outcome = end_of(x)
            if outcome.compact is None:
                end = outcome.end
                await driver.flush(end)
                if telemetry.on:
                    telemetry.run_ended(start["workflow"], end["status"])
                if outcome.successor is not None:
                    await start_successor(self.backend, x, start, outcome.successor, end)
                await self._finish(live, start, end, x.seen_ids)
                return
            snapshot = snapshot_of(x, start, {**kwargs, **outcome.compact})
            await driver.flush(snapshot)
            live.info = info = replace(
                live.info or info, log_start=x.position - 1, updated_at=_clock.now()
            )
            await self.backend.put_run(info)
            kwargs, seen, keys = snapshot["kwargs"], snapshot["seen"], dict(x.keys)
            mailbox, records, next_position, next_c = snapshot["mailbox"], [], x.position, x.next_c
            published = dict(x.published)

    async def _finish(self, live: LiveRun, start: Record, end: Record, seen: Any = ()) -> None:
        """Bring metadata, children, parent and due index in step with an ended log."""
        info = live.info
        assert info is not None
        if "queue" in start:  # first: the end is durable, and a waiting run can have the slot
            await queues.released(self.backend, start, info.run_id)
        await finish_run(self.backend, info, start, end, seen)
        self.on_ended(info.run_id)

    # -- waiting, eviction and shutdown -------------------------------------------

    async def _reschedule(self, run_id: str, driver: Driver) -> None:
        until = driver.or_deadline(driver.handback_at)
        await hand_back(self.backend, run_id, until, max(self.poll_interval, OUTAGE_RETRY_FIRST))

    async def _shutdown(self) -> None:
        """Let running steps finish and be recorded (bounded), then hand every run back."""
        for live in list(self.runs.values()):
            if live.driver is not None:
                live.driver.stop()
        tasks = [lv.task for lv in self.runs.values() if lv.task is not None]
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=self.shutdown_grace)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
