"""``substantial workers``: the workers that hold runs now, as their leases tell."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import click
import orjson
from rich.table import Table
from rich.text import Text

from substantial import _cli_common as common
from substantial._cli_common import plain
from substantial.backends.base import Backend, Lease, host_owner_is_dead
from substantial.timeline import format_duration

__all__ = ["WorkerView", "held_runs", "workers"]


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


@click.command("workers")
@common.backend_option
@click.option("--json", "as_json", is_flag=True, help="Print workers as JSON.")
@click.option("--show", default=5, show_default=True, help="Run ids listed per worker.")
def workers(url: str | None, as_json: bool, show: int) -> None:
    """List live workers and the runs they hold, from the runs' leases.

    A worker that holds no run leaves no trace in the store and is not listed.
    """
    now = time.time()

    async def go() -> tuple[list[WorkerView], list[Lease]]:
        backend = common.open_backend(url)
        try:
            return await held_runs(backend, now)
        finally:
            await backend.close()

    views, stale = common.run(go())
    if as_json:
        data = {
            "workers": [v.to_json() for v in views],
            "expired": [
                {"run_id": s.run_id, "owner": s.owner, "expires_at": s.expires_at} for s in stale
            ],
        }
        click.echo(orjson.dumps(data).decode())
        return
    out = common.console()
    if not views:
        out.print("no worker holds an active run")
    else:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for name in ("host", "pid", "runs", "leases end", "holding", "owner"):
            table.add_column(name, overflow="fold")
        for v in views:
            ids = ", ".join(v.runs[:show])
            if len(v.runs) > show:
                ids += f" (+{len(v.runs) - show})"
            ends = f"in {format_duration(v.first_expiry - now)}"
            if v.last_expiry - v.first_expiry > 1:
                ends += f"-{format_duration(v.last_expiry - now)}"
            host = plain(v.host, "red" if v.gone else "")
            table.add_row(host, plain(v.pid), str(len(v.runs)), ends, plain(ids), plain(v.owner))
        out.print(table)
        if any(v.gone for v in views):
            out.print(Text("red: the process is gone; its runs are taken over", style="red"))
    if stale:
        out.print(
            Text(
                f"{len(stale)} active run(s) with an expired lease, waiting for a worker: "
                + ", ".join(common.safe(s.run_id) for s in stale[:show]),
                style="yellow",
            )
        )
