"""``substantial runs show`` and ``runs watch``: a run's timeline, drawn for a terminal."""

from __future__ import annotations

import asyncio
import time

import click
import orjson
from rich.console import Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from substantial import _cli_common as common
from substantial._cli_common import plain, relative, safe, short_json, status_text
from substantial.backends.base import TERMINAL_STATUSES
from substantial.timeline import Row, Timeline, format_duration, load

__all__ = ["render", "show_command", "watch_command"]


def _header(tl: Timeline) -> Text:
    out = Text()
    out.append("run ", style="bold")
    out.append(safe(tl.run_id), style="bold")
    out.append("  workflow ")
    out.append(safe(tl.workflow), style="bold")
    if tl.version is not None:
        out.append(f" (version {safe(tl.version)})")
    out.append("  ")
    out.append_text(status_text(tl.status))
    took = format_duration(tl.duration)
    out.append(f" after {took}" if tl.ended_at is not None else f" for {took}")
    out.append(f"\nstarted {common.clock(tl.started_at, date=True)}")
    if tl.ended_at is not None:
        out.append(f"   ended {common.clock(tl.ended_at, date=True)}")
    if tl.deadline is not None:
        out.append(f"   deadline {common.clock(tl.deadline, date=True)}")
    if tl.parent:
        out.append(f"\nparent {safe(tl.parent)}")
    if tl.next_run:
        out.append(f"\ncontinued as {safe(tl.next_run)}")
    if tl.status == "completed":
        out.append("\nresult ")
        out.append(short_json(tl.value, 200), style="green")
    if tl.error is not None:
        out.append("\nerror ")
        out.append(common.error_text(tl.error), style="red")
        for line in tl.error.get("traceback", [])[-3:]:
            out.append(f"\n  at {safe(line)}", style="dim")
    if tl.status not in TERMINAL_STATUSES:
        if tl.lease is not None and tl.lease.expires_at > tl.now:
            left = format_duration(tl.lease.expires_at - tl.now)
            out.append(f"\nheld by {safe(tl.lease.owner)} (lease for {left} more)")
        else:
            out.append("\nheld by no worker")
        out.append("\nwaiting for ")
        out.append(safe(tl.waiting_for() or ""), style="yellow")
    return out


def _detail(row: Row) -> Text:
    if row.error is not None:
        return plain(common.error_text(row.error), "red")
    if row.kind == "child":
        return plain(short_json(row.value) if row.value is not None else "")
    if row.kind in ("sleep", "wait") and row.until is not None:
        return plain(f"until {common.clock(row.until)}")
    if row.value is not None:
        return plain(short_json(row.value))
    return Text()


def _rows_table(tl: Timeline) -> Table:
    table = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for name, justify in (("at", "right"), ("clock", "left"), ("took", "right")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("what", overflow="fold")
    table.add_column("state", no_wrap=True)
    table.add_column("detail", overflow="fold")
    for row in tl.rows:
        took = ""
        if row.is_bar:
            end = row.end if row.end is not None else tl.now
            took = format_duration(end - row.start) + ("" if row.end is not None else "…")
        state = status_text(row.state) if row.state != "info" else Text()
        table.add_row(
            relative(row.start, tl.started_at),
            common.clock(row.start),
            took,
            plain(row.label, "bold" if row.kind in ("step", "child") else ""),
            state,
            _detail(row),
        )
        for attempt in row.attempts:
            table.add_row(
                "",
                "",
                "",
                plain(f"  attempt {attempt.n} failed", "yellow"),
                Text(f"retry {relative(attempt.retry_at, tl.started_at)}", style="dim"),
                plain(common.error_text(attempt.error), "red"),
            )
    return table


def _extras(tl: Timeline) -> list[RenderableType]:
    parts: list[RenderableType] = []
    if tl.published:
        text = Text("published", style="bold")
        for key, value in tl.published.items():
            text.append(f"\n  {safe(key)} = ")
            text.append(short_json(value, 120))
        parts.append(text)
    if tl.streams:
        text = Text("streams", style="bold")
        for name, values in tl.streams.items():
            text.append(f"\n  {safe(name)}: {len(values)} value(s), last ")
            text.append(short_json(values[-1], 100))
        parts.append(text)
    if tl.children:
        table = Table("child", "workflow", "status", "error", box=None, header_style="bold")
        for child in tl.children:
            table.add_row(
                plain(child.run_id),
                plain(child.workflow),
                status_text(child.status),
                plain(common.error_text(child.error), "red"),
            )
        parts.append(table)
    if tl.pending_events:
        parts.append(Text(f"{tl.pending_events} event(s) waiting in the inbox", style="yellow"))
    for position, message in tl.corrupt:
        parts.append(plain(f"position {position} cannot be read: {message}", "bold red"))
    return parts


def render(tl: Timeline) -> RenderableType:
    """Draw a timeline: header, one line per row (attempts beneath their step), then extras."""
    return Group(_header(tl), Text(), _rows_table(tl), *_extras(tl))


def _raw(tl: Timeline) -> None:
    for position, record in tl.records:
        body = {k: v for k, v in record.items() if k != "k"}
        line = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS).decode()
        click.echo(f"{position:>6}  {safe(record['k']):<11} {safe(line)}")
    for position, message in tl.corrupt:
        click.echo(f"{position:>6}  !! {safe(message)}")


@click.command("show")
@click.argument("run_id")
@common.backend_option
@click.option("--json", "as_json", is_flag=True, help="Print the timeline and records as JSON.")
@click.option("--raw", is_flag=True, help="Print the log's records, one per line.")
def show_command(run_id: str, url: str | None, as_json: bool, raw: bool) -> None:
    """Show a run as a timeline: steps, attempts, sleeps, events, children, values."""

    async def go() -> Timeline:
        backend = common.open_backend(url)
        try:
            return await load(backend, run_id)
        finally:
            await backend.close()

    tl = common.run(go())
    if as_json:
        click.echo(orjson.dumps(tl.to_json(), option=orjson.OPT_NON_STR_KEYS).decode())
    elif raw:
        _raw(tl)
    else:
        common.console().print(render(tl))


@click.command("watch")
@click.argument("run_id")
@common.backend_option
@click.option("--interval", default=0.5, show_default=True, help="Seconds between reads.")
def watch_command(run_id: str, url: str | None, interval: float) -> None:
    """Follow a run live until it ends.

    On a terminal the timeline redraws in place; in a pipe each new row is
    printed once, as it appears.
    """
    out = common.console()

    async def go() -> None:
        backend = common.open_backend(url)
        try:
            tl = await load(backend, run_id)
            if out.is_terminal:
                with Live(render(tl), console=out, auto_refresh=False) as live:
                    while tl.status not in TERMINAL_STATUSES:
                        await asyncio.sleep(interval)
                        tl = await load(backend, run_id)
                        live.update(render(tl), refresh=True)
                return
            out.print(_header(tl))
            shown: set[tuple[str, int | None, str]] = set()
            while True:
                for row in tl.rows:
                    key = (row.kind, row.position, row.label)
                    done = not row.is_bar or row.end is not None
                    if key not in shown and done:
                        shown.add(key)
                        line = Text(f"{relative(row.start, tl.started_at):>9}  ")
                        line.append_text(plain(row.label))
                        line.append("  ")
                        line.append_text(_detail(row))
                        out.print(line)
                if tl.status in TERMINAL_STATUSES:
                    out.print(plain(f"run {tl.run_id} {tl.status}"))
                    return
                await asyncio.sleep(interval)
                tl = await load(backend, run_id, now=time.time())
        finally:
            await backend.close()

    common.run(go())
