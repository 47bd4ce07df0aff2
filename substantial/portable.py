"""Runs as portable data: export a run's log and metadata as one JSON line, import it elsewhere.

A line is ``{"format": "substantial.run/1", "run_id", "info", "log"}``:
``info`` is the run's metadata as stored, ``log`` its entries in order, each
the JSON array of records it holds (docs/PROTOCOL.md). An exported file
moves runs between stores (production to a laptop, SQLite to Postgres) and
is what ``substantial replay --file`` checks code against.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from substantial._runs import store_run
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo
from substantial.errors import InvalidArgument, RunConflict
from substantial.records import decode_entry, encode_entry

__all__ = [
    "FORMAT",
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
    entries = run.entries()
    info = run.info
    if not have:
        started = info.with_status("active") if info.status != "active" else info
        if not await store_run(backend, started, entries[0], time.time()):
            raise RunConflict(f"run {run.run_id!r} already exists in {backend.describe()}")
        have = 1
    for position, entry in enumerate(entries[have:], have):
        await backend.append(run.run_id, position, entry)
    await backend.put_run(info)
    if info.status in TERMINAL_STATUSES:
        await backend.unschedule(run.run_id)


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


async def migrate(
    source: Backend,
    target: Backend,
    *,
    status: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> MigrateReport:
    """Copy every run (or those with ``status``) from ``source`` to ``target``, verified.

    Resumable: a run already in the target with the same log is counted as
    present and left alone; one with a different log is reported in
    ``differ`` and left alone. Each copied log is read back and its checksum
    compared. Stop the source's workers first: a run that moves on while it
    is copied is copied as it was when read.
    """
    report = MigrateReport()
    after: str | None = None
    done = 0
    while True:
        page = await source.list_runs(status=status, limit=500, after=after)
        for info in page:
            run_id = info.run_id
            wanted = await source.read_log(run_id)
            have = await target.read_log(run_id)
            if have and checksum(have) == checksum(wanted):
                report.present += 1
            elif have and checksum(have) != checksum(wanted[: len(have)]):
                report.differ.append(run_id)  # another run under this id: leave it alone
            else:  # not there, or cut short by an interrupted migration
                exported = ExportedRun(run_id, info, [orjson.loads(e) for e in wanted])
                await _store(target, exported, len(have))
                if checksum(await target.read_log(run_id)) == checksum(wanted):
                    report.copied += 1
                else:
                    report.differ.append(run_id)
            done += 1
            if progress is not None:
                progress(done)
        if len(page) < 500:
            return report
        after = page[-1].run_id
