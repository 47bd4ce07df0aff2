"""An in-process backend: for tests, examples and the ``testing`` helpers.

Nothing survives the process. Every method completes without yielding to
the event loop between its check and its write, which makes each one atomic
for all tasks of the process.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from typing import Any

from substantial.backends import _hostile
from substantial.backends._common import (
    Page,
    ack_ids,
    check_position,
    check_time,
    filtered_runs,
    gap_error,
    lease_takable,
)
from substantial.backends.base import Backend, Event, Lease, RunInfo, validate_id
from substantial.errors import PositionTaken

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Keep everything in dictionaries of this process."""

    name = "memory"

    def __init__(self) -> None:
        super().__init__()
        self.logs: dict[str, list[bytes]] = {}
        self.inboxes: dict[str, dict[str, Event]] = {}
        self._due: list[tuple[float, str]] = []
        self._due_at: dict[str, float] = {}
        self.leases: dict[str, Lease] = {}
        self.runs: dict[str, bytes] = {}

    @classmethod
    def from_url(cls, url: str) -> MemoryBackend:
        """Open ``memory://``: a new, empty store of this process."""
        return cls()

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store the entry if ``position`` is the next free slot."""
        validate_id("run id", run_id)
        check_position(run_id, position)
        log = self.logs.get(run_id, [])
        if position < len(log):
            raise PositionTaken(run_id, position)
        if position > len(log):
            raise gap_error(run_id, position)
        self.logs.setdefault(run_id, log).append(bytes(entry))

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Return entries from ``start``."""
        validate_id("run id", run_id)
        check_position(run_id, start, "log start")
        return list(self.logs.get(run_id, ())[start:])

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add the event unless its id is already pending."""
        validate_id("run id", run_id)
        validate_id("event id", event_id)
        inbox = self.inboxes.setdefault(run_id, {})
        if event_id in inbox:
            return False
        inbox[event_id] = Event(event_id, bytes(data), time.time())
        self.waker.notify()
        return True

    async def read_inbox(self, run_id: str) -> list[Event]:
        """Return pending events in insertion (arrival) order."""
        validate_id("run id", run_id)
        return list(self.inboxes.get(run_id, {}).values())

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Forget consumed events; ids not in the inbox, or malformed, are ignored."""
        validate_id("run id", run_id)
        inbox = self.inboxes.get(run_id)
        if inbox:
            for event_id in ack_ids(event_ids):
                inbox.pop(event_id, None)

    async def schedule(self, run_id: str, at: float) -> None:
        """Place the run in the sorted due list."""
        validate_id("run id", run_id)
        at = check_time(at)
        self._remove_due(run_id)
        bisect.insort(self._due, (at, run_id))
        self._due_at[run_id] = at
        if at <= time.time():
            self.waker.notify()

    async def unschedule(self, run_id: str) -> None:
        """Drop the run from the due list."""
        validate_id("run id", run_id)
        self._remove_due(run_id)

    def _remove_due(self, run_id: str) -> None:
        old = self._due_at.pop(run_id, None)
        if old is not None:
            i = bisect.bisect_left(self._due, (old, run_id))
            del self._due[i]

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Return the earliest due runs."""
        self._drop_bad_due()
        if limit <= 0:
            return []
        end = bisect.bisect_right(self._due, (now, "\U0010ffff"))
        return [(run_id, at) for at, run_id in self._due[: min(end, limit)]]

    async def next_due_at(self) -> float | None:
        """Return the earliest scheduled time."""
        self._drop_bad_due()
        return self._due[0][0] if self._due else None

    def _drop_bad_due(self) -> None:
        # Only code that bypasses schedule() can put these here; the other backends
        # meet them in stores written by others. A NaN also breaks bisect's order.
        bad = [
            (at, run_id)
            for at, run_id in self._due
            if not (_hostile.is_valid_id(run_id) and _hostile.valid_time(at))
        ]
        if not bad:
            return
        self._due = sorted(e for e in self._due if e not in bad)
        self._due_at = {run_id: at for at, run_id in self._due}
        for at, run_id in bad:
            valid = _hostile.is_valid_id(run_id)
            action = "scheduling it now" if valid else "removing it from the due index"
            _hostile.warn_once(self, "due entry", run_id, f"due at {at!r}", action)
            if valid and run_id not in self._due_at:
                now = time.time()
                bisect.insort(self._due, (now, run_id))
                self._due_at[run_id] = now

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take the lease if free, expired, ours or held by ``steal_from``."""
        validate_id("run id", run_id)
        now = time.time()
        lease = self._lease(run_id)
        holder, expires_at = (lease.owner, lease.expires_at) if lease else (None, 0.0)
        if lease_takable(holder, expires_at, owner, steal_from, now):
            self.leases[run_id] = Lease(run_id, owner, now + ttl)
            return True
        return False

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Drop our lease."""
        validate_id("run id", run_id)
        lease = self._lease(run_id)
        if lease is not None and (lease.owner == owner or _hostile.is_unreadable(lease)):
            del self.leases[run_id]

    async def get_lease(self, run_id: str) -> Lease | None:
        """Return the lease, if any; an unreadable one reads as expired, owner ``?``."""
        validate_id("run id", run_id)
        return self._lease(run_id)

    def _lease(self, run_id: str) -> Lease | None:
        lease: Any = self.leases.get(run_id)
        if lease is None:
            return None
        good = isinstance(lease, Lease) and _hostile.lease_or_none(
            run_id, lease.owner, lease.expires_at
        )
        if good:
            return lease  # type: ignore[no-any-return]
        _hostile.warn_once(self, "lease", run_id, f"{lease!r}", "reading it as expired")
        return _hostile.unreadable_lease(run_id)

    async def put_run(self, info: RunInfo) -> None:
        """Store metadata."""
        validate_id("run id", info.run_id)
        self.runs[info.run_id] = info.to_bytes()

    async def get_run(self, run_id: str) -> RunInfo | None:
        """Load metadata."""
        validate_id("run id", run_id)
        data = self.runs.get(run_id)
        return None if data is None else RunInfo.from_bytes(run_id, data)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """Return runs in id order, filtered."""

        async def fetch(cursor: str | None, n: int) -> Page:
            ids = sorted(r for r in self.runs if cursor is None or r > cursor)
            return [(r, self.runs[r]) for r in ids], False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=limit,
        )
