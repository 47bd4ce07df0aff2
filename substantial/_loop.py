"""A deterministic asyncio event loop for workflow code.

Each run's workflow coroutine (and every task it creates) lives on its own
:class:`WorkflowLoop`. The worker never lets that loop run by itself: it
calls :meth:`WorkflowLoop.run_until_idle` after handing the workflow one
completion, and the loop runs ready callbacks, in the order they were
scheduled, until every task of the workflow is blocked. Nothing on this loop
depends on wall time or I/O, so the same completions delivered in the same
order make the workflow issue the same commands in the same order, live or
on replay, whatever ``gather``/``TaskGroup``/``wait`` shapes it uses.

Timers (``asyncio.sleep``, ``asyncio.timeout``, ``wait_for``) become durable
timers through :class:`TimerHost`; ``loop.time()`` is the workflow's recorded
time. Facilities that would make the workflow depend on the outside world
(threads, sockets, subprocesses, signals) raise :class:`WorkflowMisuse`
naming what to use instead. Temporal's per-workflow event loop
(``temporalio/worker/_workflow_instance.py``) is the model.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Protocol, TypeVar

from substantial.errors import WorkflowMisuse

__all__ = ["TimerHost", "WorkflowLoop"]

T = TypeVar("T")
logger = logging.getLogger("substantial.workflow")


class TimerHost(Protocol):
    """Who turns the loop's timers into durable timers: the run's execution."""

    def add_timer(self, when: float, handle: asyncio.TimerHandle) -> None:
        """Fire ``handle`` (via :meth:`WorkflowLoop.fire`) once epoch time ``when`` passes."""

    def cancel_timer(self, handle: asyncio.TimerHandle) -> None:
        """Forget a timer the workflow cancelled."""


_INSTEAD = {
    "run_in_executor": "do blocking work inside `await c.save(f)`",
    "call_soon_threadsafe": "do threaded work inside `await c.save(f)`",
    "getaddrinfo": "do network I/O inside `await c.save(f)`",
    "getnameinfo": "do network I/O inside `await c.save(f)`",
    "create_connection": "do network I/O inside `await c.save(f)`",
    "create_datagram_endpoint": "do network I/O inside `await c.save(f)`",
    "create_server": "do network I/O inside `await c.save(f)`",
    "create_unix_connection": "do network I/O inside `await c.save(f)`",
    "create_unix_server": "do network I/O inside `await c.save(f)`",
    "connect_accepted_socket": "do network I/O inside `await c.save(f)`",
    "sock_recv": "do network I/O inside `await c.save(f)`",
    "sock_recv_into": "do network I/O inside `await c.save(f)`",
    "sock_sendall": "do network I/O inside `await c.save(f)`",
    "sock_connect": "do network I/O inside `await c.save(f)`",
    "sock_accept": "do network I/O inside `await c.save(f)`",
    "sock_sendfile": "do network I/O inside `await c.save(f)`",
    "sendfile": "do network I/O inside `await c.save(f)`",
    "start_tls": "do network I/O inside `await c.save(f)`",
    "connect_read_pipe": "do I/O inside `await c.save(f)`",
    "connect_write_pipe": "do I/O inside `await c.save(f)`",
    "subprocess_exec": "run processes inside `await c.save(f)`",
    "subprocess_shell": "run processes inside `await c.save(f)`",
    "add_reader": "do I/O inside `await c.save(f)`",
    "add_writer": "do I/O inside `await c.save(f)`",
    "add_signal_handler": "handle signals in the worker process, not in a workflow",
    "run_forever": "let the worker drive the workflow",
    "run_until_complete": "let the worker drive the workflow",
    "shutdown_default_executor": "let the worker manage executors",
}


def _refuse(name: str) -> Callable[..., Any]:
    def refused(self: WorkflowLoop, *args: Any, **kwargs: Any) -> Any:
        raise WorkflowMisuse(
            f"loop.{name}() was called inside a workflow, where it would make replay depend "
            f"on the outside world: {_INSTEAD[name]} (see docs/determinism.md)"
        )

    refused.__name__ = name
    return refused


class WorkflowLoop(asyncio.AbstractEventLoop):
    """The event loop every task of one workflow run lives on; stepped by the worker."""

    def __init__(self, host: TimerHost) -> None:
        self._ready: collections.deque[asyncio.Handle] = collections.deque()
        self._host = host
        #: The workflow's clock (epoch seconds): the time of the latest completion.
        self.now = 0.0
        self._closed = False
        #: Errors of tasks nobody awaited, reported once the loop is idle.
        self.unhandled: list[BaseException] = []
        # asyncio.all_tasks() scans every task of the process: with many runs in
        # flight, a run's teardown would cost O(runs). The loop keeps its own.
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- stepping ----------------------------------------------------------------

    def run_until_idle(self) -> None:
        """Run ready callbacks until every task of the workflow is blocked."""
        previous = asyncio.events._get_running_loop()
        asyncio.events._set_running_loop(self)
        try:
            ready = self._ready
            while ready:
                handle = ready.popleft()
                if not handle._cancelled:
                    handle._run()
        finally:
            asyncio.events._set_running_loop(previous)

    def fire(self, handle: asyncio.TimerHandle) -> None:
        """Make a durable timer's callback ready (the worker then runs the loop)."""
        if not handle.cancelled():
            self._ready.append(handle)

    @property
    def idle(self) -> bool:
        """Tell whether nothing is ready to run."""
        return not self._ready

    # -- scheduling --------------------------------------------------------------

    def call_soon(  # type: ignore[override]
        self,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        """Queue ``callback`` to run at the next step, after what is already queued."""
        handle = asyncio.Handle(callback, args, self, context)
        self._ready.append(handle)
        return handle

    def call_later(  # type: ignore[override]
        self,
        delay: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule ``callback`` after ``delay`` seconds of workflow time, durably."""
        return self.call_at(self.now + delay, callback, *args, context=context)

    def call_at(  # type: ignore[override]
        self,
        when: float,
        callback: Callable[..., object],
        *args: Any,
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        """Schedule ``callback`` at epoch time ``when``, as a durable timer of the run."""
        handle = asyncio.TimerHandle(when, callback, args, self, context)
        self._host.add_timer(when, handle)
        return handle

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        self._host.cancel_timer(handle)

    def time(self) -> float:
        """Return the workflow's time: recorded, so the same on every replay."""
        return self.now

    # -- futures and tasks -------------------------------------------------------

    def create_future(self) -> asyncio.Future[Any]:
        """Return a future bound to this loop."""
        return asyncio.Future(loop=self)

    def create_task(
        self,
        coro: Generator[Any, None, T] | Coroutine[Any, Any, T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[T]:
        """Wrap ``coro`` in a task of this workflow."""
        task = asyncio.Task(coro, loop=self, name=name, context=context)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def all_tasks(self) -> list[asyncio.Task[Any]]:
        """Return the workflow's tasks that have not finished."""
        return [t for t in self._tasks if not t.done()]

    def get_task_factory(self) -> None:
        """Return None: workflow tasks are plain asyncio tasks."""
        return None

    # -- state -------------------------------------------------------------------

    def is_running(self) -> bool:
        """Tell whether the loop is being stepped; workflow code always sees True."""
        return True

    def is_closed(self) -> bool:
        """Tell whether the run has been torn down."""
        return self._closed

    def close(self) -> None:
        """Drop everything still queued."""
        self._closed = True
        self._ready.clear()

    #: Debug mode is off on workflow loops. ``bool()`` is False without a Python frame:
    #: asyncio calls this for every future it makes.
    get_debug = staticmethod(bool)

    def set_debug(self, enabled: bool) -> None:
        """Ignore: debug mode stays off."""

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        """Keep errors nobody retrieved, so the run can report them."""
        exc = context.get("exception")
        if isinstance(exc, BaseException):
            self.unhandled.append(exc)
        else:
            logger.warning("workflow loop: %s", context.get("message"))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        """Route to :meth:`default_exception_handler`."""
        self.default_exception_handler(context)

    def get_exception_handler(self) -> None:
        """Return None: the default handler is used."""
        return None

    async def shutdown_asyncgens(self) -> None:
        """Do nothing: the worker owns the lifetime of workflow code."""


for _name in _INSTEAD:
    setattr(WorkflowLoop, _name, _refuse(_name))
