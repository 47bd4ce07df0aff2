"""What a run's commands do outside its own log: start children, send events, publish."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Protocol

from substantial import _clock, queues, telemetry
from substantial._runs import create_run, existing_start, same_start
from substantial.backends.base import Backend
from substantial.errors import InvalidArgument, RunConflict
from substantial.records import encode_value, start_record
from substantial.replay import Command, Execution
from substantial.workflow import ChildSpec

if TYPE_CHECKING:
    from substantial._held import LiveRun

__all__ = ["Effects", "RunEffects"]


class Effects(Protocol):
    """What a run's commands do to other runs and to metadata (the worker provides it)."""

    async def start_child(self, x: Execution, command: Command) -> str:
        """Create the child run (idempotent by its id); return its id."""

    async def send(self, run_id: str, event_id: str, name: str, value: Any) -> None:
        """Post an event to another run (idempotent by ``event_id``)."""

    async def publish(self, x: Execution) -> None:
        """Make the run's published values readable by clients."""


class RunEffects:
    """The worker's :class:`Effects`: what one run's commands do outside its own log."""

    def __init__(
        self,
        backend: Backend,
        live: LiveRun,
        queue_ready: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.backend = backend
        self.live = live
        #: Make sure a queue is stored (the Conductor stores the ones it declares).
        self.queue_ready = queue_ready or self._queue_stored

    async def _queue_stored(self, name: str) -> None:
        if await self.backend.get_run(queues.queue_run_id(name)) is None:
            raise InvalidArgument(
                f"no queue named {name!r}: declare it on the Conductor of this worker, "
                f"Conductor(backend, queues=[Queue({name!r}, concurrency=...)])"
            )

    async def start_child(self, x: Execution, command: Command) -> str:
        spec: ChildSpec = command.spec
        now = _clock.now()
        parent_deadline = self.live.info.deadline if self.live.info is not None else None
        deadline = None if spec.timeout is None else now + spec.timeout
        if parent_deadline is not None:
            deadline = parent_deadline if deadline is None else min(deadline, parent_deadline)
        record = start_record(
            spec.run_id,
            spec.workflow,
            spec.version,
            spec.kwargs,
            now,
            parent=x.run_id,
            deadline=deadline,
            abandon=spec.abandon,
            trace=telemetry.carrier() if telemetry.on else None,  # under the parent's run span
        )
        if spec.queue is None:
            created = await create_run(self.backend, record)
        else:
            await self.queue_ready(spec.queue)
            created = await queues.start_queued(
                self.backend, record, spec.queue, key=spec.key, priority=spec.priority
            )
        if created and telemetry.on:
            telemetry.run_started(spec.workflow)
        if not created:
            existing = await existing_start(self.backend, spec.run_id)
            if not same_start(existing, record):
                raise RunConflict(
                    f"cannot start child {spec.run_id!r}: a run with that id exists and was "
                    "not started by this command; give start_child another run_id"
                )
        return spec.run_id

    async def send(self, run_id: str, event_id: str, name: str, value: Any) -> None:
        body = encode_value({"name": name, "value": value})
        await self.backend.send_event(run_id, event_id, body)

    async def publish(self, x: Execution) -> None:
        backend = self.backend
        info = self.live.info or await backend.get_run(x.run_id)
        if info is not None:
            info = replace(info, published=dict(x.published), updated_at=_clock.now())
            self.live.info = info
            await backend.put_run(info)
