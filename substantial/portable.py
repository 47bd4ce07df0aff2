"""Runs as portable data: export a run's log and metadata as one JSON line, import it elsewhere.

A line is ``{"format": "substantial.run/1", "run_id", "info", "log"}``:
``info`` is the run's metadata as stored, ``log`` its entries in order, each
the JSON array of records it holds (docs/PROTOCOL.md). An exported file
moves runs between stores (production to a laptop, SQLite to Postgres) and
is what ``substantial replay --file`` checks code against.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from substantial._runs import store_run
from substantial.backends._paging import iter_runs
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo
from substantial.errors import InvalidArgument, PositionTaken, RunConflict
from substantial.records import decode_entry, encode_entry

__all__ = [
    "FORMAT",
    "JOBS",
    "ExportedRun",
    "MigrateReport",
    "checksum",
    "export_runs",
    "import_runs",
    "migrate",
    "read_exported",
]

FORMAT = "substantial.run/1"


@dataclass(frozen=True, slots=True)
class ExportedRun:
    """One run read from an export: its id, metadata and decoded log entries."""

    run_id: str
    info: RunInfo
    log: list[list[dict[str, Any]]]

    def entries(self) -> list[bytes]:
        """Return the log as stored entries."""
        return [encode_entry(records) for records in self.log]


async def export_runs(backend: Backend, run_ids: Iterable[str]) -> AsyncIterator[bytes]:
    """Yield one JSON line (with its newline) per run, in the order given."""
    for run_id in run_ids:
        info = await backend.get_run(run_id)
        if info is None:
            raise InvalidArgument(f"no run with id {run_id!r} to export")
        log = [
            decode_entry(run_id, position, data)
            for position, data in enumerate(await backend.read_log(run_id))
        ]
        line = {
            "format": FORMAT,
            "run_id": run_id,
            "info": orjson.loads(info.to_bytes()),
            "log": log,
        }
        yield orjson.dumps(line) + b"\n"


def read_exported(lines: Iterable[bytes | str]) -> Iterable[ExportedRun]:
    """Parse an export's lines, checking each log; blank lines are skipped."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            body = orjson.loads(line)
            if body.get("format") != FORMAT:
                raise ValueError(f"format is {body.get('format')!r}, not {FORMAT!r}")
            run_id = body["run_id"]
            info = RunInfo.from_bytes(run_id, orjson.dumps(body["info"]))
            log = body["log"]
            if not isinstance(log, list) or not log:
                raise ValueError("'log' must be a non-empty list of entries")
            for position, records in enumerate(log):
                decode_entry(run_id, position, orjson.dumps(records))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise InvalidArgument(
                f"line {number} of the export is not a run exported by Substantial: {exc}"
            ) from exc
        yield ExportedRun(run_id, info, log)


async def import_runs(backend: Backend, runs: Iterable[ExportedRun]) -> list[str]:
    """Store exported runs in ``backend``; active ones become due, so a worker resumes them.

    A run id that already exists raises :class:`RunConflict` (nothing of
    that run is written); the runs before it are imported.
    """
    done: list[str] = []
    for run in runs:
        await _store(backend, run)
        done.append(run.run_id)
    return done


async def _store(backend: Backend, run: ExportedRun, have: int = 0) -> None:
    """Write ``run`` into ``backend``, whose copy already holds its first ``have`` entries."""
    await _store_entries(backend, run.info, run.entries(), have)


async def _store_entries(backend: Backend, info: RunInfo, entries: list[bytes], have: int) -> None:
    ended = info.status in TERMINAL_STATUSES
    if not have and not ended:
        if not await store_run(backend, info, entries[0], time.time()):
            raise RunConflict(f"run {info.run_id!r} already exists in {backend.describe()}")
        have = 1
    # An ended run is never due: its log, then its metadata, and no due entry to write
    # and take back. Cut short, it has no metadata yet, so it does not list as a run.
    for position, entry in enumerate(entries[have:], have):
        try:
            await backend.append(info.run_id, position, entry)
        except PositionTaken:
            if position:
                raise
            raise RunConflict(
                f"run {info.run_id!r} already exists in {backend.describe()}"
            ) from None
    await backend.put_run(info)
    if ended and have:
        await backend.unschedule(info.run_id)  # it was stored active by an earlier import


@dataclass
class MigrateReport:
    """What a migration did: runs copied, runs already there, and runs that differ."""

    copied: int = 0
    present: int = 0
    differ: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Tell whether every run is now in the target, identical to the source."""
        return not self.differ


def checksum(entries: Iterable[bytes]) -> str:
    """Return the SHA-256 of a log's records (entry by entry, as decoded JSON)."""
    digest = hashlib.sha256()
    for entry in entries:
        digest.update(orjson.dumps(orjson.loads(entry), option=orjson.OPT_SORT_KEYS))
        digest.update(b"\n")
    return digest.hexdigest()


#: Runs ``migrate`` copies at once by default: enough to overlap the round trips of both
#: stores (measured in docs/BENCHMARKS.md, workload MG), few enough for a small server.
JOBS = 16


async def migrate(
    source: Backend,
    target: Backend,
    *,
    status: str | None = None,
    jobs: int = JOBS,
    progress: Callable[[int], None] | None = None,
) -> MigrateReport:
    """Copy every run (or those with ``status``) from ``source`` to ``target``, verified.

    Runs are copied ``jobs`` at a time. Resumable: a run already in the
    target with the same log is counted as present and left alone; one with
    a different log is reported in ``differ`` and left alone; one cut short
    by an interrupted migration is completed. Each copied log is read back
    and its SHA-256 compared with the source's. Stop the source's workers
    first: a run that moves on while it is copied is copied as it was when
    read. ``progress`` is called with the number of runs done after each one.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise InvalidArgument(f"migrate(jobs={jobs!r}): pass a whole number of runs >= 1")
    report = MigrateReport()
    done = 0

    async def one(info: RunInfo) -> None:
        nonlocal done
        await _copy(source, target, info, report)
        done += 1
        if progress is not None:
            progress(done)

    running: set[asyncio.Task[None]] = set()

    async def drain(below: int) -> None:
        nonlocal running
        while len(running) > below:
            finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in finished:
                task.result()  # the first failure (an outage, a bad record) stops the migration

    try:
        async for info in iter_runs(source, status=status):
            await drain(jobs - 1)
            running.add(asyncio.create_task(one(info)))
        await drain(0)
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
    report.differ.sort()
    return report


async def _copy(source: Backend, target: Backend, info: RunInfo, report: MigrateReport) -> None:
    """Copy one run unless the target has it; count what happened in ``report``."""
    run_id = info.run_id
    wanted, have = await asyncio.gather(source.read_log(run_id), target.read_log(run_id))
    want = checksum(wanted)
    if have and (have == wanted or checksum(have) == want):
        if await target.get_run(run_id) == info:
            report.present += 1
            return
        # Cut short after its last entry: the run's final metadata is still to be written.
        await _store_entries(target, info, wanted, len(wanted))
        report.copied += 1
    elif have and checksum(have) != checksum(wanted[: len(have)]):
        report.differ.append(run_id)  # another run under this id: leave it alone
    else:  # not there, or cut short by an interrupted migration
        await _store_entries(target, info, wanted, len(have))
        if checksum(await target.read_log(run_id)) == want:
            report.copied += 1
        else:
            report.differ.append(run_id)
