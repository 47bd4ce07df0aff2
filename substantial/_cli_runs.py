"""``substantial runs ...``: list, search, show, watch, tail, send and cancel."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import click
import orjson
from rich.table import Table
from rich.text import Text

from substantial import _cli_common as common
from substantial._cli_common import ago, plain, safe, short_json, status_text
from substantial._cli_show import show_command, watch_command
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo
from substantial.conductor import Conductor
from substantial.errors import SubstantialError
from substantial.records import Record, decode_entry
from substantial.search import Page, RunQuery, find_runs, parse_cursor, parse_time, run_json
from substantial.timeline import format_duration, pretty_name

__all__ = ["runs"]

SORTS = ["created", "updated", "id", "status", "workflow"]


@click.group()
def runs() -> None:
    """Inspect and steer runs."""


runs.add_command(show_command)
runs.add_command(watch_command)


@contextlib.contextmanager
def _progress(what: str) -> Iterator[Any]:
    """Show a spinner with a count on a terminal's stderr while a long read runs."""
    err = common.console(stderr=True)
    if not err.is_terminal:
        yield lambda n: None
        return
    with err.status(f"{what}...") as status:
        yield lambda n: status.update(f"{what}: {n} read")


def _outcome(info: RunInfo) -> Text:
    if info.status == "completed":
        return plain(short_json(info.output, 60), "green")
    if info.error is not None:
        return plain(common.error_text(info.error)[:80], "red")
    if info.note:
        return plain(info.note[:80], "yellow")
    if info.status == "continued" and isinstance(info.output, dict):
        return plain(f"→ {info.output.get('next')}")
    return Text()


def _table(page: Page, now: float) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("run", overflow="fold")
    table.add_column("workflow", overflow="fold")
    table.add_column("status", no_wrap=True)
    table.add_column("started", no_wrap=True)
    table.add_column("took", justify="right", no_wrap=True)
    if any(info.parent for info in page.runs):
        table.add_column("parent", overflow="fold")
    table.add_column("result / error / note", overflow="fold")
    for info in page.runs:
        end = info.updated_at if info.status in TERMINAL_STATUSES else now
        cells: list[Text | str] = [
            plain(info.run_id),
            plain(info.workflow),
            status_text(info.status),
            ago(info.created_at, now),
            format_duration(end - info.created_at) if info.created_at else "",
        ]
        if len(table.columns) == 7:
            cells.append(plain(info.parent or ""))
        cells.append(_outcome(info))
        table.add_row(*cells)
    return table


@runs.command("list")
@common.backend_option
@click.option("--status", help="Only runs with this status (active, completed, failed, ...).")
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--parent", help="Only the children of this run.")
@click.option("--queue", help="Only runs started into this queue (named by the queue's log).")
@click.option("--since", help="Only runs started at or after: ISO time, epoch, or age (15m, 2h).")
@click.option("--until", "until_", metavar="TIME", help="Only runs started before this time.")
@click.option("--id", "id_text", metavar="TEXT", help="Only runs whose id contains TEXT.")
@click.option(
    "--where",
    metavar="JSON",
    help='Filter expression on result, error and times, e.g. \'{"or": [{"lt": 3}, '
    '{"contains": "fatal"}]}\' (see docs/operate.md).',
)
@click.option(
    "--sort",
    type=click.Choice(SORTS),
    default="created",
    show_default=True,
    help="created: newest first, from the store's creation-time index where it has one "
    "(SQLite, Postgres, Redis); id: run id order.",
)
@click.option("--reverse", is_flag=True, help="Reverse the order (default: newest first).")
@click.option("--limit", default=50, show_default=True, help="Runs per page.")
@click.option("--offset", default=0, show_default=True, help="Skip this many runs (next pages).")
@click.option(
    "--before",
    metavar="TIME,RUN",
    help="Newest first, the runs after this one: the created_at and run_id of the last run "
    "of the previous page (the footer gives it; reads no run before it).",
)
@click.option(
    "--scan-limit",
    default=100_000,
    show_default=True,
    help="Read at most this many runs' metadata.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the page as a JSON array.")
def list_command(
    url: str | None,
    status: str | None,
    workflow: str | None,
    parent: str | None,
    queue: str | None,
    since: str | None,
    until_: str | None,
    id_text: str | None,
    where: str | None,
    sort: str,
    reverse: bool,
    limit: int,
    offset: int,
    before: str | None,
    scan_limit: int,
    as_json: bool,
) -> None:
    """List runs, filtered, sorted and paged."""
    expr = common.parse_json_option(where, "--where")
    now = time.time()
    try:
        query = RunQuery(
            status=status,
            workflow=workflow,
            parent=parent,
            since=None if since is None else parse_time(since, now=now, what="--since"),
            until=None if until_ is None else parse_time(until_, now=now, what="--until"),
            text=id_text,
            queue=queue,
            where=expr,
            sort=sort,
            descending=(sort in ("created", "updated")) != reverse,
            limit=limit,
            offset=offset,
            scan_limit=scan_limit,
            before=None if before is None else parse_cursor(before),
        )
    except SubstantialError as exc:
        raise click.UsageError(common.one_line(str(exc))) from exc

    async def go() -> Page:
        backend = common.open_backend(url)
        try:
            with _progress("reading runs") as progress:
                return await find_runs(backend, query, progress)
        finally:
            await backend.close()

    page = common.run(go())
    if as_json:
        data = [run_json(info) for info in page.runs]
        click.echo(orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS).decode())
        return
    out = common.console()
    if not page.runs:
        out.print("no runs match" + (f" (of {page.scanned} read)" if page.scanned else ""))
        return
    out.print(_table(page, now))
    first, last = offset + 1, offset + len(page.runs)
    footer = f"{first}-{last} of {page.total}{'+' if page.truncated else ''} runs"
    if last < page.total:
        footer += f"; next page: --offset {last}"
        if sort == "created" and query.descending:
            tail = page.runs[-1]
            footer += f" or --before {tail.created_at!r},{tail.run_id}"
    if page.truncated and page.scanned >= scan_limit:
        footer += f"; stopped after reading {page.scanned} runs (raise --scan-limit)"
    out.print(Text(footer, style="dim"))


def summary(record: Record) -> str:
    """Say in one line what one record is."""
    kind = record["k"]
    if kind == "start":
        return f"start {record['workflow']} {short_json(record.get('kwargs'), 60)}"
    if kind == "step":
        name = pretty_name(str(record["name"]))
        if "error" in record:
            return f"step {name} failed: {common.error_text(record['error'])}"
        return f"step {name} = {short_json(record.get('value'), 60)}"
    if kind == "attempt":
        err = common.error_text(record["error"])
        return f"attempt {record['n']} of {pretty_name(str(record['name']))} failed: {err}"
    if kind == "sleep":
        return f"{record.get('for', 'sleep')} until {common.clock(float(record['until']))}"
    if kind == "event":
        return f"event {record['name']} {short_json(record.get('value'), 60)}"
    if kind == "end":
        tail = record.get("value", record.get("error", record.get("next")))
        return f"end {record['status']} {short_json(tail, 60) if tail is not None else ''}"
    if kind == "log":
        return f"log {record['msg']}"
    if kind in ("publish", "emit"):
        key = record.get("key", record.get("stream"))
        return f"{kind} {key} {short_json(record.get('value'), 60)}"
    if kind == "child":
        return f"child {record.get('name')} {record['run_id']}"
    rest = {k: v for k, v in record.items() if k not in ("k", "c")}
    return f"{kind} {short_json(rest, 60)}"


async def _tail(
    backend: Backend, workflow: str | None, interval: float, history: bool, max_records: int | None
) -> None:
    out = common.console()
    positions: dict[str, int] = {}
    updated: dict[str, float] = {}
    printed = 0
    first = True
    while True:
        after: str | None = None
        listed: list[RunInfo] = []
        while True:
            page = await backend.list_runs(workflow=workflow, limit=500, after=after)
            listed.extend(page)
            if len(page) < 500:
                break
            after = page[-1].run_id
        for info in listed:
            rid = info.run_id
            if (
                rid in positions
                and updated.get(rid) == info.updated_at
                and (info.status in TERMINAL_STATUSES)
            ):
                continue  # ended and unchanged since its last read
            entries = await backend.read_log(rid, positions.get(rid, 0))
            start = positions.get(rid, 0)
            positions[rid] = start + len(entries)
            updated[rid] = info.updated_at
            if first and not history:
                continue
            for i, data in enumerate(entries):
                try:
                    records = decode_entry(rid, start + i, data)
                except SubstantialError as exc:
                    out.print(plain(f"{rid} position {start + i}: {exc}", "red"))
                    continue
                for record in records:
                    t = record.get("t", record.get("at"))
                    stamp = common.clock(float(t)) if isinstance(t, (int, float)) else " " * 12
                    line = Text(f"{stamp}  ")
                    line.append(safe(rid), style="bold")
                    line.append("  ")
                    line.append(safe(summary(record)))
                    out.print(line)
                    printed += 1
                    if max_records is not None and printed >= max_records:
                        return
        first = False
        await asyncio.sleep(interval)


@runs.command("tail")
@common.backend_option
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between reads.")
@click.option("--history", is_flag=True, help="Print existing records first.")
@click.option("--max-records", type=int, help="Stop after printing this many records.")
def tail_command(
    url: str | None, workflow: str | None, interval: float, history: bool, max_records: int | None
) -> None:
    """Print new records across runs as they are written (Ctrl-C stops).

    Each read lists the runs' metadata and reads the new part of every active
    run's log: meant for a store of modest size, or narrowed with --workflow.
    """

    async def go() -> None:
        backend = common.open_backend(url)
        try:
            await _tail(backend, workflow, interval, history, max_records)
        finally:
            await backend.close()

    common.run(go())


@runs.command("send")
@click.argument("run_id")
@click.argument("name")
@click.argument("value", required=False)
@common.backend_option
@click.option("--event-id", help="Idempotency key: the same id is delivered once.")
def send_command(
    run_id: str, name: str, value: str | None, url: str | None, event_id: str | None
) -> None:
    """Send event NAME with a JSON VALUE to a run."""
    try:
        parsed = None if value is None else orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(
            f"VALUE must be JSON (e.g. 2, '\"text\"', '{{\"a\": 1}}'): {exc}"
        ) from exc

    async def go() -> str:
        conductor = Conductor(common.backend_url(url))
        try:
            return await conductor.get(run_id).send(name, parsed, event_id=event_id)
        finally:
            await conductor.close()

    click.echo(common.run(go()))


@runs.command("cancel")
@click.argument("run_id")
@common.backend_option
def cancel_command(run_id: str, url: str | None) -> None:
    """Ask a run to stop; it ends as cancelled at its next step or wait."""

    async def go() -> None:
        conductor = Conductor(common.backend_url(url))
        try:
            await conductor.get(run_id).cancel()
        finally:
            await conductor.close()

    common.run(go())
    click.echo(f"cancel requested for {run_id} at {common.clock(time.time(), date=True)}")
