"""``substantial schedules ...`` and ``substantial queues list``: flow control from a shell."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import click
import orjson
from rich.table import Table

from substantial import _cli_common as common
from substantial.conductor import Conductor
from substantial.queues import QueueInfo
from substantial.schedules import ScheduleInfo

__all__ = ["queues", "schedules"]


def _conductor(url: str | None) -> Conductor:
    return Conductor(common.open_backend(url))


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _timetable(info: ScheduleInfo) -> str:
    if info.cron is not None:
        return f"cron {info.cron!r} ({info.tz})"
    assert info.every is not None
    return f"every {info.every.total_seconds():g}s"


def _schedule_json(info: ScheduleInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "workflow": info.workflow,
        "cron": info.cron,
        "every": None if info.every is None else info.every.total_seconds(),
        "tz": info.tz,
        "catch_up": info.catch_up,
        "paused": info.paused,
        "next_at": None if info.next_at is None else info.next_at.timestamp(),
        "last_at": None if info.last_at is None else info.last_at.timestamp(),
        "last_run": info.last_run,
        "kwargs": info.kwargs,
    }


@click.group()
def schedules() -> None:
    """List and steer schedules (see docs/schedules.md)."""


@schedules.command("list")
@common.backend_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per schedule.")
def schedules_list(url: str | None, as_json: bool) -> None:
    """List the schedules in the store, with their next and last tick."""

    async def go() -> list[ScheduleInfo]:
        conductor = _conductor(url)
        try:
            return await conductor.list_schedules()
        finally:
            await conductor.close()

    found = common.run(go())
    if as_json:
        for info in found:
            click.echo(orjson.dumps(_schedule_json(info)).decode())
        return
    table = Table("name", "workflow", "timetable", "catch up", "state", "next", "last run")
    for info in found:
        state = "paused" if info.paused else "active"
        table.add_row(
            common.safe(info.name),
            common.safe(info.workflow),
            common.safe(_timetable(info)),
            info.catch_up,
            state,
            _when(info.next_at),
            common.safe(info.last_run or "-"),
        )
    common.console().print(table if found else "no schedules")


def _control(verb: str, help_text: str) -> None:
    @schedules.command(verb, help=help_text)
    @click.argument("name")
    @common.backend_option
    def command(name: str, url: str | None) -> None:
        async def go() -> str:
            conductor = _conductor(url)
            try:
                handle = conductor.get_schedule(name)
                if verb == "trigger":
                    return f"started {(await handle.trigger()).run_id}"
                await getattr(handle, verb)()
                return f"{verb} sent to schedule {name}"
            finally:
                await conductor.close()

        click.echo(common.run(go()))


_control("pause", "Stop starting runs until resumed.")
_control("resume", "Start runs again from the next tick.")
_control("delete", "Stop the schedule for good.")
_control("trigger", "Start one run now, outside the timetable.")


def _moment(value: str, what: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{what} must be an ISO 8601 time such as 2025-01-31T00:00:00+00:00"
        ) from exc
    if moment.tzinfo is None:
        raise click.BadParameter(f"{what} needs a time zone offset, e.g. +00:00 or Z")
    return moment


@schedules.command("backfill")
@click.argument("name")
@click.argument("start")
@click.argument("end")
@common.backend_option
def schedules_backfill(name: str, start: str, end: str, url: str | None) -> None:
    """Start the runs of every tick from START to END (ISO 8601, inclusive) not yet started."""
    first, last = _moment(start, "START"), _moment(end, "END")

    async def go() -> list[str]:
        conductor = _conductor(url)
        try:
            runs = await conductor.get_schedule(name).backfill(first, last)
            return [r.run_id for r in runs]
        finally:
            await conductor.close()

    ids = common.run(go())
    for run_id in ids:
        click.echo(run_id)
    click.echo(f"{len(ids)} tick(s) from {start} to {end}", err=True)


@click.group()
def queues() -> None:
    """Inspect queues (see docs/queues.md)."""


def _queue_json(info: QueueInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "concurrency": info.concurrency,
        "per_key_concurrency": info.per_key_concurrency,
        "rate_limit": info.rate_limit,
        "waiting": info.waiting,
        "running": info.running,
        "oldest": info.oldest,
    }


@queues.command("list")
@common.backend_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per queue.")
def queues_list(url: str | None, as_json: bool) -> None:
    """List the queues in the store: depth, running, limits, oldest waiting."""

    async def go() -> list[QueueInfo]:
        conductor = _conductor(url)
        try:
            return await conductor.list_queues()
        finally:
            await conductor.close()

    found = common.run(go())
    if as_json:
        for info in found:
            click.echo(orjson.dumps(_queue_json(info)).decode())
        return
    now = time.time()
    table = Table("name", "waiting", "running", "concurrency", "per key", "rate", "oldest waiting")
    for info in found:
        rate = "-" if info.rate_limit is None else f"{info.rate_limit[0]}/{info.rate_limit[1]:g}s"
        table.add_row(
            common.safe(info.name),
            "?" if info.waiting is None else str(info.waiting),
            "?" if info.running is None else str(info.running),
            str(info.concurrency or "-"),
            str(info.per_key_concurrency or "-"),
            rate,
            "-" if info.oldest is None else common.ago(info.oldest, now),
        )
    common.console().print(table if found else "no queues")
