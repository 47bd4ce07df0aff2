"""The ``substantial`` command: demo, worker, and run inspection."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path
from typing import Any

import click

from substantial._cli_common import load_conductor
from substantial._cli_flow import queues, schedules
from substantial._cli_repair import (
    export_command,
    fork_command,
    import_command,
    migrate_command,
    replay_command,
    restart_command,
    resume_command,
)
from substantial._cli_retention import delete_command, keep_option, prune_command
from substantial._cli_runs import runs
from substantial._cli_ui import ui
from substantial._cli_workers import workers
from substantial.errors import SubstantialError
from substantial.retention import Retention

DEFAULT_BACKEND = "sqlite://./.substantial/substantial.db"
BACKEND_HELP = (
    "Backend URL (memory://, file:///dir, sqlite:///file.db, redis://host, s3://bucket/prefix). "
    f"Default: $SUBSTANTIAL_BACKEND or {DEFAULT_BACKEND}"
)


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
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line, with run_id, workflow, step and attempt fields.",
)
@keep_option
def worker(
    target: str,
    concurrency: int,
    lease_ttl: float,
    idle_timeout: float,
    verbose: bool,
    log_format: str,
    retention: Retention | None,
) -> None:
    """Run a worker for the Conductor TARGET, given as MODULE:ATTRIBUTE.

    SIGTERM and SIGINT stop it gracefully: running steps get a grace period
    and held runs are handed back for other workers.
    """
    level = logging.INFO if verbose else logging.WARNING
    if log_format == "json":
        from substantial.telemetry import use_json_logs

        use_json_logs(level)
    else:
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    conductor = load_conductor(target)

    async def serve() -> None:
        agent = conductor.run(
            concurrency=concurrency,
            lease_ttl=lease_ttl,
            idle_timeout=idle_timeout,
            retention=retention,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, agent.cancel)
        click.echo(f"worker ready on {conductor.backend.describe()} (pid {os.getpid()})", err=True)
        await agent
        await conductor.close()

    _run(serve())


runs.add_command(resume_command)
runs.add_command(export_command)
runs.add_command(import_command)
runs.add_command(fork_command)
runs.add_command(restart_command)
runs.add_command(delete_command)
runs.add_command(prune_command)
main.add_command(runs)
main.add_command(replay_command)
main.add_command(export_command)
main.add_command(import_command)
main.add_command(migrate_command)
main.add_command(workers)
main.add_command(ui)
main.add_command(schedules)
main.add_command(queues)


if __name__ == "__main__":
    main()
