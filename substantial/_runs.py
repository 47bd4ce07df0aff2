"""Creating runs: the start entry, its metadata and its due entry, in one place.

The Conductor starts runs, the worker starts children and successors; all go
through :func:`create_run`, so every run begins the same way.
"""

from __future__ import annotations

from typing import Any

from substantial.backends.base import Backend, RunInfo
from substantial.errors import CorruptRecord, RunConflict
from substantial.records import StartRecord, decode_entry, encode_entry

__all__ = ["create_run", "existing_start"]


async def create_run(backend: Backend, start: StartRecord) -> bool:
    """Store a new run from its start record; return False if a run with that id exists."""
    info = RunInfo(
        start["run_id"],
        start["workflow"],
        "active",
        start["at"],
        start["at"],
        version=start["version"],
        parent=start.get("parent"),
        deadline=start.get("deadline"),
    )
    return await backend.create_run(info, encode_entry([dict(start)]), start["at"])


async def existing_start(backend: Backend, run_id: str) -> dict[str, Any]:
    """Return the start record of an existing run."""
    entries = await backend.read_log(run_id, 0)
    if not entries:
        raise RunConflict(f"run {run_id!r} exists but its log is empty")
    first = decode_entry(run_id, 0, entries[0])[0]
    if first["k"] != "start":
        raise CorruptRecord(run_id, 0, "the log does not begin with a start record")
    return first


def same_start(a: dict[str, Any], b: StartRecord) -> bool:
    """Tell whether an existing run was started with the same workflow and arguments."""
    return (
        a.get("workflow") == b["workflow"]
        and a.get("version") == b["version"]
        and a.get("kwargs") == b["kwargs"]
        and a.get("parent") == b.get("parent")
    )
