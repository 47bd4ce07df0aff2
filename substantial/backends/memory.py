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
    check_due,
    check_position,
    check_ttl,
    filtered_runs,
    gap_error,
    lease_takable,
)
from substantial.backends._hostile import read_listed
from substantial.backends._recent import keep_newest
from substantial.backends.base import (
    Backend,
    Capabilities,
    DueRuns,
    Event,
    Lease,
    NewEvent,
    RunInfo,
    validate_id,
)
from substantial.errors import PositionTaken

__all__ = ["MemoryBackend"]


class MemoryBackend(Backend):
    """Keep everything in dictionaries of this process."""

    name = "memory"
    capabilities = Capabilities(wake_ups=True, shared=False, delete=True, unschedule_idle=True)

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

    def _post(self, run_id: str, event: NewEvent) -> bool:
        inbox = self.inboxes.setdefault(run_id, {})
        if event.event_id in inbox:
            return False
        inbox[event.event_id] = Event(event.event_id, bytes(event.data), time.time())
        return True

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Forget the acknowledged events, then return the rest in arrival order."""
        validate_id("run id", run_id)
        inbox = self.inboxes.get(run_id)
        if not inbox:
            return []
        for event_id in ack_ids(ack):
            inbox.pop(event_id, None)
        return list(inbox.values())

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Store the event, if any, then place the run in the sorted due list (or take it out)."""
        at = check_due(run_id, at, event)
        stored = self._post(run_id, event) if event is not None else False
        self._remove_due(run_id)
        if at is not None:
            bisect.insort(self._due, (at, run_id))
            self._due_at[run_id] = at
            if at <= time.time():
                self.waker.notify()
        return stored

    async def unschedule_idle(self, run_id: str) -> bool:
        """Take the run out of the due list if its inbox is empty (one step: no await)."""
        validate_id("run id", run_id)
        if self.inboxes.get(run_id):
            return False
        self._remove_due(run_id)
        return True

    def _remove_due(self, run_id: str) -> None:
        old = self._due_at.pop(run_id, None)
        if old is not None:
            i = bisect.bisect_left(self._due, (old, run_id))
            del self._due[i]

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """Return the earliest due runs, and the time of the one after them."""
        self._drop_bad_due()
        end = bisect.bisect_right(self._due, (now, "\U0010ffff"))
        count = max(0, min(end, limit))
        following = self._due[count][0] if count < len(self._due) else None
        return DueRuns([(run_id, at) for at, run_id in self._due[:count]], following)

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

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read, or compare-and-set, the run's lease; return it as it stands after."""
        validate_id("run id", run_id)
        ttl = check_ttl(ttl)
        lease = self._lease(run_id)
        if owner is None:
            return lease
        now = time.time()
        holder, expires_at = (lease.owner, lease.expires_at) if lease else (None, 0.0)
        if not lease_takable(holder, expires_at, owner, take_from, now):
            return lease
        if ttl <= 0:
            self.leases.pop(run_id, None)
            return None
        self.leases[run_id] = Lease(run_id, owner, now + ttl)
        return self.leases[run_id]

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

    async def delete(self, run_id: str) -> bool:
        """Forget everything of the run, in one step no other task can see half of."""
        validate_id("run id", run_id)
        found = run_id in self._due_at
        self._remove_due(run_id)
        for table in (self.logs, self.inboxes, self.leases, self.runs):
            found = table.pop(run_id, None) is not None or found
        return found

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """Decode every run and keep the newest ``limit``: O(n), with no index to keep in step."""
        found = (read_listed(self, run_id, data) for run_id, data in self.runs.items())
        return keep_newest(found, status=status, workflow=workflow, limit=limit, before=before)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """Return runs in id order, filtered."""

        async def fetch(cursor: str | None, n: int) -> Page:
            found = sorted(r for r in self.runs if cursor is None or r > cursor)
            return [(r, self.runs[r]) for r in found], False

        async def fetch_ids(wanted: list[str]) -> Page:
            return [(r, self.runs.get(r)) for r in wanted], False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=limit,
            ids=ids,
            fetch_ids=fetch_ids,
        )
