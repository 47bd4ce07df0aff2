"""Drive one workflow against its log: commands, completions, replay, then live.

Every primitive call is a *command*, numbered in the order the workflow
issues it. What a command produces is recorded with its number ``c``:

* *activations* complete something the workflow waits for (``step``,
  ``timer``, ``child``, ``sent``, ``compensated``) or bring in something from
  outside (``event``, ``timeout``); each carries ``t``, the time it was
  recorded, which is the workflow's clock from then on;
* *bound* records are read back when the command is issued again
  (``sleep`` with its due time, ``attempt``, ``now``, ``random``, ``log``...).

The workflow's code runs on a :class:`~substantial._loop.WorkflowLoop`. On
replay, activations are applied in the order the log holds them, each only
once every task of the workflow is blocked; live, they are applied in the
order they happen and recorded in that order. So the same commands are
issued in the same order, whatever the interleaving was. Nothing here knows
how the log is stored; the I/O of live commands is in :mod:`substantial._live`.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from substantial import _clock
from substantial._commands import (
    ACTIVATIONS,
    Command,
    Compensation,
    Delivered,
    Recorded,
    command_of,
    describe,
)
from substantial._loop import WorkflowLoop
from substantial._signals import (
    Cancelled,
    Compact,
    ContinueAs,
    ControlFlow,
    Evicted,
    Fenced,
    Reverted,
)
from substantial.errors import NonDeterminismError, WorkflowTimeout
from substantial.records import Record

__all__ = [
    "ACTIVATIONS",
    "CANCEL_EVENT",
    "CHILD_EVENT",
    "Cancelled",
    "Command",
    "Compact",
    "Compensation",
    "ContinueAs",
    "ControlFlow",
    "Delivered",
    "Evicted",
    "Execution",
    "Fenced",
    "Reverted",
    "describe",
]

#: Reserved event name that cancels a run.
CANCEL_EVENT = "substantial.cancel"
#: Reserved event name that reports a child run's end to its parent.
CHILD_EVENT = "substantial.child"


class Execution:
    """The replay state of one run inside one worker."""

    def __init__(
        self,
        run_id: str,
        records: list[tuple[int, Record]],
        next_position: int,
        *,
        next_c: int = 0,
        seen_ids: list[str] | None = None,
        keys: dict[str, Any] | None = None,
        published: dict[str, Any] | None = None,
        started_at: float = 0.0,
    ) -> None:
        self.run_id = run_id
        self.position = next_position
        self.loop = WorkflowLoop(self)  # type: ignore[abstract]
        self.loop.now = started_at
        self.next_c = next_c
        self.recorded: dict[int, Recorded] = {}
        #: One past the highest command number the log holds: below it, the run replays.
        self.history_end = 0
        #: Changes asked about with ``patched``, and the branch each took.
        self.patches: dict[str, bool] = {}
        self.activations: collections.deque[tuple[int, Record]] = collections.deque()
        self.seen_ids: dict[str, None] = dict.fromkeys(seen_ids or ())
        for position, record in records:
            self._index(position, record)
        self.pending: list[Record] = []
        #: ``pending`` holds a timer's due time (checked before it is written).
        self.sleeps_pending = False
        self.to_ack: list[str] = []
        self.commands: dict[int, Command] = {}
        #: The command number of each live asyncio timer, by ``id()`` of its handle.
        self.timer_commands: dict[int, int] = {}
        #: Commands issued live whose I/O the worker has not started yet.
        self.to_start: list[Command] = []
        self.mailbox: list[Delivered] = []
        self.handlers: dict[str, list[Callable[[Any], Any]]] = {}
        self.receivers: dict[str, collections.deque[Command]] = {}
        self.ensures: list[tuple[Callable[[], bool], asyncio.Future[bool]]] = []
        self.keys: dict[str, Any] = dict(keys or {})
        self.published: dict[str, Any] = dict(published or {})
        self.publish_dirty = False
        self.compensations: list[Compensation] = []
        #: Children started by this run: run id -> whether it survives the parent's end.
        self.children: dict[str, bool] = {}
        self.child_outcomes: dict[str, dict[str, Any]] = {}
        self.child_waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.cancelled = False
        self.timed_out = False
        self.sweep_pending = False
        self.stopping = False
        self.failure: BaseException | None = None
        self.main: asyncio.Task[Any] | None = None

    def _index(self, position: int, record: Record) -> None:
        kind = record["k"]
        if kind == "event":
            self.seen_ids[record["id"]] = None
        c = record.get("c")
        if type(c) is int:  # decoded JSON: a bool is never taken for an int here
            if c >= self.history_end:
                self.history_end = c + 1
            known = self.recorded.get(c)
            if known is None:
                if kind == "step":
                    known = Recorded("step", record["name"], position, [])
                else:
                    command, name = command_of(record)
                    known = Recorded(command, name, position, [])
                self.recorded[c] = known
            if kind in ACTIVATIONS:
                known.completed = True
            else:
                known.bound.append(record)
        if kind in ACTIVATIONS:
            self.activations.append((position, record))

    # -- issuing commands (called by Context, inside the workflow loop) ------------

    @property
    def replaying(self) -> bool:
        """Tell whether recorded completions remain to be applied."""
        return bool(self.activations)

    def enter(self) -> None:
        """Check the run may go on, then fire handlers of events that arrived."""
        if not (self.mailbox or self.cancelled or self.stopping or self.failure):
            return
        if self.failure is not None:
            raise self.failure
        if self.stopping:
            raise Evicted()
        if self.cancelled:
            raise Cancelled()
        if self.mailbox:
            self.process_mailbox()

    def issue(self, kind: str, name: str | None = None) -> tuple[int, list[Record]]:
        """Give a new command its number; return it and the records the log bound to it."""
        if self.failure is not None:
            raise self.failure
        if self.stopping:
            raise Evicted()
        c = self.next_c
        known = self.recorded.get(c)
        while known is not None and known.kind == "patch":
            # The marker of a patch the code no longer checks (deprecated, then removed).
            c += 1
            known = self.recorded.get(c)
        self.next_c = c + 1
        if known is None:
            return c, []
        if known.kind != kind or (
            name is not None and known.name is not None and known.name != name
        ):
            recorded = known.kind + (f" {known.name!r}" if known.name is not None else "")
            requested = kind + (f" {name!r}" if name is not None else "")
            raise self.nondeterministic(known.position, recorded, requested, c)
        return c, known.bound

    def patched(self, patch_id: str) -> bool:
        """Tell whether the run takes the branch of change ``patch_id`` (see ``Context.patched``).

        Yes if the log holds its marker here, or if the run has gone past its
        history (it is live here: the marker is recorded); no if the history
        goes on without the marker, because it was written by the old code.
        """
        if patch_id in self.patches:
            return self.patches[patch_id]
        c = self.next_c
        known = self.recorded.get(c)
        while known is not None and known.kind == "patch" and known.name != patch_id:
            c += 1
            known = self.recorded.get(c)
        if known is not None and known.kind == "patch":
            self.next_c = c + 1
            taken = True
        elif c < self.history_end:
            taken = False
        else:
            self.next_c = c + 1
            self.record({"k": "patch", "c": c, "id": patch_id})
            taken = True
        self.patches[patch_id] = taken
        return taken

    def nondeterministic(
        self, position: int, recorded: str, requested: str, c: int | None
    ) -> NonDeterminismError:
        """Build, remember and return the error for a divergence from the log."""
        err = NonDeterminismError(self.run_id, position, recorded, requested, c)
        if self.failure is None:
            self.failure = err
        return err

    def record(self, record: Record) -> None:
        """Buffer a record for the next durable write."""
        self.pending.append(record)

    def wait_for(
        self,
        c: int,
        kind: str,
        name: str | None = None,
        spec: Any = None,
        on_done: Callable[[Record], None] | None = None,
    ) -> Command:
        """Register a command the workflow waits on; live, its I/O starts after the next write.

        Its completion resolves the command's future, or calls ``on_done``
        instead when given (a timer's callback, a receive's timeout).
        """
        command = Command(c, kind, name, asyncio.Future(loop=self.loop), spec, on_done)
        self.commands[c] = command
        known = self.recorded.get(c)
        if known is None or not known.completed:
            self.to_start.append(command)
        return command

    def settled(self, c: int) -> Record | None:
        """On replay, take command ``c``'s completion at once if it is the log's next one.

        Only when nothing else of the workflow is ready to run: then the
        command's task would block, the loop go idle and the driver deliver
        this very completion next, so skipping the round trip changes nothing
        but its cost (replay of a long run is mostly this).
        """
        activations = self.activations
        if (
            not activations
            or activations[0][1].get("c") != c
            or not self.loop.idle
            or self.mailbox
            or self.sweep_pending
        ):
            return None
        record = activations.popleft()[1]
        t = record.get("t")
        if isinstance(t, (int, float)) and t > self.loop.now:
            self.loop.now = float(t)
        return record

    def add_timer(self, when: float, handle: asyncio.TimerHandle) -> None:
        """Make an asyncio timer of the workflow (``asyncio.sleep``, ``timeout``) durable."""
        c, bound = self.issue("timer")
        until = self.timer_until(c, bound, when, "timer")
        self.wait_for(c, "timer", spec=until, on_done=lambda _r: self._fired(handle))
        self.timer_commands[id(handle)] = c

    def _fired(self, handle: asyncio.TimerHandle) -> None:
        self.timer_commands.pop(id(handle), None)
        self.loop.fire(handle)

    def cancel_timer(self, handle: asyncio.TimerHandle) -> None:
        """Forget a durable timer the workflow cancelled (a ``timeout`` block that ended)."""
        c = self.timer_commands.pop(id(handle), None)
        command = self.commands.pop(c, None) if c is not None else None
        if command is not None:
            command.done = True

    def timer_until(self, c: int, bound: list[Record], until: float, why: str) -> float:
        """Return a timer's recorded due time, or record ``until`` as it."""
        for recorded in bound:
            if recorded["k"] == "sleep":
                return float(recorded["until"])
        record: Record = {"k": "sleep", "c": c, "until": until}
        if why != "sleep":
            record["for"] = why
        self.pending.append(record)
        self.sleeps_pending = True
        return until

    # -- applying completions (called by the worker, outside workflow code) --------

    def apply(self, record: Record, position: int = -1) -> None:
        """Apply one completion; the caller then runs the loop until idle."""
        t = record.get("t")
        if isinstance(t, (int, float)) and t > self.loop.now:
            self.loop.now = float(t)
        kind = record["k"]
        if kind == "event":
            self.mailbox.append(Delivered(record["id"], record["name"], record.get("value")))
            self.seen_ids[record["id"]] = None
            self.loop.call_soon(self.process_mailbox)
            return
        if kind == "timeout":
            self.loop.call_soon(self.time_out)
            return
        command = self.commands.pop(record["c"], None)
        if command is None:
            if record["c"] >= self.next_c:
                # The log completed a command this code has not issued (yet, or ever).
                raise self.nondeterministic(
                    position,
                    describe(record) + f" for command {record['c']}",
                    f"nothing: the workflow issued {self.next_c} command(s) and waits",
                    record["c"],
                )
            return  # cancelled or already settled by a timeout or cancel: nothing waits
        command.done = True
        if command.on_done is not None:
            self.loop.call_soon(command.on_done, record)
        elif not command.future.done():
            command.future.set_result(record)

    def process_mailbox(self) -> None:
        """Route delivered events: cancel, child ends, handlers, then waiting receives."""
        kept: list[Delivered] = []
        for delivered in self.mailbox:
            if delivered.name == CANCEL_EVENT:
                self.cancel()
                continue
            if delivered.name == CHILD_EVENT and isinstance(delivered.value, dict):
                self.child_ended(delivered.value)
                continue
            callbacks = self.handlers.get(delivered.name)
            if callbacks:
                for callback in callbacks:
                    result = callback(delivered.value)
                    if asyncio.iscoroutine(result):
                        self.loop.create_task(result)
                continue
            queue = self.receivers.get(delivered.name)
            while queue:
                command = queue.popleft()
                if not command.future.done():
                    command.done = True
                    self.commands.pop(command.c, None)
                    command.future.set_result(delivered.value)
                    break
            else:
                kept.append(delivered)
        self.mailbox = kept
        self.check_ensures()

    def check_ensures(self) -> None:
        """Re-check every ``ensure`` predicate; resolve those that now hold."""
        waiting: list[tuple[Callable[[], bool], asyncio.Future[bool]]] = []
        for predicate, future in self.ensures:
            if future.done():
                continue
            try:
                holds = predicate()
            except Exception as exc:
                future.set_exception(exc)
                continue
            if holds:
                future.set_result(True)
            else:
                waiting.append((predicate, future))
        self.ensures = waiting

    def pop_mailbox(self, name: str) -> Delivered | None:
        """Consume the oldest delivered event called ``name``."""
        for i, delivered in enumerate(self.mailbox):
            if delivered.name == name:
                return self.mailbox.pop(i)
        return None

    def child_ended(self, outcome: dict[str, Any]) -> None:
        """Record a child's end and wake whoever waits for its result."""
        run_id = str(outcome.get("run_id"))
        self.child_outcomes[run_id] = outcome
        for future in self.child_waiters.pop(run_id, []):
            if not future.done():
                future.set_result(outcome)

    def interrupt(self, exc_type: type[BaseException], message: str) -> None:
        """Raise ``exc_type`` into every wait of the workflow.

        Tasks blocked on something that is not a primitive (``asyncio.sleep``,
        an ``asyncio.Event``) are cancelled once the loop is idle again (see
        :meth:`sweep`), so nothing is left waiting forever.
        """
        self.sweep_pending = True
        for command in list(self.commands.values()):
            if command.kind == "timer":
                continue  # asyncio's own timers: the swept tasks cancel them
            command.done = True
            self.commands.pop(command.c, None)
            if not command.future.done():
                command.future.set_exception(exc_type(message))
                command.future.exception()  # retrieved: whoever awaits it still gets it
        futures: list[asyncio.Future[Any]] = [f for _p, f in self.ensures]
        futures += [f for waiters in self.child_waiters.values() for f in waiters]
        self.ensures, self.child_waiters = [], {}
        self.receivers = {}
        for future in futures:
            if not future.done():
                future.set_exception(exc_type(message))
                future.exception()

    def cancel(self) -> None:
        """Stop the run on request: every wait and every later primitive raises Cancelled."""
        if not self.cancelled:
            self.cancelled = True
            self.interrupt(Cancelled, "the run was cancelled")

    def time_out(self) -> None:
        """Act on the passed deadline: raise WorkflowTimeout into every wait."""
        if not self.timed_out:
            self.timed_out = True
            self.interrupt(WorkflowTimeout, f"run {self.run_id!r} passed its deadline")

    def sweep(self) -> bool:
        """After an interrupt, cancel tasks still blocked on non-primitives; tell if any were."""
        if not self.sweep_pending:
            return False
        self.sweep_pending = False
        ours = {id(cmd.future) for cmd in self.commands.values()}
        stuck = False
        for task in self.loop.all_tasks():
            waiter = getattr(task, "_fut_waiter", None)
            if waiter is not None and not waiter.done() and id(waiter) not in ours:
                task.cancel()
                stuck = True
        return stuck

    # -- state for the worker ------------------------------------------------------

    def next_wakeup(self) -> float | None:
        """Return the earliest due time among the timers the workflow waits on."""
        times = [
            float(cmd.spec)
            for cmd in self.commands.values()
            if cmd.kind in ("sleep", "timer", "receive") and cmd.spec is not None
        ]
        return min(times, default=None)

    def has_work(self) -> bool:
        """Tell whether a step, child start or send is pending (the run is due at once)."""
        return any(
            cmd.kind in ("step", "compensate", "child", "send") and not cmd.done
            for cmd in self.commands.values()
        )

    def stop(self) -> None:
        """Tear the workflow down: every wait raises Evicted, and nothing more is recorded."""
        self.stopping = True
        self.interrupt(Evicted, "handed back")
        for task in self.loop.all_tasks():
            task.cancel()
        self.loop.run_until_idle()
        self.loop.close()

    def now(self) -> float:
        """Return real time for live records (the workflow's clock only moves forward)."""
        now = time.time() + _clock.offset
        return now if now > self.loop.now else self.loop.now
