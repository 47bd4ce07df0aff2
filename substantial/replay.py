"""Drive one workflow coroutine against its log.

An :class:`Execution` holds what replay needs: the recorded records, a
cursor into them, the records buffered for the next durable write, the
mailbox of delivered events and the registered handlers. While the cursor
is inside the recorded log, primitives return recorded results; past its
end they act and record. Nothing here knows how the log is stored: the
only storage calls are ``append``, ``read_inbox`` and ``ack_events`` on the
backend given to it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from substantial.backends.base import Backend
from substantial.errors import NonDeterminismError, PositionTaken
from substantial.records import Record, encode_entry

__all__ = ["CANCEL_EVENT", "Execution"]

#: Reserved event name that cancels a run.
CANCEL_EVENT = "substantial.cancel"


class ControlFlow(BaseException):
    """Base of the signals that end a workflow's coroutine.

    They derive from BaseException so that ``except Exception`` in workflow
    code cannot swallow them.
    """


class Cancelled(ControlFlow):
    """The run received a cancel request."""


class Reverted(ControlFlow):
    """The workflow called ``revert()`` and its compensations ran."""


class ContinueAs(ControlFlow):
    """The workflow called ``continue_using``."""

    def __init__(self, workflow: str, version: str | None, kwargs: dict[str, Any]) -> None:
        super().__init__(workflow)
        self.workflow = workflow
        self.version = version
        self.kwargs = kwargs


class Compact(ControlFlow):
    """The workflow called ``compact()``: restart it from a snapshot."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("compact")
        self.kwargs = kwargs


class Fenced(ControlFlow):
    """Another worker extended this run's log: stop without writing."""


class Evicted(ControlFlow):
    """The worker is handing the run back (shutdown): stop at a primitive, write nothing more."""


@dataclass
class Delivered:
    """An event recorded in the log and not yet consumed."""

    event_id: str
    name: str
    value: Any


@dataclass
class Compensation:
    """A completed step's undo action, run by ``revert()``."""

    name: str
    fn: Callable[..., Any]
    value: Any


@dataclass
class Waiting:
    """What a suspended run waits for."""

    until: float | None
    events: bool
    future: asyncio.Future[None] = field(repr=False)


def describe(record: Record | None) -> str:
    """Render a record briefly for error messages."""
    if record is None:
        return "the end of the log"
    name = record.get("name")
    return f"{record['k']}" + (f" {name!r}" if name is not None else "")


class Execution:
    """The replay state of one run inside one worker."""

    def __init__(
        self,
        backend: Backend,
        run_id: str,
        records: list[tuple[int, Record]],
        next_position: int,
        *,
        seen_ids: list[str] | None = None,
        keys: dict[str, Any] | None = None,
    ) -> None:
        self.backend = backend
        self.run_id = run_id
        self.records = records
        self.cursor = 0
        self.position = next_position
        self.pending: list[Record] = []
        self.to_ack: list[str] = []
        self.mailbox: list[Delivered] = []
        self.handlers: dict[str, list[Callable[[Any], Any]]] = {}
        # Insertion-ordered, so a snapshot can keep the most recent ids.
        self.seen_ids: dict[str, None] = dict.fromkeys(seen_ids or ())
        self.keys: dict[str, Any] = dict(keys or {})
        self.compensations: list[Compensation] = []
        self.inbox_dirty = True
        self.waiting: Waiting | None = None
        self.nondeterminism: NonDeterminismError | None = None
        self.on_suspend: Callable[[Execution], None] | None = None
        #: Set by the worker to stop the run at its next primitive call.
        self.stop_requested = False
        #: What the run was waiting for when it was stopped: ``(until, events)``.
        self.stopped_waiting: tuple[float | None, bool] | None = None
        self.last_active = time.monotonic()

    # -- replay cursor -----------------------------------------------------

    @property
    def replaying(self) -> bool:
        """Tell whether recorded records remain ahead of the cursor."""
        return self.cursor < len(self.records)

    def peek(self) -> Record | None:
        """Return the next recorded record without consuming it."""
        return self.records[self.cursor][1] if self.cursor < len(self.records) else None

    def fail_nondeterministic(self, requested: str) -> NonDeterminismError:
        """Build, remember and return the error for a mismatch at the cursor."""
        position = self.records[self.cursor][0] if self.replaying else self.position
        err = NonDeterminismError(self.run_id, position, describe(self.peek()), requested)
        if self.nondeterminism is None:
            self.nondeterminism = err
        return err

    def check_health(self) -> None:
        """Re-raise a non-determinism error the workflow may have swallowed."""
        if self.nondeterminism is not None:
            raise self.nondeterminism

    def take(self, kind: str, name: str | None = None) -> Record | None:
        """Consume the next recorded record if replaying, checking its kind and name."""
        self.check_health()
        if self.stop_requested:
            # Handed back: nothing more is observed or recorded (finally blocks included).
            raise Evicted()
        if not self.replaying:
            return None
        record = self.records[self.cursor][1]
        if record["k"] != kind or (name is not None and record.get("name") != name):
            requested = kind + (f" {name!r}" if name is not None else "")
            raise self.fail_nondeterministic(requested)
        self.cursor += 1
        return record

    def record(self, record: Record) -> Record:
        """Return the recorded twin of ``record`` when replaying; else buffer it for writing."""
        recorded = self.take(record["k"], record.get("name"))
        if recorded is not None:
            return recorded
        self.pending.append(record)
        return record

    # -- durable writes ----------------------------------------------------

    async def flush(self, *records: Record) -> None:
        """Write the buffered records (and ``records``) as one entry at the next position."""
        batch = [*self.pending, *records] if records else self.pending
        if not batch:
            return
        entry = encode_entry(batch)
        try:
            await self.backend.append(self.run_id, self.position, entry)
        except PositionTaken as exc:
            raise Fenced(str(exc)) from exc
        self.position += 1
        self.pending = []
        if self.to_ack:
            acked, self.to_ack = self.to_ack, []
            await self.backend.ack_events(self.run_id, acked)

    # -- events ------------------------------------------------------------

    async def deliver(self, *, fire_handlers: bool = True) -> None:
        """Bring newly arrived events into the mailbox, then fire handlers on them."""
        if self.stop_requested:
            raise Evicted()
        while (nxt := self.peek()) is not None and nxt["k"] == "event":
            self.cursor += 1
            self.seen_ids[nxt["id"]] = None
            self.mailbox.append(Delivered(nxt["id"], nxt["name"], nxt.get("value")))
        if not self.replaying and self.inbox_dirty:
            self.inbox_dirty = False
            for event in await self.backend.read_inbox(self.run_id):
                if event.event_id in self.seen_ids:
                    self.to_ack.append(event.event_id)
                    continue
                body = orjson.loads(event.data)
                name, value = body["name"], body.get("value")
                self.seen_ids[event.event_id] = None
                self.to_ack.append(event.event_id)
                self.pending.append(
                    {"k": "event", "id": event.event_id, "name": name, "value": value}
                )
                self.mailbox.append(Delivered(event.event_id, name, value))
        if any(d.name == CANCEL_EVENT for d in self.mailbox):
            raise Cancelled()
        if fire_handlers and self.handlers:
            await self.fire_handlers()

    async def fire_handlers(self) -> None:
        """Call the handlers of mailbox events that have some, in arrival order."""
        kept: list[Delivered] = []
        for delivered in self.mailbox:
            callbacks = self.handlers.get(delivered.name)
            if not callbacks:
                kept.append(delivered)
                continue
            recorded = self.take("handled")
            if recorded is not None and recorded.get("id") != delivered.event_id:
                self.cursor -= 1
                raise self.fail_nondeterministic(f"handled event {delivered.event_id!r}")
            if recorded is None:
                self.pending.append({"k": "handled", "id": delivered.event_id})
            for callback in callbacks:
                result = callback(delivered.value)
                if asyncio.iscoroutine(result):
                    await result
        self.mailbox = kept

    def pop_mailbox(self, name: str) -> Delivered | None:
        """Consume the oldest delivered event called ``name``."""
        for i, delivered in enumerate(self.mailbox):
            if delivered.name == name:
                return self.mailbox.pop(i)
        return None

    # -- suspension --------------------------------------------------------

    async def suspend(self, until: float | None, events: bool) -> str:
        """Wait for a timer or for events; return ``"timer"`` or ``"event"``.

        When replaying, the log says which came first. Live, everything
        observed so far is written before the run sleeps.
        """
        if self.replaying:
            nxt = self.peek()
            assert nxt is not None
            if nxt["k"] == "timer" and until is not None:
                return "timer"
            if nxt["k"] == "event":
                return "event"
            raise self.fail_nondeterministic("a wait for " + ("an event" if events else "a timer"))
        await self.flush()
        if until is not None and time.time() >= until:
            return "timer"
        if self.inbox_dirty:
            return "event"
        loop = asyncio.get_running_loop()
        self.last_active = time.monotonic()
        self.waiting = Waiting(until, events, loop.create_future())
        if self.on_suspend is not None:
            self.on_suspend(self)
        try:
            if not self.stop_requested:
                await self.waiting.future
            if self.stop_requested:
                self.stopped_waiting = (until, events)
                raise Evicted()
        finally:
            self.waiting = None
            self.last_active = time.monotonic()
        if until is not None and time.time() >= until:
            return "timer"
        return "event"

    def wake(self) -> None:
        """Resume a suspended run (its timer is due or it has new events)."""
        waiting = self.waiting
        if waiting is not None and not waiting.future.done():
            waiting.future.set_result(None)

    def stop(self) -> None:
        """Make the run stop at its next primitive call or wait (graceful hand-back)."""
        self.stop_requested = True
        self.wake()

    def poke(self) -> None:
        """Tell the run that its inbox has changed."""
        self.inbox_dirty = True
        self.wake()
