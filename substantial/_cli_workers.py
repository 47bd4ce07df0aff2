"""``substantial workers``: the workers that hold runs now, as their leases tell."""

from __future__ import annotations

import time

import click
import orjson
from rich.table import Table
from rich.text import Text

from substantial import _cli_common as common
from substantial._cli_common import plain
from substantial._holders import WorkerView, held_runs, holders_json
from substantial.backends.base import Lease
from substantial.timeline import format_duration

__all__ = ["workers"]


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
        click.echo(orjson.dumps(holders_json(views, stale)).decode())
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
