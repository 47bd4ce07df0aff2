"""The Backend contract: the few storage primitives everything else is built on.

A backend stores opaque bytes. It knows nothing about workflows; replay,
scheduling policy, lease renewal and compaction live above it. Every
backend passes the same conformance suite (``tests/test_backend_contract.py``).

Guarantees every implementation gives:

* ``append`` is create-if-absent: of many concurrent writers at one position
  exactly one succeeds and the others get :class:`PositionTaken`. No reader
  ever observes a partially written entry, even after a crash mid-write.
* ``post_event`` stores an event once per ``event_id``; the inbox is read in
  arrival order.
* ``due`` answers from a time-ordered index without scanning every run.
* Lease operations are atomic compare-and-set on (owner, expiry). Leases only
  avoid wasted work: correctness comes from ``append``'s fencing.

See docs/PROTOCOL.md for the layout each backend uses.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import ClassVar

from substantial.backends._owner import host_owner_is_dead, make_owner
from substantial.backends._types import (
    PROTOCOL_VERSION,
    RUN_STATUSES,
    TERMINAL_STATUSES,
    Capabilities,
    DueRuns,
    Durability,
    ErrorInfo,
    Event,
    Lease,
    NewEvent,
    RunInfo,
    RunStatus,
    Waker,
    encode_json,
    error_info,
    validate_id,
)
from substantial.errors import PositionTaken

__all__ = [
    "PROTOCOL_VERSION",
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "Backend",
    "Capabilities",
    "DueRuns",
    "Durability",
    "ErrorInfo",
    "Event",
    "Lease",
    "NewEvent",
    "RunInfo",
    "RunStatus",
    "Waker",
    "encode_json",
    "error_info",
    "host_owner_is_dead",
    "make_owner",
    "validate_id",
]


class Backend(abc.ABC):
    """Storage for run logs, inboxes, the due index, leases and run metadata.

    All methods are coroutines and may raise :class:`BackendUnavailable`
    when the store cannot be reached; writes that raise it either did not
    happen or can be retried as they are.
    """

    #: Short name used in URLs, logs and benchmarks.
    name: str = "abstract"
    #: What this backend offers beyond the contract (see :class:`Capabilities`).
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self) -> None:
        self.waker = Waker()

    # -- the log ----------------------------------------------------------

    @abc.abstractmethod
    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store ``entry`` at ``position`` of the run's log if that position is free.

        An entry is one atomic unit holding one or more records. Raises
        :class:`PositionTaken` if the position already holds an entry; the
        stored entry is left untouched. Concurrent callers at one position:
        exactly one succeeds.
        """

    @abc.abstractmethod
    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Return the entries at ``start``, ``start+1``, ... up to the first free position."""

    # -- the inbox --------------------------------------------------------

    @abc.abstractmethod
    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add an event to the run's inbox unless ``event_id`` is already there.

        Returns True if stored now, False if an event with that id was
        already in the inbox (the stored one is kept).
        """

    @abc.abstractmethod
    async def read_inbox(self, run_id: str) -> list[Event]:
        """Return the run's pending events in arrival order."""

    @abc.abstractmethod
    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Remove events from the inbox once the log has recorded them; unknown ids are ignored."""

    # -- the due index ----------------------------------------------------

    @abc.abstractmethod
    async def schedule(self, run_id: str, at: float) -> None:
        """Set the time (epoch seconds) at which the run is next due, replacing any earlier one."""

    @abc.abstractmethod
    async def unschedule(self, run_id: str) -> None:
        """Remove the run from the due index (it waits for an event, or it ended)."""

    @abc.abstractmethod
    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Return up to ``limit`` ``(run_id, at)`` with ``at <= now``, earliest first."""

    @abc.abstractmethod
    async def next_due_at(self) -> float | None:
        """Return the earliest scheduled time in the index, or None if it is empty."""

    # -- leases -----------------------------------------------------------

    @abc.abstractmethod
    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take the run's lease for ``ttl`` seconds.

        Succeeds if no lease exists, it has expired, it is already held by
        ``owner`` (a renewal), or it is held by ``steal_from``. Atomic.
        """

    @abc.abstractmethod
    async def release_lease(self, run_id: str, owner: str) -> None:
        """Drop the lease if ``owner`` holds it; otherwise do nothing."""

    @abc.abstractmethod
    async def get_lease(self, run_id: str) -> Lease | None:
        """Return the current lease, expired or not, or None."""

    # -- run metadata -----------------------------------------------------

    @abc.abstractmethod
    async def put_run(self, info: RunInfo) -> None:
        """Create or replace the run's metadata (atomically: readers see old or new)."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunInfo | None:
        """Return the run's metadata, or None if there is no such run."""

    @abc.abstractmethod
    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """Return runs ordered by run id, after the id ``after``, filtered by status/workflow."""

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until something may have become due, or ``timeout`` seconds pass.

        Backends with a cross-process signal feed it into ``self.waker``;
        the fallback is a plain timed sleep (polling).
        """
        return await self.waker.wait(timeout)

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and files; the backend is unusable afterwards."""

    # -- shared helpers built on the primitives ---------------------------

    async def create_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool:
        """Write a new run's first entry, metadata and schedule; False if it existed.

        The first entry at position 0 is the fence: of two starts with one
        run id, one wins. A start that crashed half-way is completed by a
        retry with the same id. Backends with transactions override this to
        do all three at once.
        """
        validate_id("run id", info.run_id)
        try:
            await self.append(info.run_id, 0, entry)
        except PositionTaken:
            existing = await self.get_run(info.run_id)
            if existing is None:
                await self.put_run(info)
                await self.schedule(info.run_id, due_at)
            elif existing.status == "active" and not await self.read_log(info.run_id, 1):
                # A start that died between metadata and schedule: nothing has run, and
                # with no due entry nothing would. Scheduling it again is at worst a wake-up.
                await self.schedule(info.run_id, due_at)
            return False
        await self.put_run(info)
        await self.schedule(info.run_id, due_at)
        return True

    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Post an event and make the run due now, so a worker picks it up."""
        stored = await self.post_event(run_id, event_id, data)
        await self.schedule(run_id, time.time())
        return stored

    async def try_lease(self, run_id: str, owner: str, ttl: float) -> bool:
        """Take the lease, or take it over from a dead process on this host."""
        if await self.acquire_lease(run_id, owner, ttl):
            return True
        lease = await self.get_lease(run_id)
        if lease is not None and lease.owner != owner and host_owner_is_dead(lease.owner):
            return await self.acquire_lease(run_id, owner, ttl, steal_from=lease.owner)
        return False

    def describe(self) -> str:
        """Return a short human-readable description, e.g. for the CLI."""
        return self.name
