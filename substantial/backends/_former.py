"""The former contract's methods, written once on the eight primitives of the new one.

Callers of ``get_run``, ``send_event``, ``schedule``, ``acquire_lease`` ...
keep working while every backend implements only the primitives:
``append``, ``read_log``, ``read_inbox``, ``set_due``, ``due``, ``lease``,
``put_run`` and ``list_runs``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from substantial.backends import _hostile
from substantial.backends._common import check_time
from substantial.backends.base import DueRuns, Event, Lease, NewEvent, RunInfo, validate_id
from substantial.errors import CorruptRecord, ProtocolMismatch

__all__ = ["FormerContract"]


class FormerContract:
    """Mix in before :class:`Backend`: the former names, built on the primitives."""

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        raise NotImplementedError

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        raise NotImplementedError

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        raise NotImplementedError

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        raise NotImplementedError

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        raise NotImplementedError

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add an event to the run's inbox (and make the run due now)."""
        return await self.set_due(run_id, time.time(), event=NewEvent(event_id, data))

    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add an event to the run's inbox and make the run due now."""
        return await self.set_due(run_id, time.time(), event=NewEvent(event_id, data))

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Remove recorded events from the inbox; unknown and malformed ids are ignored."""
        await self.read_inbox(run_id, ack=event_ids)

    async def schedule(self, run_id: str, at: float) -> None:
        """Make the run due at ``at``."""
        await self.set_due(run_id, check_time(at))

    async def unschedule(self, run_id: str) -> None:
        """Take the run out of the due index."""
        await self.set_due(run_id, None)

    async def next_due_at(self) -> float | None:
        """Return the earliest due time in the index, or None."""
        return (await self.due(time.time(), 0)).next_at

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take or renew the lease; True if ``owner`` holds it now."""
        lease = await self.lease(run_id, owner, ttl, take_from=steal_from)
        return lease is not None and lease.owner == owner

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (an unreadable one goes too)."""
        lease = await self.lease(run_id)
        if lease is not None and (lease.owner == owner or _hostile.is_unreadable(lease)):
            await self.lease(run_id, lease.owner, 0)

    async def get_lease(self, run_id: str) -> Lease | None:
        """Return the run's lease, expired or not, or None."""
        return await self.lease(run_id)

    async def get_run(self, run_id: str) -> RunInfo | None:
        """Return the run's metadata, or None; raise CorruptRecord if it cannot be read."""
        validate_id("run id", run_id)
        found = await self.list_runs(ids=[run_id], limit=1)
        if not found:
            return None
        info = found[0]
        if info.status == "corrupt":
            error = info.error or {"type": "CorruptRecord", "message": "unreadable"}
            if error["type"] == "ProtocolMismatch":
                raise ProtocolMismatch(error["message"])
            raise CorruptRecord(run_id, "meta", error["message"])
        return info
