"""Run one execution: replay its log, then act live until the workflow ends or leaves.

The :class:`Driver` lives on the worker's real event loop. It steps the
workflow's own loop, starts the I/O of new commands (step functions, timers,
children, sends) as tasks on the real loop, and turns what they produce into
completions. Completions that arrive together are applied one by one, in
order, and written as one entry; a step function only starts once every
completion the workflow had seen before issuing it is durable.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

import orjson

from substantial import _clock, telemetry
from substantial._effects import Effects
from substantial._retry import outlast
from substantial._steps import Pace, Steps
from substantial._writes import WRITE_RETRY_FIRST, WRITE_RETRY_MAX, LogWriter
from substantial.backends.base import Backend
from substantial.errors import BackendUnavailable
from substantial.records import Record, error_of
from substantial.replay import ACTIVATIONS, Command, Evicted, Execution, Fenced, describe

__all__ = ["Driver"]

logger = logging.getLogger("substantial.workflow")

#: How early a timer wakes the loop before its due time, to absorb the loop's lateness.
TIMER_EARLY = 0.002


class Driver(LogWriter):
    """Replays one execution, then runs it live on the worker's loop."""

    def __init__(
        self,
        x: Execution,
        backend: Backend,
        effects: Effects,
        *,
        executor: Executor | None,
        idle_timeout: float,
        deadline: float | None,
        pace: Pace | None = None,
    ) -> None:
        self.x = x
        self.backend = backend
        self.effects = effects
        self.executor = executor
        self.idle_timeout = idle_timeout
        self.deadline = deadline
        self.ready: list[Record] = []
        self.inbox_dirty = True
        self.stop_requested = False
        #: Set when another worker holds the lease: write nothing more.
        self.lost = False
        self.tasks: set[asyncio.Task[None]] = set()
        self.timers: dict[int, asyncio.TimerHandle] = {}
        #: When each armed timer is due, by command number.
        self.timer_due: dict[int, float] = {}
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._wakeup = asyncio.Event()
        self._stopping = asyncio.Event()
        self._bad_events: set[str] = set()
        self._inbox_pause = WRITE_RETRY_FIRST / 2
        self.last_active = time.monotonic()
        #: When the run next needs a worker, as it was when it left this one.
        self.handback_at: float | None = None
        #: The workflow is blocked and nothing of it is ready: the driver sleeps.
        self.waiting = False
        #: Until when the worker surely holds the run's lease, and how to take it again once
        #: it may have lapsed: the worker leaves an idle run's lease to lapse (on S3 each
        #: renewal is a request) after handing the run back to the due index.
        self.lease_until = math.inf
        self.retake: Callable[[], Awaitable[bool]] | None = None
        #: How many times the driver woke from a wait (the worker sees if it ran meanwhile).
        self.wakes = 0
        self.steps = Steps(
            x, executor=executor, pace=pace or Pace(), post=self._post, spawn=self._spawn
        )

    # -- signals from the worker -------------------------------------------------

    def poke(self) -> None:
        """Note that the run's inbox changed."""
        self.inbox_dirty = True
        self._wakeup.set()

    def stop(self, *, lost: bool = False) -> None:
        """Hand the run back at the next chance (shutdown, or the lease was lost)."""
        self.stop_requested = True
        self.lost = self.lost or lost
        self._wakeup.set()
        self._stopping.set()

    def wakes_at(self) -> float | None:
        """When the idle run next needs a worker by itself (a timer, its deadline), if ever."""
        return self.or_deadline(self.x.next_wakeup())

    def or_deadline(self, until: float | None) -> float | None:
        """Return ``until``, or the run's deadline if that comes first (or ``until`` is None)."""
        if self.deadline is not None and not self.x.timed_out:
            return self.deadline if until is None else min(until, self.deadline)
        return until

    @property
    def idle(self) -> bool:
        """Tell whether the run only waits (timers, events): nothing of it runs or is ready."""
        return (
            self.waiting
            and not self.ready
            and not self.x.has_work()
            and not any(not t.done() for t in self.tasks)
        )

    def _post(self, record: Record) -> None:
        self.ready.append(record)
        if self.waiting:  # else the driver looks at ``ready`` before it waits
            self._wakeup.set()

    # -- the whole run -----------------------------------------------------------

    async def run(self, body: Callable[[], Awaitable[Any]], *, live: bool = True) -> None:
        """Run the workflow until its main task is done; raise Evicted/Fenced if it leaves.

        With ``live=False`` only the recorded log is replayed: nothing runs,
        nothing is written, and the workflow is left where the log ends.
        """
        x = self.x

        async def main() -> Any:
            return await body()

        # The workflow's own coroutine becomes the task when it is one: a wrapper would be
        # one more frame at every resume.
        work = body() if inspect.iscoroutinefunction(body) else main()
        x.main = x.loop.create_task(work, name=f"workflow:{x.run_id}")
        try:
            self.step()
            while x.activations and not x.main.done():
                position, record = x.activations.popleft()
                x.apply(record, position)
                self.step()
            if x.activations and x.failure is None:
                position, record = x.activations[0]
                x.nondeterministic(position, describe(record), "the end of the workflow", None)
            if live and not x.main.done() and x.failure is None:
                await self._live()
            elif live:
                await self._ack_recorded()
        finally:
            for handle in self.timers.values():
                handle.cancel()
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            for task in self.tasks:
                task.cancel()

    def step(self) -> None:
        """Run the workflow's loop until every task is blocked; settle interrupts."""
        x = self.x
        loop = x.loop
        loop.run_until_idle()
        while x.sweep_pending and x.sweep():
            loop.run_until_idle()
        if loop.unhandled and x.failure is None:
            x.failure = loop.unhandled[0]

    async def _live(self) -> None:
        x = self.x
        assert x.main is not None
        self._arm_deadline()
        while True:
            items, self.ready = self.ready, []
            if self.inbox_dirty and not self.stop_requested:
                self.inbox_dirty = False
                items += await self._read_events()
            for record in items:
                if x.main.done() or x.failure is not None:
                    break
                kind = record["k"]
                if kind in ACTIVATIONS:
                    if not self._wanted(record):
                        continue
                    x.pending.append(record)
                    if kind == "event":
                        x.to_ack.append(record["id"])
                    x.apply(record)
                    self.step()
                else:
                    x.record(record)
            if x.main.done() or x.failure is not None:
                return
            if self.stop_requested:
                await self._hand_back()
            await self.flush()
            if x.failure is not None:
                return
            self._start_commands()
            if not self.ready and not self.inbox_dirty:
                await self._wait()
                self.wakes += 1
                # Woken after its lease was left to lapse: another worker may have the run.
                if self.lease_until <= _clock.now() and not self.stop_requested:
                    assert self.retake is not None
                    if not await self.retake():
                        self.stop(lost=True)

    def _wanted(self, record: Record) -> bool:
        kind = record["k"]
        if kind == "event":
            return record["id"] not in self.x.seen_ids
        if kind == "timeout":
            return not self.x.timed_out
        command = self.x.commands.get(record["c"])
        return command is not None and not command.done

    async def _wait(self) -> None:
        self._wakeup.clear()
        if self.stop_requested:
            return  # asked during the last write: the loop hands the run back
        busy = any(not t.done() for t in self.tasks)
        self.last_active = time.monotonic()
        self.waiting = True
        try:
            async with asyncio.timeout(None if busy else self.idle_timeout):
                await self._wakeup.wait()
        except TimeoutError:
            if not self.ready and not self.inbox_dirty:
                raise Evicted() from None
        finally:
            self.waiting = False

    async def _hand_back(self) -> None:
        """On stop: let running steps finish and record them (not applied), then leave."""
        if not self.lost:
            running = [t for t in self.tasks if not t.done()]
            if running:
                await asyncio.wait(running)
            for record in self.ready:
                if record["k"] != "timer" and (
                    record["k"] not in ACTIVATIONS or self._wanted(record)
                ):
                    self.x.record(record)
            self.ready = []
            with contextlib.suppress(Fenced):
                await self.flush()
        raise Evicted()

    async def _read_events(self) -> list[Record]:
        x = self.x
        out: list[Record] = []
        try:
            inbox = await self.backend.read_inbox(x.run_id)
        except BackendUnavailable:
            # Read again after a pause; giving the run up would run its steps in flight again.
            self._inbox_pause = min(2 * self._inbox_pause, WRITE_RETRY_MAX)
            loop = asyncio.get_running_loop()
            loop.call_later(self._inbox_pause * random.uniform(0.5, 1.0), self.poke)
            return out
        self._inbox_pause = WRITE_RETRY_FIRST / 2
        for event in inbox:
            if event.event_id in x.seen_ids:
                x.to_ack.append(event.event_id)  # recorded before a crash, never acked
                continue
            try:
                body = orjson.loads(event.data)
                name = body["name"]
                if not isinstance(name, str):
                    raise TypeError("the event name is not a string")
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                if event.event_id not in self._bad_events:
                    self._bad_events.add(event.event_id)
                    logger.error(
                        "run %s: event %r in the inbox is malformed (%s); left, not delivered",
                        x.run_id,
                        event.event_id,
                        exc,
                    )
                continue
            if telemetry.on:
                telemetry.event_delivered(event.posted_at)
            out.append(
                {
                    "k": "event",
                    "id": event.event_id,
                    "name": name,
                    "value": body.get("value"),
                    "t": x.now(),
                }
            )
        return out

    # -- live commands -------------------------------------------------------------

    def _start_commands(self) -> None:
        x = self.x
        commands, x.to_start = x.to_start, []
        for command in commands:
            if command.done or command.started:
                continue
            command.started = True
            if command.kind in ("sleep", "timer", "receive"):
                if command.spec is not None:
                    self._arm(command.c, float(command.spec))
                continue
            if command.kind in ("step", "compensate"):
                self.steps.start(command)
            elif command.kind == "child":
                self._spawn(self._run_child(command))
            else:
                self._spawn(self._run_send(command))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        # Its command would never complete and the run would wait forever: hand the run
        # back instead (a worker takes it up again), and say why where people look.
        if not self.stop_requested:
            logger.error(
                "run %s: the work of one of its commands failed unexpectedly; handing the run "
                "back to be taken up again",
                self.x.run_id,
                exc_info=task.exception(),
            )
        self.stop()

    def _arm(self, c: int, until: float) -> None:
        # The loop wakes up to ~1.4 ms late (epoll counts whole milliseconds, a VM adds
        # slack): aim TIMER_EARLY early, and let _fire finish the wait.
        delay = max(0.0, until - _clock.now() - TIMER_EARLY)
        self.timers[c] = asyncio.get_running_loop().call_later(delay, self._fire, c, until)
        self.timer_due[c] = until

    def _fire(self, c: int, until: float) -> None:
        left = until - _clock.now()
        if left > 0:
            loop = asyncio.get_running_loop()
            if left > TIMER_EARLY or not _quiet(loop, left):
                # Other work is ready or due meanwhile: do not hold it up, come back (never
                # spin; the loop may then be late by up to TIMER_EARLY).
                self.timers[c] = loop.call_later(left, self._fire, c, until)
                return
            # Nothing else is ready or due before then: sleeping the rest (under
            # TIMER_EARLY, no CPU) is both punctual and free.
            time.sleep(left)
        self.timers.pop(c, None)
        self.timer_due.pop(c, None)
        self._post({"k": "timer", "c": c, "t": self.x.now()})

    def rearm(self) -> None:
        """Arm the run's timers and deadline again: the clock jumped (time-skipping tests)."""
        for c, until in list(self.timer_due.items()):
            handle = self.timers.pop(c, None)
            if handle is not None:
                handle.cancel()
                self._arm(c, until)
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._arm_deadline()

    def _arm_deadline(self) -> None:
        if self.deadline is None or self.x.timed_out:
            return
        delay = max(0.0, self.deadline - _clock.now())
        self._deadline_timer = asyncio.get_running_loop().call_later(
            delay, lambda: self._post({"k": "timeout", "t": self.x.now()})
        )

    async def _run_child(self, command: Command) -> None:
        record: Record = {"k": "child", "c": command.c, "name": command.name}
        try:
            # An outage is no failure of the start, to be recorded: wait it out.
            record["run_id"] = await outlast(
                lambda: self.effects.start_child(self.x, command), stopping=self._stopping
            )
        except Exception as exc:
            record["run_id"] = str(command.spec.run_id)
            record["error"] = error_of(exc)
        record["t"] = self.x.now()
        self._post(record)

    async def _run_send(self, command: Command) -> None:
        run_id, event_id, name, value = command.spec
        record: Record = {"k": "sent", "c": command.c}
        try:
            await outlast(
                lambda: self.effects.send(run_id, event_id, name, value), stopping=self._stopping
            )
        except Exception as exc:
            record["error"] = error_of(exc)
        record["t"] = self.x.now()
        self._post(record)


def _quiet(loop: asyncio.AbstractEventLoop, seconds: float) -> bool:
    """Tell whether no callback is ready and no timer of ``loop`` is due within ``seconds``.

    Then blocking the loop that long holds up nothing but I/O that arrives meanwhile.
    Another timer due before (a worker with many sleeping runs) must not wait behind it.
    """
    ready = getattr(loop, "_ready", None)
    scheduled = getattr(loop, "_scheduled", None)
    if ready is None or scheduled is None or ready:
        return False
    return not scheduled or scheduled[0].when() > loop.time() + seconds
