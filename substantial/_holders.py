"""Who holds which runs now, as the runs' leases tell: what ``substantial workers`` and the UI show.

A worker leaves a trace in the store only through the leases of the active
runs it holds, so these are read, never a registry of workers: a worker
that holds nothing is not seen. Leases are read through the Backend
contract (``list_runs`` of active runs, ``get_lease`` of each), 64 at a time.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from substantial.backends.base import Backend, Lease, host_owner_is_dead

__all__ = ["WorkerView", "held_runs", "holders_json"]


@dataclass
class WorkerView:
    """One lease owner (one worker process) and the active runs it holds."""

    owner: str
    runs: list[str] = field(default_factory=list)
    #: The soonest and latest expiry of its leases (epoch seconds).
    first_expiry: float = float("inf")
    last_expiry: float = 0.0
    #: On this host, its process is gone: other workers take its runs over at once.
    gone: bool = False

    @property
    def host(self) -> str:
        """Return the host part of the owner id."""
        return self.owner.split("/")[0]

    @property
    def pid(self) -> str:
        """Return the process id part of the owner id."""
        parts = self.owner.split("/")
        return parts[1] if len(parts) > 1 else "?"

    def to_json(self) -> dict[str, Any]:
        """Return the worker as JSON-compatible data."""
        return {
            "owner": self.owner,
            "host": self.host,
            "pid": self.pid,
            "runs": self.runs,
            "first_expiry": self.first_expiry,
            "last_expiry": self.last_expiry,
            "gone": self.gone,
        }


async def held_runs(
    backend: Backend, now: float, limit: int = 100_000
) -> tuple[list[WorkerView], list[Lease]]:
    """Return live workers (by their unexpired leases on active runs) and expired leases."""
    run_ids: list[str] = []
    after: str | None = None
    while len(run_ids) < limit:
        page = await backend.list_runs(status="active", limit=500, after=after)
        run_ids.extend(info.run_id for info in page)
        if len(page) < 500:
            break
        after = page[-1].run_id
    leases: list[Lease | None] = []
    for i in range(0, len(run_ids), 64):
        chunk = run_ids[i : i + 64]
        leases.extend(await asyncio.gather(*(backend.get_lease(r) for r in chunk)))
    views: dict[str, WorkerView] = {}
    stale: list[Lease] = []
    for lease in leases:
        if lease is None:
            continue
        if lease.expires_at <= now:
            stale.append(lease)
            continue
        view = views.get(lease.owner)
        if view is None:
            gone = host_owner_is_dead(lease.owner)
            view = views[lease.owner] = WorkerView(lease.owner, gone=gone)
        view.runs.append(lease.run_id)
        view.first_expiry = min(view.first_expiry, lease.expires_at)
        view.last_expiry = max(view.last_expiry, lease.expires_at)
    return sorted(views.values(), key=lambda v: v.owner), stale


def holders_json(views: list[WorkerView], stale: list[Lease]) -> dict[str, Any]:
    """Return live workers and expired leases as the JSON ``workers --json`` and the UI give."""
    return {
        "workers": [v.to_json() for v in views],
        "expired": [
            {"run_id": s.run_id, "owner": s.owner, "expires_at": s.expires_at} for s in stale
        ],
    }
