"""Runs as portable data: export a run's log and metadata as one JSON line, import it elsewhere.

A line is ``{"format": "substantial.run/1", "run_id", "info", "log"}``:
``info`` is the run's metadata as stored, ``log`` its entries in order, each
the JSON array of records it holds (docs/PROTOCOL.md). An exported file
moves runs between stores (production to a laptop, SQLite to Postgres) and
is what ``substantial replay --file`` checks code against.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo
from substantial.errors import InvalidArgument, RunConflict
from substantial.records import decode_entry, encode_entry

__all__ = ["FORMAT", "ExportedRun", "export_runs", "import_runs", "read_exported"]

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
        entries = run.entries()
        info = run.info
        now = time.time()
        started = info.with_status("active") if info.status != "active" else info
        if not await backend.create_run(started, entries[0], now):
            raise RunConflict(f"run {run.run_id!r} already exists in {backend.describe()}")
        for position, entry in enumerate(entries[1:], 1):
            await backend.append(run.run_id, position, entry)
        await backend.put_run(info)
        if info.status in TERMINAL_STATUSES:
            await backend.unschedule(run.run_id)
        done.append(run.run_id)
    return done
