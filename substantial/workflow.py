"""The ``@workflow`` decorator, and the registry workers look workflows up in."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from substantial._durations import seconds
from substantial._timetable import Timetable, timetable
from substantial.backends.base import validate_id
from substantial.errors import InvalidArgument

if TYPE_CHECKING:
    from substantial._steps import RetryPolicy
    from substantial.context import Context

__all__ = ["ChildSpec", "Registry", "Workflow", "workflow"]

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Workflow(Generic[R]):
    """A registered-able workflow: an ``async def f(c: Context, **kwargs)`` with a name.

    ``version`` pins runs to code: a run started on version ``"2"`` is only
    replayed by a worker that registered version ``"2"`` of this workflow.
    ``timeout`` (seconds) is the default deadline of its runs; ``retry`` the
    retry policy of its steps that do not give one; ``schedule`` the
    timetable a Conductor it is registered on starts it by.
    """

    fn: Callable[..., Awaitable[R]]
    name: str
    version: str | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None
    schedule: Timetable | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        """Return the registry key ``(name, version)``."""
        return (self.name, self.version)

    def __call__(self, c: Context, /, *args: Any, **kwargs: Any) -> Awaitable[R]:
        """Call the underlying function (what the engine does on every replay)."""
        return self.fn(c, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What a ``start_child`` command creates."""

    workflow: str
    version: str | None
    kwargs: dict[str, Any]
    run_id: str
    timeout: float | None
    abandon: bool
    #: The queue the child waits in before it runs (None: it runs at once), and its
    #: key and priority there.
    queue: str | None = None
    key: str | None = None
    priority: int = 0


def timeout_seconds(
    timeout: timedelta | float | None, what: str = "a run's timeout"
) -> float | None:
    """Return a run timeout in seconds (None: no deadline), refusing nonsense."""
    if timeout is None:
        return None
    return seconds(timeout, what, positive=True, instead="; pass None for no deadline")


@overload
def workflow(fn: Callable[..., Awaitable[R]], /) -> Workflow[R]: ...


@overload
def workflow(
    *,
    name: str | None = None,
    version: str | int | None = None,
    timeout: timedelta | float | None = None,
    retry: RetryPolicy | None = None,
    schedule: str | timedelta | Timetable | None = None,
) -> Callable[[Callable[..., Awaitable[R]]], Workflow[R]]: ...


def workflow(
    fn: Callable[..., Awaitable[R]] | None = None,
    /,
    *,
    name: str | None = None,
    version: str | int | None = None,
    timeout: timedelta | float | None = None,
    retry: RetryPolicy | None = None,
    schedule: str | timedelta | Timetable | None = None,
) -> Workflow[R] | Callable[[Callable[..., Awaitable[R]]], Workflow[R]]:
    """Declare an ``async def`` taking a :class:`Context` as a durable workflow.

    Use as ``@workflow()`` or ``@workflow(name="billing", version=2,
    timeout=timedelta(hours=1))``. The name defaults to the function's name
    and is what the log records, so renaming the function does not orphan
    runs in flight if ``name`` is kept. ``timeout`` gives every run a
    deadline (``start(..., timeout=...)`` overrides it). ``retry`` is the
    :class:`RetryPolicy` of every ``save`` that does not pass its own.
    ``schedule`` (a cron expression in UTC, a ``timedelta``, ``Cron(...)``
    or ``Every(...)``) starts the workflow on that timetable once it is
    registered on a Conductor that runs a worker (docs/schedules.md).
    """
    limit = timeout_seconds(timeout, "@workflow(timeout=...)")
    declared = timetable(schedule)
    from substantial._steps import RetryPolicy

    if retry is not None and not isinstance(retry, RetryPolicy):
        raise InvalidArgument(f"@workflow(retry=...) takes a RetryPolicy, got {retry!r}")

    def wrap(f: Callable[..., Awaitable[R]]) -> Workflow[R]:
        if not inspect.iscoroutinefunction(f):
            raise InvalidArgument(
                f"@workflow needs an `async def` function, got {f!r}: "
                "declare it as `async def name(c: Context, ...)`"
            )
        wf_name = validate_id("workflow name", name or f.__name__)
        return Workflow(
            fn=f,
            name=wf_name,
            version=None if version is None else str(version),
            timeout=limit,
            retry=retry,
            schedule=declared,
        )

    if fn is not None:
        return wrap(fn)
    return wrap


class Registry:
    """The workflows a process can run, by name and version."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str | None], Workflow[Any]] = {}
        self._latest: dict[str, Workflow[Any]] = {}

    def register(self, wf: Workflow[Any]) -> Workflow[Any]:
        """Add ``wf``; the last version registered under a name is the one new runs use."""
        if not isinstance(wf, Workflow):
            raise InvalidArgument(
                f"register() takes a function decorated with @workflow(), got {wf!r}"
            )
        self._by_key[wf.key] = wf
        self._latest[wf.name] = wf
        return wf

    def lookup(self, name: str, version: str | None) -> Workflow[Any] | None:
        """Return the workflow for a run's recorded name and version."""
        return self._by_key.get((name, version))

    def latest(self, name: str) -> Workflow[Any] | None:
        """Return the last version registered under ``name``."""
        return self._latest.get(name)
