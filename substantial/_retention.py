"""Retention: delete ended runs, one by one or by age, from a client or in a worker.

A delete never races a live run. It takes the run's lease (a worker holding
the run keeps it), checks under the lease that the run has ended, by its
metadata and by its log, then appends a ``repair`` record with
``op: "delete"`` at the end of the log: the fence. A resume that extended
the log first wins that position and the delete is refused; one that comes
after finds the record and refuses to resume. Only then does the backend's
:meth:`~substantial.backends.base.Backend.delete` remove the run. A delete
cut short is finished by the next one (docs/retention.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from substantial._durations import seconds
from substantial._outcome import _event_id
from substantial._repair import effective, who
from substantial._runs import hold
from substantial.backends.base import (
    TERMINAL_STATUSES,
    Backend,
    RunInfo,
    make_owner,
    validate_id,
)
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    CorruptRecord,
    InvalidArgument,
    PositionTaken,
    RunConflict,
    Unsupported,
)
from substantial.records import Record, decode_entry, encode_entry, encode_value
from substantial.replay import CANCEL_EVENT, CHILD_EVENT

__all__ = ["PruneReport", "Pruned", "Pruning", "delete_run", "prune_runs", "terminal_statuses"]

#: Runs read per listing page while pruning.
PAGE = 200


@dataclass(frozen=True, slots=True)
class Pruned:
    """A run deleted (or, in a dry run, that would be), and what it held."""

    run_id: str
    workflow: str
    status: str
    updated_at: float
    #: Bytes of its log entries and metadata as stored (the store's own overhead aside).
    bytes: int


@dataclass(slots=True)
class PruneReport:
    """What a prune deleted, or with ``dry_run`` would delete, and what it left and why."""

    dry_run: bool = False
    runs: list[Pruned] = field(default_factory=list)
    #: Runs that matched but were not deleted: run id -> why (held by a worker, changed...).
    skipped: dict[str, str] = field(default_factory=dict)
    #: With ``scan``: the id to go on after next time, or None if the listing ended.
    resume_after: str | None = None

    @property
    def count(self) -> int:
        """Return how many runs were (or would be) deleted."""
        return len(self.runs)

    @property
    def bytes(self) -> int:
        """Return the bytes of log and metadata of those runs."""
        return sum(r.bytes for r in self.runs)


def terminal_statuses(status: str | Iterable[str] | None) -> frozenset[str]:
    """Check a status filter of prune: end statuses only; None means every end status."""
    if status is None:
        return TERMINAL_STATUSES
    wanted = frozenset([status] if isinstance(status, str) else status)
    wrong = sorted(s for s in wanted if s not in TERMINAL_STATUSES)
    if wrong or not wanted:
        raise InvalidArgument(
            f"prune(status=...) takes end statuses ({', '.join(sorted(TERMINAL_STATUSES))}), "
            f"got {wrong or 'none'}: a run that has not ended is never pruned; cancel it first"
        )
    return wanted


def _capable(backend: Backend) -> None:
    if not backend.capabilities.delete:
        raise Unsupported(
            f"{backend.describe()} cannot delete runs (its backend does not declare "
            "capabilities.delete): use a backend that does, or keep the runs"
        )


def _is_tombstone(record: Record) -> bool:
    return record["k"] == "repair" and record.get("op") == "delete"


def _check_ended(run_id: str, info: RunInfo | None, entries: list[bytes]) -> None:
    """Raise unless the run has ended, by its metadata and by its log."""
    cancel = (
        f"cancel it first (await conductor.get({run_id!r}).cancel(), or substantial runs "
        f"cancel {run_id}) and delete it once it has ended"
    )
    if info is not None and info.status not in TERMINAL_STATUSES:
        raise InvalidArgument(
            f"run {run_id!r} is {info.status}: only ended runs are deleted; {cancel}"
        )
    if not entries:
        if info is None or info.status not in TERMINAL_STATUSES:
            raise InvalidArgument(f"run {run_id!r} has no log yet: {cancel}")
        return  # a delete cut short after the log went: finish it
    records = [(p, r) for p, data in enumerate(entries) for r in decode_entry(run_id, p, data)]
    if _is_tombstone(records[-1][1]):
        return  # a delete began and was cut short: finish it
    replayed = effective(records)[0]
    if not replayed or replayed[-1][1]["k"] != "end":
        what = "was resumed: its log goes on after its end" if info is not None else "is running"
        raise InvalidArgument(f"run {run_id!r} {what}; {cancel}")


async def _going(backend: Backend, run_id: str) -> bool:
    with contextlib.suppress(CorruptRecord):
        info = await backend.get_run(run_id)
        return info is not None and info.status not in TERMINAL_STATUSES
    return False


async def _tell_others(backend: Backend, run_id: str, entries: list[bytes]) -> None:
    """Repeat what the ended run told its parent and children, to those still going.

    Its worker may have died between recording the end and posting the
    child's end to the parent (or the cancel to the children); a worker
    repeats that when it finds the run again, which it no longer will once
    the run is gone. Each event has a fixed id, so one already delivered is
    not delivered twice; a run that has ended or gone is told nothing.
    """
    records = effective(
        [(p, r) for p, data in enumerate(entries) for r in decode_entry(run_id, p, data)]
    )[0]
    first, end = records[0][1], records[-1][1]
    start = first.get("start") if first["k"] == "snapshot" else first
    if not isinstance(start, dict) or end["k"] != "end":
        return
    status = end["status"]
    parent = start.get("parent")
    if isinstance(parent, str) and status != "continued" and await _going(backend, parent):
        reported: dict[str, Any] = {"run_id": start.get("reports_as", run_id), "status": status}
        if status == "completed":
            reported["value"] = end.get("value")
        elif "error" in end:
            reported["error"] = end["error"]
        body = encode_value({"name": CHILD_EVENT, "value": reported})
        await backend.send_event(parent, _event_id("child-ended", run_id), body)
    for child in end.get("cancel_children", ()):
        if await _going(backend, child):
            body = encode_value({"name": CANCEL_EVENT, "value": None})
            await backend.send_event(child, _event_id("parent-ended", run_id), body)


async def _look(backend: Backend, run_id: str) -> tuple[RunInfo | None, list[bytes]]:
    try:
        info = await backend.get_run(run_id)
    except CorruptRecord:
        info = None  # its log tells whether it ended
    return info, await backend.read_log(run_id)


def _pruned(run_id: str, info: RunInfo | None, entries: list[bytes]) -> Pruned:
    size = sum(len(e) for e in entries) + (len(info.to_bytes()) if info is not None else 0)
    if info is None:
        return Pruned(run_id, "?", "ended", 0.0, size)
    return Pruned(run_id, info.workflow, info.status, info.updated_at, size)


async def delete_run(
    backend: Backend,
    run_id: str,
    *,
    owner: str | None = None,
    dry_run: bool = False,
    wait: float = 5.0,
    listed: RunInfo | None = None,
) -> Pruned | None:
    """Delete an ended run; return what it held, or None if there was no such run.

    Raises :class:`InvalidArgument` if the run has not ended, and
    :class:`RunConflict` if it is held longer than ``wait`` seconds (a
    worker, a resume) or it changed meanwhile. ``listed``: the run's
    metadata as a listing just gave it, which says it ended; the log is
    then read once, under the lease, instead of before it too.
    """
    validate_id("run id", run_id)
    _capable(backend)
    if listed is None or dry_run:
        # Checked before taking the lease: taking a live run's lease, even for a moment,
        # would keep a worker from it.
        info, entries = await _look(backend, run_id)
        if info is None and not entries:
            if not dry_run:
                # No run, but maybe what late senders left: an event, a due entry, a lease.
                await backend.delete(run_id)
            return None
        _check_ended(run_id, info, entries)
        if dry_run:
            return _pruned(run_id, info, entries)
    elif listed.status not in TERMINAL_STATUSES:
        raise InvalidArgument(f"run {run_id!r} is {listed.status}: only ended runs are deleted")
    owner = owner or make_owner("delete-")
    await hold(backend, run_id, owner, wait)
    try:
        info, entries = await _look(backend, run_id)  # again, now that no one else holds it
        if info is None and not entries:
            await backend.delete(run_id)  # another delete finished first: drop our lease
            return None
        _check_ended(run_id, info, entries)
        last = decode_entry(run_id, len(entries) - 1, entries[-1]) if entries else []
        if last and not _is_tombstone(last[-1]):
            await _tell_others(backend, run_id, entries)
            tombstone: Record = {"k": "repair", "op": "delete", "by": who(), "at": time.time()}
            try:
                await backend.append(run_id, len(entries), encode_entry([tombstone]))
            except PositionTaken as exc:
                raise RunConflict(
                    f"run {run_id!r} changed while being deleted (resumed, or a worker wrote "
                    "to it): look at its status, then delete it again"
                ) from exc
        await backend.delete(run_id)  # the lease goes with it
    except BaseException:
        with contextlib.suppress(BackendError):
            await backend.release_lease(run_id, owner)
        raise
    return _pruned(run_id, info, entries)


async def prune_runs(
    backend: Backend,
    *,
    older_than: timedelta | float,
    status: str | Iterable[str] | None = None,
    workflow: str | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    pause: float = 0.0,
    owner: str | None = None,
    progress: Callable[[int], None] | None = None,
    after: str | None = None,
    scan: int | None = None,
    jobs: int = 1,
) -> PruneReport:
    """Delete the ended runs last updated more than ``older_than`` ago; return a report.

    ``status`` (one end status or several) and ``workflow`` narrow the
    choice; ``limit`` bounds how many are deleted; ``pause`` seconds pass
    between two deletes. A run that cannot be deleted (held by a worker,
    changed, unreadable) is skipped with the reason, never stopping the rest.
    ``after`` starts the listing after that run id and ``scan`` bounds the
    runs read; ``report.resume_after`` says where to go on (one status).
    ``jobs`` runs are deleted at once (each delete is several round trips).
    """
    age = seconds(older_than, "prune(older_than=...)")
    statuses = terminal_statuses(status)
    if workflow is not None and not isinstance(workflow, str):
        raise InvalidArgument(f"prune(workflow=...) takes a workflow name, got {workflow!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise InvalidArgument(f"prune(limit=...) takes a whole number >= 0, got {limit!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise InvalidArgument(f"prune(jobs=...) takes a whole number >= 1, got {jobs!r}")
    _capable(backend)
    cutoff = time.time() - age
    owner = owner or make_owner("prune-")
    report = PruneReport(dry_run=dry_run)
    # One listing per end status: backends index runs by status, so the runs still
    # going (most of a busy store) are never read.
    read = 0
    gate = asyncio.Semaphore(jobs)

    async def one(info: RunInfo) -> None:
        async with gate:
            try:
                done = await delete_run(
                    backend, info.run_id, owner=owner, dry_run=dry_run, wait=0.0, listed=info
                )
            except BackendUnavailable:
                raise  # the store is down: every other run would fail alike
            except (BackendError, InvalidArgument, RunConflict) as exc:
                report.skipped[info.run_id] = str(exc)
                return
            except Exception as exc:  # a record no check foresaw: skip it, go on
                report.skipped[info.run_id] = f"{type(exc).__name__}: {exc}"
                return
            if done is not None:
                report.runs.append(done)
                if progress is not None:
                    progress(report.count)
                if pause > 0 and not dry_run:
                    await asyncio.sleep(pause)

    for listed in sorted(statuses):
        cursor = after
        while True:
            # Every run listed is a metadata read (a GET on S3): list no more than scanned.
            size = PAGE if scan is None else max(1, min(PAGE, scan - read))
            page = await backend.list_runs(
                status=listed, workflow=workflow, limit=size, after=cursor
            )
            batch: list[RunInfo] = []
            stop = False
            for info in page:
                full = limit is not None and report.count + len(batch) >= limit
                if full or (scan is not None and read >= scan):
                    stop = True
                    break
                read += 1
                cursor = info.run_id
                if info.status in statuses and info.updated_at <= cutoff:
                    batch.append(info)
            failed = await asyncio.gather(*(one(i) for i in batch), return_exceptions=True)
            for outcome in failed:
                if isinstance(outcome, BaseException):
                    raise outcome  # the store went down: the others have finished meanwhile
            if stop:
                report.resume_after = cursor
                return report
            if len(page) < size:
                break
    return report


class Pruning:
    """Delete and prune, as the Conductor offers them."""

    backend: Backend

    async def delete(self, run_id: str) -> bool:
        """Delete an ended run: its log, inbox, metadata, due entry and lease.

        Returns False if there was no such run. A run that has not ended
        raises :class:`InvalidArgument` (cancel it first); one a worker still
        holds, or that changed meanwhile (a resume), :class:`RunConflict`;
        a store that cannot delete, :class:`Unsupported`.
        """
        return await delete_run(self.backend, run_id) is not None

    async def prune(
        self,
        *,
        older_than: timedelta | float,
        status: str | Iterable[str] | None = None,
        workflow: str | None = None,
        dry_run: bool = False,
        limit: int | None = None,
        jobs: int = 8,
    ) -> PruneReport:
        """Delete the ended runs last updated more than ``older_than`` ago.

        ``status`` keeps one end status (or several: ``completed``,
        ``failed``, ``cancelled``, ``timed_out``, ``reverted``,
        ``continued``), ``workflow`` one workflow; ``dry_run`` deletes
        nothing and reports what would go; ``jobs`` runs are deleted at
        once. The report lists the runs, their count and bytes (log and
        metadata), and the runs skipped and why.
        """
        return await prune_runs(
            self.backend,
            older_than=older_than,
            status=status,
            workflow=workflow,
            dry_run=dry_run,
            limit=limit,
            jobs=jobs,
        )
