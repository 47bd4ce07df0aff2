"""The Backend contract: the eight methods a store writes, and nothing else.

A backend stores opaque bytes and knows nothing about workflows. Replay,
run creation, lease renewal and owner liveness, the due-index policy and
compaction are written once above it (``substantial/_runs.py``, the worker).
Every backend passes the conformance suite shipped in
:mod:`substantial.testing.contract`; docs/PROTOCOL.md gives each one's layout.

============  ===============================================================
Method        Guarantee
============  ===============================================================
append        create-if-absent at one position: the fence
read_log      entries from a position to the first free one
read_inbox    acknowledge recorded events, return the rest in arrival order
set_due       (store an event, and) set or clear the run's due time
due           runs due by now, earliest first, and when the next one is
lease         read, or compare-and-set, the run's lease
put_run       replace the run's metadata atomically
list_runs     metadata by id order, filtered, paged, or by ids
============  ===============================================================

One optional method, :meth:`Backend.delete` (retention), is offered where
``capabilities.delete`` says so; a backend without it still runs workflows.
:meth:`Backend.list_recent` (newest first) works on every backend; one that
keeps an index in creation order overrides it and declares
``capabilities.list_recent``.

Every method may raise :class:`BackendUnavailable` when the store cannot
be reached; a write that raises it either did not happen or can be retried
as it is. Bad input raises :class:`InvalidArgument` alike on every backend
(``backends/_common.py`` holds the checks). Optional capabilities are
declared in :attr:`Backend.capabilities`, never guessed.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Sequence
from typing import final

from substantial.backends._owner import host_owner_is_dead, make_owner
from substantial.backends._recent import Cursor, check_before, scan_recent
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
from substantial.errors import CorruptRecord, InvalidArgument, ProtocolMismatch, Unsupported

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
    """Storage for run logs, inboxes, the due index, leases and run metadata."""

    #: Short name used in URLs, logs and benchmarks.
    name: str = "abstract"
    #: What this backend offers beyond the contract (see :class:`Capabilities`).
    capabilities: Capabilities = Capabilities()

    def __init__(self) -> None:
        #: In-process wake-up signal; backends with cross-process ones feed it too.
        self.waker = Waker()

    # -- the contract -------------------------------------------------------

    @abc.abstractmethod
    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store ``entry`` at ``position`` of the run's log if that position is free.

        Atomic create-if-absent: of concurrent appends at one position exactly
        one succeeds, the others raise :class:`PositionTaken` and the stored
        entry stays as it is. A reader never sees part of an entry, even after
        a crash mid-write. A position past the first free one raises
        :class:`InvalidArgument` (a gap); entries are never removed.
        """

    @abc.abstractmethod
    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Return the entries at ``start``, ``start + 1``, ... up to the first free position.

        An unknown run has an empty log.
        """

    @abc.abstractmethod
    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Remove the events named in ``ack``, then return the pending ones in arrival order.

        Arrival order keeps each sender's order. Acknowledging is cleanup:
        ids not in the inbox, and malformed ones, are ignored. An id once
        removed may be posted again (the log's record of it deduplicates).
        """

    @abc.abstractmethod
    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Make the run due at ``at`` (epoch seconds), replacing its due time; None: not due.

        With ``event``, first store it in the run's inbox unless an event
        with its id is pending (the stored one is kept); then set the time,
        which an event requires. Return whether the event was stored now.
        Backends with transactions do both in one; others store the event
        first, so a crash in between leaves an event a later wake-up finds.
        """

    @abc.abstractmethod
    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """Return up to ``limit`` runs due by ``now``, earliest first, and ``next_at``.

        Answered from a time-ordered index, never by scanning every run;
        ``next_at`` is the due time of the first run not returned.
        """

    @abc.abstractmethod
    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read the run's lease, or compare-and-set it; return the lease as it stands after.

        ``owner`` None only reads. Otherwise, atomically: if the lease is free,
        expired, held by ``owner`` or by ``take_from``, it becomes ``owner``'s
        until ``ttl`` seconds from now (removed when ``ttl`` is 0); if not, it
        is left as it is and returned. An unreadable lease reads as expired
        (owner ``?``). Leases only save work: fencing is ``append``'s.
        """

    @abc.abstractmethod
    async def put_run(self, info: RunInfo) -> None:
        """Create or replace the run's metadata; readers see the old record or the new one."""

    @abc.abstractmethod
    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """Return up to ``limit`` runs with ids above ``after``, in id order, filtered.

        With ``ids``, only those runs (unknown ones are left out). Metadata
        that cannot be read lists with status ``corrupt`` instead of failing
        the listing.
        """

    # -- optional: declared in ``capabilities`` --------------------------------

    async def delete(self, run_id: str) -> bool:
        """Remove the run: its log, inbox, due entry, lease and metadata; return if any was there.

        Idempotent: deleting an unknown or deleted run returns False. A delete
        checks nothing: whether the run has ended and who holds it is the
        caller's policy (``Conductor.delete`` takes the lease, checks the run
        ended and fences its log first). Crash-safe: a delete cut short
        leaves the run as it was, or gone, or (on stores without
        transactions) its metadata alone with an empty log and no due entry,
        never a log prefix a reader could take for a live run; metadata goes
        last, so such a run still lists and deleting it again finishes it.
        The run id may be used again afterwards. Declared by
        ``capabilities.delete``; this default raises :class:`Unsupported`.
        """
        raise Unsupported(
            f"the {self.name!r} backend ({type(self).__name__}) cannot delete runs: implement "
            "Backend.delete(run_id) and declare Capabilities(delete=True), or keep the runs"
        )

    async def unschedule_idle(self, run_id: str) -> bool:
        """Take the run out of the due index unless an event waits in its inbox, atomically.

        Return True if the run is not due now (taken out, or not in the
        index), False if an event waits: then nothing was changed. An event
        posted concurrently either is seen (False) or comes after, and its
        ``set_due`` makes the run due again: none is left in the inbox of a
        run out of the index. Declared by ``capabilities.unschedule_idle``;
        this default raises :class:`Unsupported`.
        """
        raise Unsupported(
            f"the {self.name!r} backend ({type(self).__name__}) cannot unschedule a run only "
            "if its inbox is empty in one step: implement Backend.unschedule_idle(run_id) and "
            "declare Capabilities(unschedule_idle=True), or read the inbox after unscheduling"
        )

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: Cursor | None = None,
    ) -> list[RunInfo]:
        """Return up to ``limit`` runs newest first: by ``created_at``, then run id, descending.

        ``before`` is the cursor of the previous page, ``(created_at,
        run_id)`` of its last run: only runs after it in this order are
        returned, so paging neither repeats nor skips a run, even while runs
        are created. Filtered as :meth:`list_runs`; metadata that cannot be
        read lists with status ``corrupt`` and the creation time the store's
        index holds for it (0.0 where it has none: it lists last).
        A backend that declares ``capabilities.list_recent`` answers a page
        from an index at a cost that does not grow with the store; this
        default is correct with the contract alone but pages through
        :meth:`list_runs` over every run (O(n) per page).
        """
        return await scan_recent(
            self.list_runs,
            status=status,
            workflow=workflow,
            limit=limit,
            before=check_before(before),
        )

    # -- lifecycle: override what the store has -------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until something may have become due, or ``timeout`` seconds pass.

        Backends with a cross-process signal feed it into ``self.waker`` and
        declare ``capabilities.wake_ups``; the fallback is polling.
        """
        return await self.waker.wait(timeout)

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and files; closing again does nothing."""

    def describe(self) -> str:
        """Return a short human-readable description, e.g. for the CLI."""
        return self.name

    async def start_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool | None:
        """Write a new run's entry at position 0, metadata and due time as one write, if free.

        A shortcut a store with transactions may offer (one round trip where
        the contract's methods take two): return True if the run was
        created, all three written at once; False if position 0 was taken
        (nothing written). This default returns None: the caller writes the
        three through the contract (``_runs.store_run``).
        """
        return None

    # -- built on the contract: a backend never writes these ------------------

    @final
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

    @final
    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Store an event in the run's inbox and make the run due now."""
        return await self.set_due(run_id, time.time(), event=NewEvent(event_id, data))

    @final
    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Store an event in the run's inbox (an event makes its run due: as send_event)."""
        return await self.send_event(run_id, event_id, data)

    @final
    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Remove recorded events from the inbox; unknown and malformed ids are ignored."""
        await self.read_inbox(run_id, ack=event_ids)

    @final
    async def schedule(self, run_id: str, at: float) -> None:
        """Make the run due at ``at`` (unschedule() takes it out of the index)."""
        if at is None:
            raise InvalidArgument("time None is not a finite number of seconds since the epoch")
        await self.set_due(run_id, at)

    @final
    async def unschedule(self, run_id: str) -> None:
        """Take the run out of the due index."""
        await self.set_due(run_id, None)

    @final
    async def next_due_at(self) -> float | None:
        """Return the earliest due time in the index, or None."""
        return (await self.due(time.time(), 0)).next_at

    @final
    async def get_lease(self, run_id: str) -> Lease | None:
        """Return the run's lease, expired or not, or None."""
        return await self.lease(run_id)

    @final
    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take or renew the lease; return whether ``owner`` holds it now."""
        lease = await self.lease(run_id, owner, ttl, take_from=steal_from)
        return lease is not None and lease.owner == owner

    @final
    async def release_lease(self, run_id: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (an expired or unreadable one goes too)."""
        await self.lease(run_id, owner, 0)
