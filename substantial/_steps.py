"""Run step functions on the worker's loop: retries, timeouts, and where sync ones run.

A step's outcome is handed to the driver as a record (its completion, or a
failed attempt before a retry); the driver applies and writes it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from substantial import _clock, telemetry
from substantial._durations import seconds
from substantial.backends.base import ErrorInfo
from substantial.errors import InvalidArgument, SerializationError, StepTimeout
from substantial.records import Record, as_stored, error_of, unchanged_by_json
from substantial.replay import Command, Execution

__all__ = ["DEFAULT_RETRY", "Pace", "RetryPolicy", "StepSpec", "Steps"]

logger = logging.getLogger("substantial.workflow")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How ``save`` retries a failing step: exponential backoff, each attempt recorded.

    ``max_attempts=1`` disables retries. Delays are ``initial_delay *
    backoff ** (attempt - 1)``, capped at ``max_delay`` seconds. Only
    exceptions that are instances of ``retry_on`` (default: any) and of
    none of ``no_retry_on`` are retried; any other fails the step at once.
    """

    max_attempts: int = 5
    initial_delay: float = 0.1
    backoff: float = 2.0
    max_delay: float = 30.0
    retry_on: tuple[type[BaseException], ...] = ()
    no_retry_on: tuple[type[BaseException], ...] = ()

    def retries(self, exc: BaseException) -> bool:
        """Tell whether a step that raised ``exc`` may be tried again (attempts permitting)."""
        if self.no_retry_on and isinstance(exc, self.no_retry_on):
            return False
        return not self.retry_on or isinstance(exc, self.retry_on)

    def __post_init__(self) -> None:
        for name in ("retry_on", "no_retry_on"):
            kinds = getattr(self, name)
            kinds = (kinds,) if isinstance(kinds, type) else tuple(kinds)
            if not all(isinstance(k, type) and issubclass(k, BaseException) for k in kinds):
                raise InvalidArgument(
                    f"RetryPolicy({name}=...) takes exception classes, e.g. "
                    f"({name}=(TimeoutError, ConnectionError)), got {getattr(self, name)!r}"
                )
            object.__setattr__(self, name, kinds)
        attempts = self.max_attempts
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise InvalidArgument(
                f"RetryPolicy(max_attempts=...) takes a whole number >= 1, got {attempts!r} "
                "(1 means no retries)"
            )
        # Delays become due times in the log (an attempt's retry_at): the same checks as sleeps.
        for name in ("initial_delay", "max_delay"):
            value = seconds(getattr(self, name), f"RetryPolicy({name}=...)")
            object.__setattr__(self, name, value)
        backoff = self.backoff
        if (
            not isinstance(backoff, int | float)
            or isinstance(backoff, bool)
            or not 1 <= backoff < math.inf
        ):
            raise InvalidArgument(
                f"RetryPolicy(backoff=...) takes a finite number >= 1, got {backoff!r}"
            )

    def delay(self, attempt: int) -> float:
        """Return the pause after failed attempt number ``attempt`` (1-based)."""
        try:
            grown = self.initial_delay * self.backoff ** (attempt - 1)
        except OverflowError:  # a long run of attempts: the cap applies anyway
            grown = math.inf if self.initial_delay else 0.0
        return float(min(self.max_delay, grown))


DEFAULT_RETRY = RetryPolicy()


@dataclass(slots=True)
class StepSpec:
    """What a ``save`` (or a compensation) command runs."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    timeout: float | None
    retry: RetryPolicy
    key: str | None = None
    #: Attempts already recorded, and when the next one may start.
    attempts: int = 0
    retry_at: float = 0.0


_NEVER = float("inf")

#: Told (run id, command, name) each time a step or compensation function is called;
#: the crash simulator of the test kit counts calls with it. None in production.
watch: Callable[[str, int, str | None], None] | None = None
#: Types a step commonly returns, none of them awaitable (isawaitable is slow to say so).
_PLAIN = frozenset({int, str, float, bool, type(None), dict, list, tuple, bytes})


class Pace:
    """How long each sync step function took last time, so the quick ones run inline.

    A sync step goes to a thread so that a blocking call never stalls the
    worker's loop. For a function that returned within ``inline_below``
    seconds last time, the two thread hops cost more than the call: it runs
    on the loop instead. A function is first timed in a thread, and goes back
    to threads as soon as one inline call takes longer.
    """

    #: Functions remembered; past this the table starts afresh (it is only a hint).
    SIZE = 4096

    def __init__(self, inline_below: float = 0.001) -> None:
        self.inline_below = inline_below
        self._last: dict[object, float] = {}

    @staticmethod
    def key(fn: Callable[..., Any]) -> object:
        """Return what identifies ``fn`` across calls: its code (a lambda in a loop is one)."""
        code = getattr(fn, "__code__", None)  # a function, a lambda, a bound method
        if code is not None:
            return code
        while isinstance(fn, functools.partial):
            fn = fn.func
        fn = getattr(fn, "__func__", fn)
        return getattr(fn, "__code__", None) or type(fn)

    def quick(self, key: object) -> bool:
        """Tell whether the function of ``key`` returned within ``inline_below`` last time.

        Only sync functions are ever timed, so a quick one is never an ``async def``.
        """
        return self._last.get(key, _NEVER) < self.inline_below

    def note(self, key: object, seconds: float) -> None:
        """Remember how long a call of the function of ``key`` took."""
        if len(self._last) >= self.SIZE:
            self._last.clear()
        self._last[key] = seconds

    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call ``fn`` (in a step thread) and note how long it took."""
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.note(self.key(fn), time.perf_counter() - started)


class Steps:
    """Starts the step commands of one execution and posts what they produce."""

    def __init__(
        self,
        x: Execution,
        *,
        executor: Executor | None,
        pace: Pace,
        post: Callable[[Record], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.x = x
        self.executor = executor
        self.pace = pace
        self.post = post
        self.spawn = spawn

    def start(self, command: Command) -> None:
        """Start a ``step`` or ``compensate`` command: inline if quick, else as a task."""
        spec: StepSpec = command.spec
        # Inline only: a first attempt, with no timeout (it could not be enforced), and no
        # span to open (a span needs the task path).
        if not (spec.attempts or spec.timeout is not None or telemetry.on):
            key = self.pace.key(spec.fn)
            if (
                self.pace.quick(key)
                if self.executor is not None
                else not inspect.iscoroutinefunction(spec.fn)
            ):
                self._step_inline(command, key)
                return
        self.spawn(self._run_step(command))

    def _step_inline(self, command: Command, key: object) -> None:
        """Run a quick sync step now; a failure that will be retried goes on as a task."""
        spec: StepSpec = command.spec
        if watch is not None:
            watch(self.x.run_id, command.c, command.name)
        started = time.perf_counter()
        try:
            result = spec.fn(*spec.args)
        except Exception as exc:
            self.pace.note(key, time.perf_counter() - started)
            pause = self._settle(command, 1, None, error_of(exc), spec.retry.retries(exc))
            if pause is not None:
                self.spawn(self._run_step(command, attempts=1, pause=pause))
            return
        self.pace.note(key, time.perf_counter() - started)
        if type(result) not in _PLAIN and inspect.isawaitable(result):
            self.pace.note(key, _NEVER)
            self.spawn(self._run_step(command, first=result))
            return
        self._settle(command, 1, result, None)

    async def _run_step(
        self,
        command: Command,
        *,
        attempts: int | None = None,
        pause: float = 0.0,
        first: Awaitable[Any] | None = None,
    ) -> None:
        spec: StepSpec = command.spec
        if attempts is None:
            attempts = spec.attempts
            pause = max(0.0, spec.retry_at - _clock.now()) if attempts else 0.0
        while True:
            if pause:
                await asyncio.sleep(pause)
            attempts += 1
            if watch is not None and first is None:
                watch(self.x.run_id, command.c, command.name)
            try:
                call = self._call(spec, first)
                if telemetry.on:
                    call = telemetry.step(call, self.x, command, attempts)
                value = await call
            except Exception as exc:
                settled = self._settle(
                    command, attempts, None, error_of(exc), spec.retry.retries(exc)
                )
            else:
                settled = self._settle(command, attempts, value, None)
            if settled is None:
                return
            pause, first = settled, None

    def _settle(
        self,
        command: Command,
        attempts: int,
        value: Any,
        error: ErrorInfo | None,
        retryable: bool = True,
    ) -> float | None:
        """Post a step's completion, or its failed attempt; return the pause before a retry."""
        spec: StepSpec = command.spec
        x = self.x
        kind = "step" if command.kind == "step" else "compensated"
        if error is None:
            try:
                if not unchanged_by_json(value):  # else no need to name it for an error
                    what = f"the result of step {command.name!r} of run {x.run_id!r}"
                    value = as_stored(value, what, "result")
            except SerializationError as exc:
                error = error_of(exc)
                attempts = spec.retry.max_attempts  # retrying would store nothing either
            else:
                done: Record = {"k": kind, "c": command.c, "name": command.name, "t": x.now()}
                if kind == "step":
                    done["value"] = value
                    if spec.key is not None:
                        done["key"] = spec.key
                self.post(done)
                return None
        if attempts >= spec.retry.max_attempts or not retryable:
            self.post(
                {
                    "k": kind,
                    "c": command.c,
                    "name": command.name,
                    "error": error,
                    "attempts": attempts,
                    "t": x.now(),
                }
            )
            return None
        pause = spec.retry.delay(attempts)
        if kind == "step":
            self.post(
                {
                    "k": "attempt",
                    "c": command.c,
                    "name": command.name,
                    "n": attempts,
                    "error": error,
                    "retry_at": _clock.now() + pause,
                }
            )
        logger.warning(
            "run %s: %s %r attempt %d failed: %s: %s; retrying in %.2fs",
            x.run_id,
            "step" if kind == "step" else "compensation of",
            command.name,
            attempts,
            error["type"],
            error["message"],
            pause,
        )
        return pause

    async def _call(self, spec: StepSpec, first: Awaitable[Any] | None = None) -> Any:
        started = time.monotonic()
        try:
            async with asyncio.timeout(spec.timeout):
                fn = spec.fn
                if first is not None:
                    return await first
                if inspect.iscoroutinefunction(fn):
                    return await fn(*spec.args)
                if self.executor is None:
                    result = fn(*spec.args)
                else:
                    # Sync step functions run in threads: a blocking call in one step never
                    # stalls the other steps of this run, or other runs.
                    ctx = contextvars.copy_context()
                    call = functools.partial(ctx.run, self.pace.timed, fn, *spec.args)
                    result = await asyncio.get_running_loop().run_in_executor(self.executor, call)
                return await result if inspect.isawaitable(result) else result
        except TimeoutError as exc:
            if spec.timeout is None or time.monotonic() - started < spec.timeout:
                raise  # the step's own TimeoutError, not ours
            raise StepTimeout(f"the step took longer than its timeout of {spec.timeout}s") from exc
