"""The ``substantial`` command: demo, worker, and run inspection."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import orjson

from substantial.backends import from_url
from substantial.backends.base import Backend
from substantial.conductor import Conductor
from substantial.errors import SubstantialError
from substantial.records import decode_entry

DEFAULT_BACKEND = "sqlite://./.substantial/substantial.db"
BACKEND_HELP = (
    "Backend URL (memory://, file:///dir, sqlite:///file.db, redis://host, s3://bucket/prefix). "
    f"Default: $SUBSTANTIAL_BACKEND or {DEFAULT_BACKEND}"
)


def _error_text(error: Any) -> str:
    """Render a stored error as one line: ``Type: message``."""
    if isinstance(error, dict):
        return f"{error.get('type')}: {error.get('message')}"
    return str(error)


def _backend_url(url: str | None) -> str:
    return url or os.environ.get("SUBSTANTIAL_BACKEND") or DEFAULT_BACKEND


def _run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except SubstantialError as exc:
        raise click.ClickException(str(exc)) from exc


@click.group()
@click.version_option(package_name="substantial")
def main() -> None:
    """Brokerless durable execution for Python."""


@main.command()
@click.option("--backend", "url", help=BACKEND_HELP)
@click.option("--sleep", "sleep_s", default=2.0, show_default=True, help="Seconds the demo sleeps.")
def demo(url: str | None, sleep_s: float) -> None:
    """Run the README's workflow step by step on the embedded backend."""
    from substantial.demo import run_demo

    backend_url = url or os.environ.get("SUBSTANTIAL_BACKEND") or DEFAULT_BACKEND
    if backend_url.startswith("sqlite://./"):
        Path(".substantial").mkdir(exist_ok=True)
    _run(run_demo(backend_url, sleep_s))


@main.command()
@click.argument("target")
@click.option("--concurrency", default=1000, show_default=True, help="Runs held at once.")
@click.option("--lease-ttl", default=30.0, show_default=True, help="Lease length in seconds.")
@click.option(
    "--idle-timeout",
    default=60.0,
    show_default=True,
    help="Seconds before a waiting run leaves memory.",
)
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def worker(
    target: str, concurrency: int, lease_ttl: float, idle_timeout: float, verbose: bool
) -> None:
    """Run a worker for the Conductor TARGET, given as MODULE:ATTRIBUTE.

    SIGTERM and SIGINT stop it gracefully: running steps get a grace period
    and held runs are handed back for other workers.
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    conductor = _load_conductor(target)

    async def serve() -> None:
        agent = conductor.run(
            concurrency=concurrency, lease_ttl=lease_ttl, idle_timeout=idle_timeout
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.cancel)
        click.echo(f"worker ready on {conductor.backend.describe()} (pid {os.getpid()})", err=True)
        await agent
        await conductor.close()

    _run(serve())


def _load_conductor(target: str) -> Conductor:
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            "use MODULE:ATTRIBUTE, e.g. myapp.flows:conductor", param_hint="TARGET"
        )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="TARGET"
        ) from exc
    obj = getattr(module, attr, None)
    if not isinstance(obj, Conductor):
        raise click.BadParameter(
            f"{target} is not a Conductor (got {type(obj).__name__})", param_hint="TARGET"
        )
    return obj


@main.group()
def runs() -> None:
    """Inspect and steer runs."""


def _fmt_time(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


@runs.command("list")
@click.option("--backend", "url", help=BACKEND_HELP)
@click.option("--status", help="Only runs with this status.")
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--limit", default=100, show_default=True)
def runs_list(url: str | None, status: str | None, workflow: str | None, limit: int) -> None:
    """List runs."""

    async def go() -> None:
        backend = from_url(_backend_url(url))
        try:
            for info in await backend.list_runs(status=status, workflow=workflow, limit=limit):
                click.echo(
                    f"{info.run_id}  {info.workflow:<20} {info.status:<10} "
                    f"updated {_fmt_time(info.updated_at)}"
                    + (f"  {_error_text(info.error)}" if info.error else "")
                    + (f"  ({info.note})" if info.note else "")
                )
        finally:
            await backend.close()

    _run(go())


@runs.command("show")
@click.argument("run_id")
@click.option("--backend", "url", help=BACKEND_HELP)
def runs_show(run_id: str, url: str | None) -> None:
    """Show a run's metadata and its log, record by record."""

    async def go() -> None:
        backend = from_url(_backend_url(url))
        try:
            await _show(backend, run_id)
        finally:
            await backend.close()

    _run(go())


async def _show(backend: Backend, run_id: str) -> None:
    info = await backend.get_run(run_id)
    if info is None:
        raise click.ClickException(f"no run {run_id!r} in {backend.describe()}")
    click.echo(
        f"run {info.run_id}: workflow {info.workflow} (version {info.version}), "
        f"status {info.status}, created {_fmt_time(info.created_at)}"
    )
    if info.error:
        click.echo(f"error: {_error_text(info.error)}")
    if info.note:
        click.echo(f"note: {info.note}")
    for position, data in enumerate(await backend.read_log(run_id)):
        try:
            records = decode_entry(run_id, position, data)
        except SubstantialError as exc:
            click.echo(f"{position:>6}  !! {exc}")
            continue
        for record in records:
            body = {k: v for k, v in record.items() if k != "k"}
            click.echo(f"{position:>6}  {record['k']:<11} {orjson.dumps(body).decode()}")
    inbox = await backend.read_inbox(run_id)
    if inbox:
        click.echo(f"{len(inbox)} event(s) waiting in the inbox")


@runs.command("send")
@click.argument("run_id")
@click.argument("name")
@click.argument("value", required=False)
@click.option("--backend", "url", help=BACKEND_HELP)
def runs_send(run_id: str, name: str, value: str | None, url: str | None) -> None:
    """Send event NAME with a JSON VALUE to a run."""
    try:
        parsed = None if value is None else orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"VALUE must be JSON (e.g. 2, '\"text\"'): {exc}") from exc

    async def go() -> None:
        conductor = Conductor(_backend_url(url))
        try:
            click.echo(await conductor.get(run_id).send(name, parsed))
        finally:
            await conductor.close()

    _run(go())


@runs.command("cancel")
@click.argument("run_id")
@click.option("--backend", "url", help=BACKEND_HELP)
def runs_cancel(run_id: str, url: str | None) -> None:
    """Ask a run to stop."""

    async def go() -> None:
        conductor = Conductor(_backend_url(url))
        try:
            await conductor.get(run_id).cancel()
            click.echo(f"cancel requested for {run_id} at {_fmt_time(time.time())}")
        finally:
            await conductor.close()

    _run(go())


if __name__ == "__main__":
    main()
