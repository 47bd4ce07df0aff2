"""The policy above the Backend contract: how runs begin, and who may take a run's lease.

The Conductor starts runs, the worker starts children and successors; all go
through :func:`create_run` (:func:`store_run` for a prepared record), so
every run begins the same way. Workers take leases through
:func:`take_lease`, which also takes over from a dead process of this host.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from substantial.backends.base import (
    PROTOCOL_VERSION,
    Backend,
    Lease,
    RunInfo,
    host_owner_is_dead,
    validate_id,
)
from substantial.errors import CorruptRecord, PositionTaken, ProtocolMismatch, RunConflict
from substantial.records import Record, StartRecord, decode_entry, encode_entry

__all__ = [
    "HOLD_TTL",
    "check_protocol",
    "create_run",
    "existing_start",
    "hold",
    "same_start",
    "store_run",
    "take_lease",
]

#: How long a repair or a delete holds a run's lease: far longer than either takes.
HOLD_TTL = 60.0


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
    return await store_run(backend, info, encode_entry([dict(start)]), start["at"])


async def store_run(backend: Backend, info: RunInfo, entry: bytes, due_at: float) -> bool:
    """Write a new run's first entry, metadata and due time; False if the run existed.

    The entry at position 0 is the fence: of two starts with one run id, one
    wins. Metadata and due time follow together. A start that died half-way
    is completed by a retry with the same id: metadata missing, or an active
    run whose due entry may be missing (nothing recorded after its start).
    """
    validate_id("run id", info.run_id)
    # Where the store writes all three at once, a new run costs one round trip.
    created = await backend.start_run(info, entry, due_at)
    if created is None:
        try:
            await backend.append(info.run_id, 0, entry)
        except PositionTaken:
            created = False
        else:
            await asyncio.gather(backend.put_run(info), backend.set_due(info.run_id, due_at))
            return True
    if created:
        return True
    existing = await backend.get_run(info.run_id)
    if existing is None:
        await asyncio.gather(backend.put_run(info), backend.set_due(info.run_id, due_at))
    elif existing.status == "active" and not await backend.read_log(info.run_id, 1):
        # Nothing has run, and with no due entry nothing would: at worst a wake-up.
        await backend.set_due(info.run_id, due_at)
    return False


async def take_lease(backend: Backend, run_id: str, owner: str, ttl: float) -> Lease | None:
    """Take (or renew) the run's lease for ``owner``; return the lease as it stands after.

    A lease held by a process of this host that no longer runs is taken
    over at once instead of waiting for it to expire. The caller holds the
    run if the returned lease's owner is ``owner``.
    """
    lease = await backend.lease(run_id, owner, ttl)
    if lease is not None and lease.owner != owner and host_owner_is_dead(lease.owner):
        lease = await backend.lease(run_id, owner, ttl, take_from=lease.owner)
    return lease


async def hold(backend: Backend, run_id: str, owner: str, wait: float = 5.0) -> None:
    """Take the run's lease for a repair or a delete, waiting up to ``wait`` seconds for it.

    A worker keeps an ended run's lease a moment after recording its end; a
    run held longer is busy, and :class:`RunConflict` says so.
    """
    deadline = time.monotonic() + wait
    while True:
        lease = await take_lease(backend, run_id, owner, HOLD_TTL)
        if lease is not None and lease.owner == owner:
            return
        if time.monotonic() >= deadline:
            holder = f" by {lease.owner}" if lease is not None else ""
            raise RunConflict(
                f"run {run_id!r} is held{holder}: a worker (or a resume or delete) is at it; "
                "try again in a few seconds"
            )
        await asyncio.sleep(0.05)


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


def check_protocol(run_id: str, first: list[Record]) -> None:
    """Refuse a log begun under another storage protocol, saying what to do with it."""
    for record in first:
        start = record if record["k"] == "start" else record.get("start")
        if isinstance(start, dict) and start.get("p") != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"run {run_id!r} was started under storage protocol {start.get('p', 1)}; this "
                f"version runs protocol {PROTOCOL_VERSION} logs only: finish it with the "
                "substantial release that started it, or cancel it"
            )
