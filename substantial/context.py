"""The primitives a workflow calls: every effect goes through its :class:`Context`.

Each primitive is recorded in the run's log. On replay the recorded result
is returned instead of acting again, so a workflow must be deterministic
given those results: read the clock with :meth:`Context.now`, draw random
numbers with :meth:`Context.random`, and do I/O only inside :meth:`Context.save`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random as _random
import time
import uuid as _uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast, overload

import orjson

from substantial.errors import (
    InvalidArgument,
    ReceiveTimeout,
    SerializationError,
    StepFailed,
    StepTimeout,
)
from substantial.records import encode_value
from substantial.replay import Compact, Compensation, ContinueAs, Evicted, Execution, Reverted

if TYPE_CHECKING:
    from substantial.workflow import Workflow

__all__ = ["Context", "RetryPolicy"]

T = TypeVar("T")
logger = logging.getLogger("substantial.workflow")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How ``save`` retries a failing step: exponential backoff, each attempt recorded.

    ``max_attempts=1`` disables retries. Delays are ``initial_delay *
    backoff ** (attempt - 1)``, capped at ``max_delay`` seconds.
    """

    max_attempts: int = 5
    initial_delay: float = 0.1
    backoff: float = 2.0
    max_delay: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise InvalidArgument("RetryPolicy.max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.backoff < 1:
            raise InvalidArgument(
                "RetryPolicy needs initial_delay >= 0, max_delay >= 0 and backoff >= 1"
            )

    def delay(self, attempt: int) -> float:
        """Return the pause after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.max_delay, self.initial_delay * self.backoff ** (attempt - 1)))


DEFAULT_RETRY = RetryPolicy()


def _seconds(delta: timedelta | float | int) -> float:
    seconds = delta.total_seconds() if isinstance(delta, timedelta) else float(delta)
    if seconds < 0:
        raise InvalidArgument(f"a duration cannot be negative, got {delta!r}")
    return seconds


def _step_name(f: Callable[..., Any]) -> str:
    return getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__


def _error_of(exc: BaseException) -> dict[str, str]:
    return {"type": type(exc).__name__, "message": str(exc)}


async def _call(f: Callable[..., Any], args: tuple[Any, ...], timeout: float | None) -> Any:
    if timeout is None:
        result = f(*args)
        return await result if inspect.isawaitable(result) else result
    started = time.monotonic()
    try:
        if inspect.iscoroutinefunction(f):
            return await asyncio.wait_for(f(*args), timeout)
        # A synchronous function cannot be interrupted on the event loop: bound it in a
        # thread. It may return an awaitable (a lambda calling an async function): bound
        # that with what is left of the timeout.
        result = await asyncio.wait_for(asyncio.to_thread(f, *args), timeout)
        if inspect.isawaitable(result):
            left = timeout - (time.monotonic() - started)
            return await asyncio.wait_for(_awaited(result), max(left, 0.0))
        return result
    except TimeoutError as exc:
        if time.monotonic() - started < timeout:
            raise  # the step's own TimeoutError, not ours
        raise StepTimeout(f"the step took longer than its timeout of {timeout}s") from exc


async def _awaited(result: Awaitable[Any]) -> Any:
    return await result


class Context:
    """The handle a workflow uses for every effect; one per run and replay."""

    def __init__(self, execution: Execution, run_id: str, *, replaying_logs: bool = True) -> None:
        self._x = execution
        self._run_id = run_id

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

        ``f`` may be sync or async and must return JSON-compatible data. It
        runs at least once, and exactly once unless the worker dies between
        running it and recording it, so make it idempotent. Failures are
        retried per ``retry`` (each attempt recorded); the last one raises
        :class:`StepFailed` into the workflow. ``compensate_with`` is run by
        :meth:`revert`, with the step's result if it takes an argument.
        ``key`` memoizes the step under that key for the whole run, even
        across :meth:`compact`.
        """
        x = self._x
        await x.deliver()
        step = name or _step_name(f)
        if key is not None and key in x.keys:
            return cast(T, x.keys[key])
        policy = retry or DEFAULT_RETRY
        limit = None if timeout is None else _seconds(timeout)
        attempts = 0
        retry_at = 0.0
        while x.replaying:
            nxt = x.peek()
            if nxt is not None and nxt["k"] == "attempt" and nxt.get("name") == step:
                x.cursor += 1
                attempts, retry_at = int(nxt["n"]), float(nxt["retry_at"])
                continue
            recorded = x.take("step", step)
            assert recorded is not None
            if "error" in recorded:
                err = recorded["error"]
                raise StepFailed(step, err["type"], err["message"], int(recorded["attempts"]))
            return cast(T, self._completed(step, recorded.get("value"), compensate_with, key))
        await x.flush()
        if attempts:
            await asyncio.sleep(max(0.0, retry_at - time.time()))
        while True:
            attempts += 1
            try:
                # Hand the workflow what replay will hand it: the value as JSON decodes it.
                value = orjson.loads(encode_value(await _call(f, (), limit)))
            except SerializationError:
                raise
            except Exception as exc:
                error: dict[str, str] = _error_of(exc)
                cause: BaseException = exc
            else:
                record: dict[str, Any] = {"k": "step", "name": step, "value": value}
                if key is not None:
                    record["key"] = key
                await x.flush(record)
                return cast(T, self._completed(step, value, compensate_with, key))
            if attempts >= policy.max_attempts:
                await x.flush({"k": "step", "name": step, "error": error, "attempts": attempts})
                raise StepFailed(step, error["type"], error["message"], attempts) from cause
            pause = policy.delay(attempts)
            await x.flush(
                {
                    "k": "attempt",
                    "name": step,
                    "n": attempts,
                    "error": error,
                    "retry_at": time.time() + pause,
                }
            )
            if x.stop_requested:
                raise Evicted()
            logger.warning(
                "run %s: step %r attempt %d failed: %s: %s; retrying in %.2fs",
                self._run_id,
                step,
                attempts,
                error["type"],
                error["message"],
                pause,
            )
            await asyncio.sleep(pause)

    def _completed(
        self, step: str, value: Any, compensate_with: Callable[..., Any] | None, key: str | None
    ) -> Any:
        if compensate_with is not None:
            self._x.compensations.append(Compensation(step, compensate_with, value))
        if key is not None:
            self._x.keys[key] = value
        return value

    # -- waiting -------------------------------------------------------------

    async def sleep(self, delta: timedelta | float) -> None:
        """Pause the workflow durably; any worker resumes it once ``delta`` has passed."""
        x = self._x
        await x.deliver()
        until = float(x.record({"k": "sleep", "until": time.time() + _seconds(delta)})["until"])
        while await x.suspend(until, events=False) != "timer":
            await x.deliver(fire_handlers=False)  # only a cancel request interrupts a sleep
        x.record({"k": "timer"})

    async def receive(self, name: str, timeout: timedelta | float | None = None) -> Any:
        """Wait for the next event called ``name`` and return its value.

        Raises :class:`ReceiveTimeout` if ``timeout`` passes first.
        """
        x = self._x
        await x.deliver()
        delivered = x.pop_mailbox(name)
        if delivered is not None:
            return delivered.value
        until: float | None = None
        if timeout is not None:
            deadline = x.record({"k": "deadline", "until": time.time() + _seconds(timeout)})
            until = float(deadline["until"])
        while True:
            outcome = await x.suspend(until, events=True)
            await x.deliver()
            delivered = x.pop_mailbox(name)
            if delivered is not None:
                return delivered.value
            if outcome == "timer":
                x.record({"k": "timer"})
                raise ReceiveTimeout(f"no {name!r} event within {timeout}")

    def handle(self, name: str, cb: Callable[[Any], Any]) -> None:
        """Call ``cb(value)`` for each event called ``name``, in arrival order.

        Handlers fire at the workflow's next primitive call, for events that
        arrived before or after registration and that no ``receive`` took.
        """
        self._x.handlers.setdefault(name, []).append(cb)

    async def ensure(self, predicate: Callable[[], bool]) -> bool:
        """Wait until ``predicate()`` holds; it is re-checked whenever an event arrives."""
        x = self._x
        await x.deliver()
        while not predicate():
            await x.suspend(None, events=True)
            await x.deliver()
        return True

    # -- recorded values -------------------------------------------------------

    def log(self, message: str, *args: Any, level: int = logging.INFO, **data: Any) -> None:
        """Record a log line; it is emitted once, not again on replay."""
        text = message % args if args else message
        record: dict[str, Any] = {"k": "log", "level": level, "msg": text}
        if data:
            encode_value(data)
            record["data"] = data
        if self._x.take("log") is None:
            self._x.pending.append(record)
            logger.log(level, "[%s] %s", self._run_id, text, extra={"run_id": self._run_id})

    def now(self) -> datetime:
        """Return the current time (UTC), the same on every replay."""
        value = self._x.record({"k": "now", "value": time.time()})["value"]
        return datetime.fromtimestamp(float(value), UTC)

    def random(self) -> float:
        """Return a random float in [0, 1), the same on every replay."""
        return float(self._x.record({"k": "random", "value": _random.random()})["value"])

    def uuid4(self) -> _uuid.UUID:
        """Return a random UUID, the same on every replay."""
        return _uuid.UUID(self._x.record({"k": "uuid", "value": str(_uuid.uuid4())})["value"])

    # -- advanced --------------------------------------------------------------

    async def revert(self) -> None:
        """Run the compensations of completed steps, newest first, then end the run as reverted."""
        x = self._x
        await x.deliver()
        for comp in reversed(x.compensations):
            recorded = x.take("compensated", comp.name)
            if recorded is not None:
                continue
            await x.flush()
            takes_value = bool(
                [
                    p
                    for p in inspect.signature(comp.fn).parameters.values()
                    if p.default is p.empty
                    and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                ]
            )
            policy = DEFAULT_RETRY
            attempt = 0
            while True:
                attempt += 1
                try:
                    await _call(comp.fn, (comp.value,) if takes_value else (), None)
                    break
                except Exception as exc:
                    if attempt >= policy.max_attempts:
                        raise StepFailed(
                            f"compensation of {comp.name}", type(exc).__name__, str(exc), attempt
                        ) from exc
                    await asyncio.sleep(policy.delay(attempt))
            await x.flush({"k": "compensated", "name": comp.name})
        x.compensations.clear()
        raise Reverted()

    async def continue_using(self, workflow: Workflow[Any], /, **kwargs: Any) -> None:
        """End this run and start ``workflow(**kwargs)`` as its successor; never returns."""
        await self._x.deliver()
        self._refuse_with_compensations("continue_using()")
        raise ContinueAs(workflow.name, workflow.version, orjson.loads(encode_value(kwargs)))

    async def compact(self, **kwargs: Any) -> None:
        """Restart this run's function from a snapshot, so replay stays short; never returns.

        The function is called again with its original arguments updated by
        ``kwargs``: pass the state the rest of the run needs. Values saved
        with ``key=`` are carried over; the log before the snapshot is no
        longer replayed.
        """
        await self._x.deliver()
        self._refuse_with_compensations("compact()")
        raise Compact(orjson.loads(encode_value(kwargs)))

    def _refuse_with_compensations(self, what: str) -> None:
        count = len(self._x.compensations)
        if count:
            raise InvalidArgument(
                f"{what} would drop the compensations of {count} completed step(s), which "
                "revert() could then no longer run: call revert() first, or call "
                f"{what} before the steps that have compensations"
            )
