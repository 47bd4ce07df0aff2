"""The client API: register workflows, start runs, talk to them, run a worker."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from datetime import timedelta
from typing import Any

from substantial import _clock, telemetry
from substantial._codec_backend import CodecBackend
from substantial._durations import seconds
from substantial._flow import FlowControl
from substantial._list_runs import list_runs
from substantial._retention import Pruning
from substantial._runs import create_run, existing_start, same_start
from substantial._surgery import Surgery
from substantial.backends import from_url
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo, Waker, validate_id
from substantial.codecs import Codec
from substantial.errors import (
    InvalidArgument,
    ResultTimeout,
    RunCancelled,
    RunConflict,
    RunNotFound,
    RunReverted,
    UnknownWorkflow,
    WorkflowFailed,
)
from substantial.queues import Queue
from substantial.records import as_stored, decode_entry, encode_value, start_record
from substantial.replay import CANCEL_EVENT
from substantial.retention import Retention
from substantial.worker import Worker
from substantial.workflow import Registry, Workflow, timeout_seconds

__all__ = ["Agent", "Conductor", "Run"]


def _client_timeout(timeout: float | None, what: str) -> float | None:
    """Check the timeout of a client call; None waits without a limit."""
    if timeout is None:
        return None
    return seconds(timeout, what, instead="; pass None to wait without a limit")


class Conductor(FlowControl, Surgery, Pruning):
    """Start and follow runs on one backend, and run workers for registered workflows.

    ``backend`` is a :class:`Backend` or a URL such as ``sqlite:///./runs.db``;
    ``codec`` (:mod:`substantial.codecs`) encodes every value of every run
    before it reaches the store, e.g. ``Encrypt(key)``: workers and clients
    of the store must all use the same codec.
    """

    def __init__(
        self, backend: Backend | str, *, queues: Sequence[Queue] = (), codec: Codec | None = None
    ) -> None:
        store = from_url(backend) if isinstance(backend, str) else backend
        self.backend: Backend = store if codec is None else CodecBackend(store, codec)
        self.registry = Registry()
        self._register_flow(queues)
        # Clients waiting on a run are woken when this process's worker ends it; one
        # signal per run, so a thousand waiters do not all wake for every ending.
        self._ended: dict[str, tuple[Waker, list[int]]] = {}

    # -- registry --------------------------------------------------------------

    def register(self, wf: Workflow[Any]) -> Workflow[Any]:
        """Make ``wf`` runnable by this conductor's workers.

        The last version registered under a name is the one new runs start with;
        a workflow declared with ``@workflow(schedule=...)`` gets its schedule
        when this conductor starts a worker.
        """
        self._declare_schedule(wf)
        return self.registry.register(wf)

    def lookup(self, name: str, version: str | None) -> Workflow[Any] | None:
        """Return the registered workflow for a run's recorded name and version."""
        return self.registry.lookup(name, version)

    # -- runs ------------------------------------------------------------------

    async def start(
        self,
        wf: Workflow[Any] | str,
        kwargs: dict[str, Any] | None = None,
        *,
        run_id: str | None = None,
        timeout: timedelta | float | None = None,
        queue: str | None = None,
        key: str | None = None,
        priority: int = 0,
        dedup_id: str | None = None,
        delay: timedelta | float | None = None,
        debounce: timedelta | float | None = None,
    ) -> Run:
        """Start a run of ``wf`` with keyword arguments ``kwargs``; return its handle.

        With ``run_id``, starting twice returns the existing run instead of
        starting another (the backend's create-if-absent decides); if that run
        was started with other arguments, :class:`RunConflict` is raised.
        ``timeout`` gives the run a deadline (default: the workflow's
        ``timeout``): once it passes, ``WorkflowTimeout`` is raised inside the
        workflow and the run ends as ``timed_out``.

        With ``queue``, the run waits in that queue until its limits admit it
        (docs/queues.md): ``key`` for per-key limits and debounce, higher
        ``priority`` first, one run per ``dedup_id``, no earlier than ``delay``,
        and starts within ``debounce`` of each other collapsed into the last.
        """
        if isinstance(wf, str):
            found = self.registry.latest(wf)
            if found is None:
                raise UnknownWorkflow(
                    f"no workflow named {wf!r} is registered: call conductor.register(...) with "
                    "it first, or pass the decorated function to start()"
                )
            wf = found
        elif not isinstance(wf, Workflow):
            raise InvalidArgument(f"start() takes a @workflow() function or its name, got {wf!r}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InvalidArgument("start() takes the workflow's arguments as a dict of kwargs")
        if run_id is not None and "+" in validate_id("run id", run_id):
            raise InvalidArgument(
                f"run id {run_id!r} contains '+', which names the successors of "
                "continue_using (run+1, run+2, ...): choose an id without '+'"
            )
        limit = wf.timeout if timeout is None else timeout_seconds(timeout, "start(timeout=...)")
        rid = run_id if run_id is not None else uuid.uuid4().hex
        now = _clock.now()
        args = as_stored(dict(kwargs or {}), "the workflow's arguments", "kwargs")
        record = start_record(
            rid,
            wf.name,
            wf.version,
            args,
            now,
            deadline=None if limit is None else now + limit,
            trace=telemetry.carrier() if telemetry.on else None,
        )
        options = (key, priority, dedup_id, delay, debounce)
        queued = await self._enqueue(record, queue, run_id is not None, *options)
        if queued is not None:
            # Created now, or there before? A fresh random id is new; else the start record
            # is ours only if it holds this call's time.
            if telemetry.on and (
                (run_id is None and dedup_id is None)
                or (await existing_start(self.backend, record["run_id"])).get("at") == now
            ):
                telemetry.run_started(wf.name)
            return queued
        created = await create_run(self.backend, record)
        if created and telemetry.on:
            telemetry.run_started(wf.name)
        if not created and run_id is not None:
            existing = await existing_start(self.backend, rid)
            if not same_start(existing, record):
                raise RunConflict(
                    f"run {rid!r} already exists with workflow {existing.get('workflow')!r} and "
                    f"arguments {existing.get('kwargs')!r}: starting it again with other "
                    "arguments would not start anything; choose another run_id"
                )
        return Run(self, rid)

    def get(self, run_id: str) -> Run:
        """Return a handle on an existing run."""
        return Run(self, validate_id("run id", run_id))

    async def search(
        self,
        expr: dict[str, Any],
        *,
        workflow: str | None = None,
        status: str | None = None,
        limit: int = 1000,
    ) -> list[RunInfo]:
        """Return runs whose result, error or times satisfy ``expr``, newest first.

        ``expr`` is a filter expression such as ``{"or": [{"lt": 3}, {"contains":
        "fatal"}]}`` (operators ``eq gt gte lt lte in contains``, combined with
        ``and or not``; see :mod:`substantial.search`). A malformed one raises
        :class:`InvalidArgument` naming the operator and what it expects.
        """
        from substantial.search import search

        return await search(self.backend, expr, workflow=workflow, status=status, limit=limit)

    async def list(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        parent: str | None = None,
        limit: int = 100,
        newest_first: bool = False,
        before: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """Return runs' metadata, ordered by run id; ``parent`` keeps one run's children.

        ``newest_first`` orders by creation time, then id, both descending
        (``Backend.list_recent``: from an index where the store has one);
        ``before``, the ``(created_at, run_id)`` of the last run of the
        previous page, pages it.
        """
        return await list_runs(
            self.backend,
            status=status,
            workflow=workflow,
            parent=parent,
            limit=limit,
            newest_first=newest_first,
            before=before,
        )

    # -- workers ---------------------------------------------------------------

    def run(
        self,
        *,
        concurrency: int = 1000,
        lease_ttl: float = 30.0,
        idle_timeout: float = 60.0,
        poll_interval: float = 5.0,
        shutdown_grace: float = 10.0,
        step_threads: int = 64,
        inline_below: float = 0.001,
        retention: Retention | None = None,
    ) -> Agent:
        """Start a worker in this process; ``agent.cancel(); await agent`` stops it cleanly.

        ``concurrency`` bounds the runs held at once; ``lease_ttl`` is how long
        another worker waits before taking over a run of a vanished worker on
        another host; runs waiting longer than ``idle_timeout`` seconds leave
        memory; ``poll_interval`` bounds the wait between index reads when no
        wake-up signal arrives; on stop, running steps get ``shutdown_grace``
        seconds to finish and be recorded; synchronous step functions run on
        up to ``step_threads`` threads, except those that returned within
        ``inline_below`` seconds last time: they run on the worker's loop,
        where a thread hop would cost more than the call (0 turns this off);
        ``retention`` deletes ended runs in the background (docs/retention.md).
        """
        worker = Worker(
            self.registry,
            self.backend,
            on_ended=self._run_ended,
            queue_ready=self._queue_ready,
            concurrency=concurrency,
            lease_ttl=lease_ttl,
            idle_timeout=idle_timeout,
            poll_interval=poll_interval,
            shutdown_grace=shutdown_grace,
            step_threads=step_threads,
            inline_below=inline_below,
            retention=retention,
        )
        agent = Agent(worker)
        self._store_schedules()
        return agent

    def _run_ended(self, run_id: str) -> None:
        watched = self._ended.get(run_id)
        if watched is not None:
            watched[0].notify()

    @contextlib.contextmanager
    def _watch(self, run_id: str) -> Iterator[Waker]:
        """Yield the signal of ``run_id``'s end, kept while any client waits on it."""
        waker, users = self._ended.setdefault(run_id, (Waker(), [0]))
        users[0] += 1
        try:
            yield waker
        finally:
            users[0] -= 1
            if not users[0]:
                del self._ended[run_id]

    async def close(self) -> None:
        """Close the backend (its connections, files and clients)."""
        await self.backend.close()

    async def aclose(self) -> None:
        """Close the backend, like :meth:`close`."""
        await self.close()

    async def __aenter__(self) -> Conductor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class Agent:
    """A worker running in this process, as a background task."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._task = asyncio.get_running_loop().create_task(worker.run(), name="substantial-agent")

    def cancel(self) -> None:
        """Ask the worker to stop: running steps get a grace period, held runs are released."""
        self._task.cancel()

    def done(self) -> bool:
        """Tell whether the worker has stopped."""
        return self._task.done()

    async def wait(self) -> None:
        """Wait until the worker has stopped; a requested stop is not an error."""
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    def __await__(self) -> Generator[Any, None, None]:
        """Wait until the worker has stopped."""
        return self.wait().__await__()


class Run:
    """A handle on one run: send it events, cancel it, wait for its result."""

    def __init__(self, conductor: Conductor, run_id: str) -> None:
        self._conductor = conductor
        self.run_id = run_id

    def __repr__(self) -> str:
        return f"Run({self.run_id!r})"

    async def send(self, name: str, value: Any = None, *, event_id: str | None = None) -> str:
        """Post event ``name`` with ``value`` to the run; return the event id.

        Give ``event_id`` to make retries safe: the same id is delivered once.
        """
        if not isinstance(name, str) or not name:
            raise InvalidArgument("an event name must be a non-empty string")
        eid = validate_id("event id", event_id) if event_id is not None else uuid.uuid4().hex
        data = encode_value({"name": name, "value": value}, f"event {name!r}", "event")
        backend = self._conductor.backend
        run_id = self.run_id
        while (info := await self._info(run_id)).status == "continued":
            run_id = info.output["next"]  # the chain's live run receives what the first would
        if info.status in TERMINAL_STATUSES:
            raise InvalidArgument(
                f"run {run_id!r} has ended ({info.status}): it can no longer receive events"
            )
        await backend.send_event(run_id, eid, data)
        # The run may have continued while we posted: make sure its successor gets the event
        # (idempotent by event id, and a successor skips ids its predecessor consumed).
        while (latest := await backend.get_run(run_id)) and latest.status == "continued":
            run_id = latest.output["next"]
            await backend.send_event(run_id, eid, data)
        return eid

    async def cancel(self) -> None:
        """Ask the run to stop; it ends as cancelled at its next step or wait."""
        await self.send(CANCEL_EVENT)

    async def status(self) -> RunInfo:
        """Return the run's current metadata."""
        return await self._info(self.run_id)

    async def _info(self, run_id: str) -> RunInfo:
        backend = self._conductor.backend
        info = await backend.get_run(run_id)
        if info is None:
            raise RunNotFound(f"no run with id {run_id!r} in {backend.describe()}: start it first")
        return info

    async def _info_by(self, run_id: str, deadline: float | None, timeout: float | None) -> RunInfo:
        """Read the run's metadata, giving up at the caller's deadline even if the store hangs.

        A frozen store makes a call wait for the backend's own timeouts (seconds to
        minutes, docs/RELIABILITY.md); ``result(timeout=1)`` must not.
        """
        if deadline is None:
            return await self._info(run_id)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.05)):
                return await self._info(run_id)
        except TimeoutError as exc:
            raise ResultTimeout(
                f"run {run_id!r}: the store did not answer within {timeout}s"
            ) from exc

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its value, following ``continue_using``.

        Raises :class:`WorkflowFailed`, :class:`RunCancelled` or
        :class:`RunReverted` if it ended otherwise, and :class:`ResultTimeout`
        if ``timeout`` seconds pass first.
        """
        timeout = _client_timeout(timeout, "result(timeout=...)")
        deadline = None if timeout is None else time.monotonic() + timeout
        run_id = self.run_id
        pause = 0.002
        with contextlib.ExitStack() as watching:
            ended = watching.enter_context(self._conductor._watch(run_id))
            while True:
                info = await self._info_by(run_id, deadline, timeout)
                if info.status == "continued":
                    run_id = info.output["next"]
                    ended = watching.enter_context(self._conductor._watch(run_id))
                    continue
                if info.status in TERMINAL_STATUSES:
                    return self._outcome(run_id, info)
                what = f"run {run_id!r} did not finish"
                pause = await self._pause(ended, pause, deadline, what, timeout)

    @staticmethod
    def _outcome(run_id: str, info: RunInfo) -> Any:
        """Return an ended run's value, or raise what its end was."""
        if info.status == "completed":
            return info.output
        if info.status in ("failed", "timed_out"):
            err = info.error or {"type": "Error", "message": "unknown"}
            raise WorkflowFailed(run_id, err["type"], err["message"], err.get("traceback"))
        if info.status == "cancelled":
            raise RunCancelled(f"run {run_id!r} was cancelled")
        raise RunReverted(f"run {run_id!r} was reverted: its compensations ran")

    async def _pause(
        self, ended: Waker, pause: float, deadline: float | None, what: str, timeout: float | None
    ) -> float:
        """Wait a little (less as the deadline nears), woken early when a local run ends."""
        wait = pause
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ResultTimeout(f"{what} within {timeout}s")
            wait = min(wait, left)
        await ended.wait(wait)
        return min(pause * 2, 0.25)

    async def read(self, key: str, timeout: float | None = None) -> Any:
        """Return the latest value the run published under ``key``, waiting until it has one.

        Raises :class:`ResultTimeout` if ``timeout`` seconds pass first, and
        :class:`InvalidArgument` if the run ended without publishing ``key``.
        """
        timeout = _client_timeout(timeout, "read(timeout=...)")
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        with self._conductor._watch(self.run_id) as ended:
            while True:
                info = await self._info_by(self.run_id, deadline, timeout)
                if info.published and key in info.published:
                    return info.published[key]
                if info.status in TERMINAL_STATUSES:
                    raise InvalidArgument(
                        f"run {self.run_id!r} ended ({info.status}) without publishing {key!r}"
                    )
                what = f"run {self.run_id!r} published no {key!r}"
                pause = await self._pause(ended, pause, deadline, what, timeout)

    async def stream(self, name: str, *, timeout: float | None = None) -> AsyncIterator[Any]:
        """Yield the values the run emits on stream ``name``, from the first; end with the run.

        ``timeout`` bounds the wait for each next item (:class:`ResultTimeout`).
        """
        timeout = _client_timeout(timeout, "stream(timeout=...)")
        run_id = self.run_id
        await self._info(run_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._conductor._watch(run_id) as ended:
            async for value in self._follow(run_id, name, ended, deadline, timeout):
                yield value

    async def _follow(
        self, run_id: str, name: str, ended: Waker, deadline: float | None, timeout: float | None
    ) -> AsyncIterator[Any]:
        backend = self._conductor.backend
        position = 0
        pause = 0.002
        while True:
            entries = await backend.read_log(run_id, position)
            finished = False
            for data in entries:
                for record in decode_entry(run_id, position, data):
                    if record["k"] == "emit" and record["stream"] == name:
                        yield record.get("value")
                    elif record["k"] == "end":
                        finished = True
                position += 1
            if finished:
                return
            if entries:
                pause = 0.002
                deadline = None if timeout is None else time.monotonic() + timeout
                continue
            what = f"run {run_id!r} emitted nothing more on {name!r}"
            pause = await self._pause(ended, pause, deadline, what, timeout)
