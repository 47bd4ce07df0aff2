"""A test environment: a store, a worker and a clock that skips ahead, with helpers.

The environment starts nothing until the test first awaits it, and then in
the test's own event loop: so a plain (synchronous) pytest fixture can hand
it out, whichever plugin (pytest-asyncio, anyio) runs the async test.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta
from typing import Any

from substantial import _clock
from substantial._durations import seconds
from substantial._timeskip import keep_time, settle, skip_time
from substantial.backends.base import Backend, RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.conductor import Agent, Conductor, Run
from substantial.errors import InvalidArgument
from substantial.records import Record, decode_entry
from substantial.workflow import Workflow

__all__ = ["WorkflowEnv", "log_records"]

#: Real seconds a helper waits for runs before it fails the test instead of hanging it.
PATIENCE = 10.0


async def log_records(backend: Backend, run_id: str) -> list[Record]:
    """Return every record of a run's log, in order: for assertions on what was recorded."""
    out: list[Record] = []
    for position, data in enumerate(await backend.read_log(run_id)):
        out.extend(decode_entry(run_id, position, data))
    return out


class WorkflowEnv:
    """A Conductor on a store (a fresh memory store by default) with a worker, for tests.

    ``worker_options`` go to :meth:`Conductor.run`. With ``time_skipping``
    (the default), durable time jumps ahead whenever the test awaits a run
    and every run waits, and :meth:`skip` moves it on explicitly; the clock
    returns to real time when the environment closes. One time-skipping
    environment at a time per process.

    The worker starts at the first ``await`` on the environment (or on
    ``async with``), in the running event loop; :meth:`aclose` stops it.
    """

    def __init__(
        self,
        *workflows: Workflow[Any],
        backend: Backend | None = None,
        time_skipping: bool = True,
        **worker_options: Any,
    ) -> None:
        self.conductor = Conductor(backend or MemoryBackend())
        self.time_skipping = time_skipping
        self._worker_options = worker_options
        self._agent: Agent | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._holder: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.register(*workflows)

    @property
    def backend(self) -> Backend:
        """The store the runs are kept in."""
        return self.conductor.backend

    def register(self, *workflows: Workflow[Any]) -> None:
        """Make ``workflows`` runnable (children, or workflows started by name)."""
        for wf in workflows:
            self.conductor.register(wf)

    # -- life --------------------------------------------------------------------

    async def _ensure(self) -> Conductor:
        """Start the worker (and the clock keeper) in the running loop, once."""
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
            self._agent = self.conductor.run(**self._worker_options)
            if self.time_skipping:
                self._keeper = loop.create_task(keep_time(self.conductor, self._agent.worker))
            self._holder = loop.create_task(self._hold())
        elif self._loop is not loop:
            raise InvalidArgument(
                "this test environment was started in another event loop: use one environment "
                "per test (the substantial_env fixture gives each test its own)"
            )
        return self.conductor

    async def _hold(self) -> None:
        """Wait until cancelled, then stop everything.

        Cancelled by :meth:`aclose`, or by the test's loop runner as it ends
        (pytest-asyncio and anyio cancel the tasks left before closing the
        loop): either way the worker stops and the store is closed in that loop.
        """
        try:
            await asyncio.get_running_loop().create_future()
        finally:
            try:
                if self._keeper is not None:
                    self._keeper.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._keeper
                if self._agent is not None:
                    self._agent.cancel()
                    await self._agent
                await self.conductor.close()
            finally:
                if self.time_skipping:
                    _clock.reset()

    async def aclose(self) -> None:
        """Stop the worker, close the store and return the clock to real time."""
        holder, self._holder = self._holder, None
        if holder is None:
            await self.conductor.close()
            return
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder

    def close_after(self) -> None:
        """Stop from synchronous code, once the loop that ran the test is no longer running.

        A closed loop was closed by its runner, which cancelled (and so
        stopped) the environment first; only the clock is left to reset.
        """
        loop = self._loop
        if loop is not None and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(self.aclose())
        elif self.time_skipping:
            _clock.reset()

    async def __aenter__(self) -> WorkflowEnv:
        await self._ensure()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- helpers -------------------------------------------------------------------

    async def start(
        self, wf: Workflow[Any] | str, kwargs: dict[str, Any] | None = None, **options: Any
    ) -> Run:
        """Start a run of ``wf`` (registered on the way) like :meth:`Conductor.start`."""
        if isinstance(wf, Workflow) and self.conductor.lookup(wf.name, wf.version) is None:
            self.register(wf)
        conductor = await self._ensure()
        return await conductor.start(wf, kwargs, **options)

    def run(self, run_id: str) -> Run:
        """Return the handle of the run ``run_id``."""
        return self.conductor.get(run_id)

    async def send(self, run: Run | str, name: str, value: Any = None) -> str:
        """Send event ``name`` with ``value`` to a run; return the event id."""
        await self._ensure()
        return await self._handle(run).send(name, value)

    async def result(self, run: Run | str, timeout: float = PATIENCE) -> Any:
        """Wait for a run's end, skipping time meanwhile; raise what ended it, as ``Run.result``.

        ``timeout`` is in real seconds: a run that cannot end fails the test
        with ``ResultTimeout`` instead of hanging it.
        """
        await self._ensure()
        return await self._handle(run).result(timeout=timeout)

    async def status(self, run: Run | str) -> RunInfo:
        """Return a run's metadata (``.status``, ``.output``, ``.error``, ...)."""
        await self._ensure()
        return await self._handle(run).status()

    async def records(self, run: Run | str) -> list[Record]:
        """Return the records of a run's log, in order."""
        return await log_records(self.backend, self._handle(run).run_id)

    async def settle(self, timeout: float = PATIENCE) -> None:
        """Wait until every run only waits (for time, an event or a child), without skipping."""
        conductor = await self._ensure()
        assert self._agent is not None
        try:
            await settle(self._agent.worker, conductor.backend, timeout)
        except TimeoutError:
            raise TimeoutError(f"runs were still busy after {timeout}s of real time") from None

    async def skip(self, delta: timedelta | float, timeout: float = PATIENCE) -> None:
        """Move the clock ``delta`` ahead (seconds or a timedelta), firing due timers in order.

        Returns once the runs have done what the passed time let them do and
        wait again. Only with ``time_skipping``.
        """
        if not self.time_skipping:
            raise InvalidArgument("skip() needs an environment made with time_skipping=True")
        jump = seconds(delta, "skip(delta)", instead="")
        conductor = await self._ensure()
        assert self._agent is not None
        try:
            await skip_time(self._agent.worker, conductor.backend, jump, timeout)
        except TimeoutError:
            raise TimeoutError(f"runs were still busy after {timeout}s of real time") from None

    def now(self) -> datetime:
        """Return the time as the runs see it (``c.now()``): real time plus what was skipped."""
        return datetime.fromtimestamp(_clock.now(), UTC)

    def _handle(self, run: Run | str) -> Run:
        return self.conductor.get(run) if isinstance(run, str) else run
