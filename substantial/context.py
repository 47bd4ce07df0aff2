"""The primitives a workflow calls: every effect goes through its :class:`Context`.

Each primitive call is a command, recorded in the run's log with its number.
On replay the recorded result is returned instead of acting again, so a
workflow must be deterministic given those results: read the clock with
:meth:`Context.now`, draw random numbers with :meth:`Context.random`, and do
I/O only inside :meth:`Context.save`. Primitives may run concurrently
(``asyncio.gather``, ``TaskGroup``, ``create_task``, ``wait``, ``timeout``):
see docs/concurrency.md.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

from substantial._durations import seconds
from substantial._queue_names import check_key_priority, queue_run_id
from substantial._steps import DEFAULT_RETRY, RetryPolicy, StepSpec
from substantial.errors import (
    ChildFailed,
    InvalidArgument,
    ReceiveTimeout,
    SerializationError,
    StepFailed,
)
from substantial.records import Record, as_stored, encode_value
from substantial.replay import (
    CANCEL_EVENT,
    Compact,
    Compensation,
    ContinueAs,
    Execution,
    Reverted,
)

if TYPE_CHECKING:
    from substantial.workflow import Workflow

__all__ = ["ChildHandle", "Context", "RetryPolicy"]

T = TypeVar("T")
logger = logging.getLogger("substantial.workflow")


def _step_name(f: Callable[..., Any]) -> str:
    return getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__


def _takes_value(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        for p in params
    )


def step_outcome(record: Record, step: str) -> Any:
    """Return a completed step's value, or raise what its recorded failure says."""
    error = record.get("error")
    if error is None:
        return record.get("value")
    if error.get("type") == "SerializationError":
        raise SerializationError(error.get("message", ""))
    raise StepFailed(step, error["type"], error["message"], int(record.get("attempts", 1)))


class Context:
    """The handle a workflow uses for every effect; one per run and replay."""

    def __init__(self, execution: Execution, run_id: str, retry: RetryPolicy | None = None) -> None:
        self._x = execution
        self._run_id = run_id
        #: The workflow's default retry policy (``@workflow(retry=...)``).
        self._retry = retry or DEFAULT_RETRY

    @property
    def run_id(self) -> str:
        """Return the id of the run this context belongs to."""
        return self._run_id

    @property
    def replaying(self) -> bool:
        """Tell whether the workflow is re-executing recorded history right now."""
        return self._x.replaying

    # -- steps ---------------------------------------------------------------

    @overload
    async def save(
        self,
        f: Callable[[], Awaitable[T]],
        compensate_with: Callable[..., Any] | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
        *,
        name: str | None = None,
        key: str | None = None,
    ) -> T: ...

    @overload
    async def save(
        self,
        f: Callable[[], T],
        compensate_with: Callable[..., Any] | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
        *,
        name: str | None = None,
        key: str | None = None,
    ) -> T: ...

    async def save(
        self,
        f: Callable[[], Awaitable[T]] | Callable[[], T],
        compensate_with: Callable[..., Any] | None = None,
        timeout: timedelta | float | None = None,
        retry: RetryPolicy | None = None,
        *,
        name: str | None = None,
        key: str | None = None,
    ) -> T:
        """Run ``f`` once and record its result; on replay return the recorded result.

        ``f`` may be sync (it runs in a thread) or async and must return
        JSON-compatible data. It runs at least once, and exactly once unless
        the worker dies between running it and recording it, so make it
        idempotent. Failures are retried per ``retry`` (each attempt
        recorded); the last one raises :class:`StepFailed` into the workflow.
        ``compensate_with`` is run by :meth:`revert`, with the step's result if
        it takes an argument. ``key`` memoizes the step under that key for the
        whole run, even across :meth:`compact`. Several ``save`` calls may run
        at once (``asyncio.gather``): each is its own command.
        """
        x = self._x
        x.enter()
        step = name or _step_name(f)
        c, bound = x.issue("step", step)
        if key is not None and key in x.keys:
            return cast(T, x.keys[key])
        limit = None if timeout is None else seconds(timeout, "c.save(timeout=...)")
        attempts, retry_at = 0, 0.0
        for record in bound:
            if record["k"] == "attempt":
                attempts, retry_at = int(record["n"]), float(record["retry_at"])
        done = x.settled(c)
        if done is None:
            spec = StepSpec(f, (), limit, retry or self._retry, key, attempts, retry_at)
            done = await x.wait_for(c, "step", step, spec).future
        value: Any = step_outcome(done, step)
        if compensate_with is not None:
            x.compensations.append(Compensation(step, compensate_with, value))
        if key is not None:
            x.keys[key] = value
        return value  # type: ignore[no-any-return]

    # -- waiting -------------------------------------------------------------

    async def sleep(self, delta: timedelta | float) -> None:
        """Pause durably; any worker resumes the run once ``delta`` has passed."""
        x = self._x
        x.enter()
        length = seconds(delta, "c.sleep()")
        c, bound = x.issue("sleep")
        until = x.timer_until(c, bound, x.now() + length, "sleep")
        if x.settled(c) is None:
            command = x.wait_for(c, "sleep", spec=until)
            await command.future

    async def receive(self, name: str, timeout: timedelta | float | None = None) -> Any:
        """Wait for the next event called ``name`` and return its value.

        Raises :class:`ReceiveTimeout` if ``timeout`` passes first.
        """
        x = self._x
        x.enter()
        limit = None if timeout is None else seconds(timeout, "c.receive(timeout=...)")
        c, bound = x.issue("receive", name)
        delivered = x.pop_mailbox(name)
        if delivered is not None:
            return delivered.value
        until = None if limit is None else x.timer_until(c, bound, x.now() + limit, "receive")

        def expire(_record: Record) -> None:
            queue = x.receivers.get(name)
            if queue is not None and command in queue:
                queue.remove(command)
            if not future.done():
                future.set_exception(ReceiveTimeout(f"no {name!r} event within {timeout}"))

        # The event comes through the mailbox; the command's own completion is its timer.
        command = x.wait_for(c, "receive", name, until, expire if until is not None else None)
        future = command.future
        x.receivers.setdefault(name, collections.deque()).append(command)
        return await future

    def handle(self, name: str, cb: Callable[[Any], Any]) -> None:
        """Call ``cb(value)`` for each event called ``name``, in arrival order.

        Handlers fire at the workflow's next primitive call (or as soon as an
        event arrives while the workflow waits), for events that arrived
        before or after registration and that no ``receive`` took. An async
        ``cb`` runs as a task of the workflow.
        """
        self._x.handlers.setdefault(name, []).append(cb)

    async def ensure(self, predicate: Callable[[], bool]) -> bool:
        """Wait until ``predicate()`` holds; it is re-checked whenever an event arrives."""
        x = self._x
        x.enter()
        x.issue("ensure")
        if predicate():
            return True
        future: asyncio.Future[bool] = x.loop.create_future()
        x.ensures.append((predicate, future))
        return await future

    # -- recorded values -------------------------------------------------------

    def _value(self, kind: str, make: Callable[[], Any], name: str | None = None) -> Any:
        c, bound = self._x.issue(kind, name)
        for record in bound:
            if record["k"] == kind:
                return record["value"]
        value = make()
        self._x.record({"k": kind, "c": c, "value": value})
        return value

    def patched(self, patch_id: str) -> bool:
        """Tell whether to run the new code of a change, for runs started before it.

        ``if c.patched("fee-v2"): new code, else: old code``. A run that
        reaches this point live takes the new branch and records a marker; a
        run replaying history the old code wrote takes the old branch, so
        runs in flight keep replaying. The same id gives the same answer for
        the rest of the run. Once no run needs the old branch, replace the
        ``if`` by :meth:`deprecate_patch` and later remove that too
        (docs/determinism.md).
        """
        if not isinstance(patch_id, str) or not patch_id:
            raise InvalidArgument("patched() takes a non-empty string id naming the change")
        self._x.enter()
        return self._x.patched(patch_id)

    def deprecate_patch(self, patch_id: str) -> None:
        """Keep replaying runs that recorded ``patch_id``'s marker, with only the new code left."""
        self.patched(patch_id)

    def log(self, message: str, *args: Any, level: int = logging.INFO, **data: Any) -> None:
        """Record a log line; it is emitted once, not again on replay."""
        text = message % args if args else message
        c, bound = self._x.issue("log")
        if bound:
            return
        record: Record = {"k": "log", "c": c, "level": level, "msg": text}
        if data:
            encode_value(data, "log data")
            record["data"] = data
        self._x.record(record)
        logger.log(level, "[%s] %s", self._run_id, text, extra={"run_id": self._run_id})

    def now(self) -> datetime:
        """Return the current time (UTC), the same on every replay."""
        value = self._value("now", self._x.now)
        return datetime.fromtimestamp(float(value), UTC)

    def random(self) -> float:
        """Return a random float in [0, 1), the same on every replay."""
        return float(self._value("random", _random.random))

    def uuid4(self) -> _uuid.UUID:
        """Return a random UUID, the same on every replay."""
        return _uuid.UUID(self._value("uuid", lambda: str(_uuid.uuid4())))

    # -- published state -------------------------------------------------------

    def publish(self, key: str, value: Any) -> None:
        """Make ``value`` the latest value of ``key``, readable by clients with ``run.read``."""
        if not isinstance(key, str) or not key:
            raise InvalidArgument("publish() takes a non-empty string key")
        value = as_stored(value, f"the value published as {key!r}")
        c, bound = self._x.issue("publish", key)
        if not bound:
            self._x.record({"k": "publish", "c": c, "key": key, "value": value})
            self._x.publish_dirty = True
        self._x.published[key] = value

    def emit(self, stream: str, value: Any) -> None:
        """Append ``value`` to ``stream``, which clients follow with ``run.stream``."""
        if not isinstance(stream, str) or not stream:
            raise InvalidArgument("emit() takes a non-empty string stream name")
        value = as_stored(value, f"the value emitted on {stream!r}")
        c, bound = self._x.issue("emit", stream)
        if not bound:
            self._x.record({"k": "emit", "c": c, "stream": stream, "value": value})

    # -- children --------------------------------------------------------------

    async def start_child(
        self,
        wf: Workflow[Any],
        kwargs: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        timeout: timedelta | float | None = None,
        abandon: bool = False,
        queue: str | None = None,
        key: str | None = None,
        priority: int = 0,
    ) -> ChildHandle:
        """Start ``wf(**kwargs)`` as a child run; return its handle once it is stored.

        The child's id derives from this run's id and the command number
        (``<parent>:<n>``) unless ``run_id`` is given, so a replay never starts
        a second child. It inherits what is left of this run's deadline
        unless ``timeout`` is shorter. When this run ends, unfinished children
        are cancelled, unless started with ``abandon=True``. With ``queue``,
        the child waits in that queue (declared on the Conductor) until its
        limits admit it, with ``key`` and ``priority`` as in ``conductor.start``.
        """
        from substantial.workflow import ChildSpec, Workflow

        if not isinstance(wf, Workflow):
            raise InvalidArgument(f"start_child() takes a @workflow() function, got {wf!r}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InvalidArgument("start_child() takes the child's arguments as a dict of kwargs")
        if queue is not None:
            queue_run_id(queue)
            check_key_priority(key, priority)
        elif key is not None or priority:
            raise InvalidArgument("start_child(key=..., priority=...) needs queue=: name a Queue")
        x = self._x
        x.enter()
        encoded = as_stored(dict(kwargs or {}), "the child's arguments", "kwargs")
        limit = None if timeout is None else seconds(timeout, "c.child(timeout=...)", positive=True)
        c, _bound = x.issue("child", wf.name)
        child_id = run_id if run_id is not None else f"{self._run_id}:{c}"
        spec = ChildSpec(
            wf.name, wf.version, encoded, child_id, limit, abandon, queue, key, priority
        )
        command = x.wait_for(c, "child", wf.name, spec)
        record = await command.future
        if "error" in record:
            err = record["error"]
            raise ChildFailed(record["run_id"], "not started", err["type"], err["message"])
        x.children[record["run_id"]] = abandon
        return ChildHandle(self, record["run_id"])

    async def child(
        self,
        wf: Workflow[T],
        kwargs: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        timeout: timedelta | float | None = None,
        queue: str | None = None,
        key: str | None = None,
        priority: int = 0,
    ) -> T:
        """Run ``wf(**kwargs)`` as a child run and return its result.

        Raises :class:`ChildFailed` if the child fails, is cancelled, reverts
        or times out. Many children may run at once (``asyncio.gather``);
        with ``queue``, no more at once than the queue's limits allow.
        """
        handle = await self.start_child(
            wf, kwargs, run_id=run_id, timeout=timeout, queue=queue, key=key, priority=priority
        )
        return cast(T, await handle.result())

    # -- advanced --------------------------------------------------------------

    async def revert(self) -> None:
        """Run the compensations of completed steps, newest first, then end the run as reverted."""
        x = self._x
        x.enter()
        for comp in reversed(x.compensations):
            c, _bound = x.issue("compensate", comp.name)
            args = (comp.value,) if _takes_value(comp.fn) else ()
            spec = StepSpec(comp.fn, args, None, DEFAULT_RETRY)
            command = x.wait_for(c, "compensate", comp.name, spec)
            record = await command.future
            if "error" in record:
                err = record["error"]
                raise StepFailed(
                    f"compensation of {comp.name}",
                    err["type"],
                    err["message"],
                    int(record.get("attempts", 1)),
                )
        x.compensations.clear()
        raise Reverted()

    async def continue_using(self, workflow: Workflow[Any], /, *args: Any, **kwargs: Any) -> None:
        """End this run and start ``workflow(*args, **kwargs)`` as its successor; never returns."""
        self._x.enter()
        self._refuse_with_compensations("continue_using()")
        if args:
            try:
                bound = inspect.signature(workflow.fn).bind(None, *args, **kwargs)
            except TypeError as exc:
                raise InvalidArgument(f"continue_using({workflow.name}, ...): {exc}") from exc
            kwargs = {k: v for k, v in bound.arguments.items() if k != next(iter(bound.arguments))}
        successor = as_stored(kwargs, "the arguments of continue_using()", "kwargs")
        raise ContinueAs(workflow.name, workflow.version, successor)

    async def compact(self, **kwargs: Any) -> None:
        """Restart this run's function from a snapshot, so replay stays short; never returns.

        The function is called again with its original arguments updated by
        ``kwargs``: pass the state the rest of the run needs. Values saved
        with ``key=`` are carried over; the log before the snapshot is no
        longer replayed. Call it when nothing else runs concurrently.
        """
        x = self._x
        x.enter()
        self._refuse_with_compensations("compact()")
        busy = [cmd for cmd in x.commands.values() if not cmd.done]
        others = [t for t in x.loop.all_tasks() if t is not x.main]
        running = [cid for cid in x.children if cid not in x.child_outcomes]
        if busy or others or running:
            raise InvalidArgument(
                "compact() needs the workflow to be quiet: "
                f"{len(busy)} primitive(s) and {len(others)} other task(s) still run, "
                f"{len(running)} child run(s) are unfinished; await them first"
            )
        raise Compact(as_stored(kwargs, "the state passed to compact()", "kwargs"))

    def _refuse_with_compensations(self, what: str) -> None:
        count = len(self._x.compensations)
        if count:
            raise InvalidArgument(
                f"{what} would drop the compensations of {count} completed step(s), which "
                "revert() could then no longer run: call revert() first, or call "
                f"{what} before the steps that have compensations"
            )


class ChildHandle:
    """A child run started by this workflow: wait for it, send it events, cancel it."""

    def __init__(self, context: Context, run_id: str) -> None:
        self._c = context
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"ChildHandle({self.run_id!r})"

    async def result(self) -> Any:
        """Wait for the child to end; return its value or raise :class:`ChildFailed`."""
        x = self._c._x
        x.enter()
        outcome = x.child_outcomes.get(self.run_id)
        if outcome is None:
            future: asyncio.Future[dict[str, Any]] = x.loop.create_future()
            x.child_waiters.setdefault(self.run_id, []).append(future)
            outcome = await future
        status = outcome.get("status")
        if status == "completed":
            return outcome.get("value")
        err = outcome.get("error") or {}
        raise ChildFailed(self.run_id, str(status), err.get("type"), str(err.get("message", "")))

    async def send(self, name: str, value: Any = None) -> None:
        """Post event ``name`` to the child, once (a replay does not send it again)."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument("an event name must be a non-empty string")
        x = self._c._x
        x.enter()
        value = as_stored(value, f"the value of event {name!r}")
        c, _bound = x.issue("send", name)
        event_id = f"{self._c.run_id}.{c}"[-200:].lstrip(".-:=+")
        command = x.wait_for(c, "send", name, (self.run_id, event_id, name, value))
        record = await command.future
        if "error" in record:
            err = record["error"]
            raise ChildFailed(self.run_id, "unreachable", err["type"], err["message"])

    async def cancel(self) -> None:
        """Ask the child to stop; it ends as cancelled at its next step or wait."""
        await self.send(CANCEL_EVENT)
