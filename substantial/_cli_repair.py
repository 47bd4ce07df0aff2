"""``substantial replay``, ``export`` and ``import``: check code against runs, move runs."""

from __future__ import annotations

import re
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import click
import orjson
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from substantial._cli_common import (
    backend_option,
    console,
    load_conductor,
    open_backend,
    plain,
    run,
)
from substantial.backends._paging import iter_runs
from substantial.checker import CheckReport, check_exported, check_store, describe_finding
from substantial.conductor import Conductor
from substantial.portable import (
    JOBS,
    MigrateReport,
    export_runs,
    import_runs,
    migrate,
    read_exported,
)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """Read ``--since``: an ISO date/time, or a duration back from now (``90m``, ``7d``)."""
    if value is None:
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", value.strip())
    if match:
        return (now or time.time()) - float(match[1]) * _UNITS[match[2]]
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise click.BadParameter(
            "use an ISO date/time (2026-11-30T08:00) or a duration like 90m, 24h, 7d",
            param_hint="--since",
        ) from None


def _progress(enabled: bool, what: str = "replaying") -> Progress:
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        console=console(stderr=True),
        disable=not enabled,
        transient=True,
    )


def _report(report: CheckReport, as_json: bool, seconds: float) -> None:
    if as_json:
        body = {
            "checked": report.checked,
            "seconds": round(seconds, 3),
            "findings": [{k: getattr(f, k) for k in f.__slots__} for f in report.findings],
        }
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
        return
    out = console()
    for finding in report.findings:
        out.print(plain(describe_finding(finding), "bold red"))
    total = report.checked + len(report.findings)
    rate = f", {total / seconds:,.0f} runs/s" if seconds > 0 and total else ""
    summary = (
        f"{total} run(s) checked in {seconds:.2f}s{rate}: {report.checked} replay, "
        f"{len(report.diverged)} diverge, {len(report.findings) - len(report.diverged)} not checked"
    )
    out.print(plain(summary, "green" if report.ok else "bold red"))


@click.command("replay")
@click.argument("target")
@backend_option
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--status", help="Only runs with this status (e.g. active).")
@click.option("--since", help="Only runs created since: ISO date/time or 90m, 24h, 7d.")
@click.option(
    "--file",
    "path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check the runs of an export (substantial export) instead of a store.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def replay_command(
    target: str,
    url: str | None,
    workflow: str | None,
    status: str | None,
    since: str | None,
    path: Path | None,
    as_json: bool,
) -> None:
    """Replay stored runs against the code of the Conductor TARGET (MODULE:ATTRIBUTE).

    Nothing runs and nothing is written. Every run whose log the code no
    longer reproduces is reported (command, log position, recorded against
    requested); the exit status is 1 if any run diverges or cannot be
    checked. The store is --backend, else the Conductor's own.
    """
    conductor = load_conductor(target)
    after = parse_since(since)

    async def go() -> tuple[CheckReport, float]:
        backend = open_backend(url) if url else conductor.backend
        started = time.perf_counter()
        with _progress(not as_json and sys.stderr.isatty()) as bar:
            task = bar.add_task("replaying", total=None)

            def advance(done: int) -> None:
                bar.update(task, completed=done)

            if path is not None:
                with path.open("rb") as lines:
                    report = await check_exported(
                        conductor.registry, read_exported(lines), progress=advance
                    )
            else:
                report = await check_store(
                    conductor.registry,
                    backend,
                    workflow=workflow,
                    status=status,
                    since=after,
                    progress=advance,
                )
        if url:
            await backend.close()
        return report, time.perf_counter() - started

    report, seconds = run(go())
    _report(report, as_json, seconds)
    if not report.ok:
        raise click.exceptions.Exit(1)


@click.command("export")
@click.argument("run_ids", nargs=-1)
@backend_option
@click.option("--workflow", help="Export the runs of this workflow.")
@click.option("--status", help="Export the runs with this status.")
@click.option("--since", help="Export the runs created since: ISO date/time or 90m, 24h, 7d.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="File.")
def export_command(
    run_ids: tuple[str, ...],
    url: str | None,
    workflow: str | None,
    status: str | None,
    since: str | None,
    output: Path | None,
) -> None:
    """Write runs (RUN_IDS, or all matching the filters) as JSON lines: log and metadata."""
    after = parse_since(since)

    async def go() -> int:
        backend = open_backend(url)
        try:
            ids = list(run_ids) or [
                info.run_id
                async for info in iter_runs(backend, workflow=workflow, status=status, since=after)
            ]
            sink: Any = output.open("wb") if output else sys.stdout.buffer
            try:
                async for line in export_runs(backend, ids):
                    sink.write(line)
            finally:
                if output:
                    sink.close()
            return len(ids)
        finally:
            await backend.close()

    count = run(go())
    console(stderr=True).print(plain(f"exported {count} run(s)"))


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@backend_option
def import_command(path: Path, url: str | None) -> None:
    """Store the runs of an export in the backend; active ones resume on its workers."""

    async def go() -> list[str]:
        backend = open_backend(url)
        try:
            with path.open("rb") as lines:
                return await import_runs(backend, read_exported(lines))
        finally:
            await backend.close()

    done = run(go())
    console(stderr=True).print(plain(f"imported {len(done)} run(s)"))


def _surgeon(url: str | None, target: str | None) -> Conductor:
    """Open a Conductor on the store, with the code of TARGET when given (to check against)."""
    if target is None:
        return Conductor(open_backend(url))
    conductor = load_conductor(target)
    if url:
        conductor.backend = open_backend(url)
    return conductor


CHECK_HELP = "MODULE:ATTRIBUTE of a Conductor: replay the log against its code first."


@click.command("resume")
@click.argument("run_id")
@backend_option
@click.option("--timeout", type=float, help="A new deadline, in seconds from now.")
@click.option("--check", "target", help=CHECK_HELP)
def resume_command(run_id: str, url: str | None, timeout: float | None, target: str | None) -> None:
    """Make a failed, cancelled or timed-out run go on from where it stopped."""

    async def go() -> str:
        conductor = _surgeon(url, target)
        try:
            await conductor.resume(run_id, timeout=timeout)
            return f"resumed {run_id}: its failed steps run again on the next worker"
        finally:
            await conductor.close()

    console().print(plain(run(go())))


@click.command("fork")
@click.argument("run_id")
@backend_option
@click.option("--at", type=int, help="Log entries to keep (1 keeps only the start).")
@click.option("--run-id", "new_id", help="Id of the new run (default: random).")
def fork_command(run_id: str, url: str | None, at: int | None, new_id: str | None) -> None:
    """Start a new run replaying the first entries of RUN_ID's log, then live."""

    async def go() -> str:
        conductor = Conductor(open_backend(url))
        try:
            return (await conductor.fork(run_id, at=at, new_id=new_id)).run_id
        finally:
            await conductor.close()

    console().print(plain(f"forked {run_id} as {run(go())}"))


@click.command("restart")
@click.argument("run_id")
@backend_option
@click.option("--run-id", "new_id", help="Id of the new run (default: random).")
def restart_command(run_id: str, url: str | None, new_id: str | None) -> None:
    """Start RUN_ID's workflow again from the beginning, with the same arguments."""

    async def go() -> str:
        conductor = Conductor(open_backend(url))
        try:
            return (await conductor.restart(run_id, new_id=new_id)).run_id
        finally:
            await conductor.close()

    console().print(plain(f"restarted {run_id} as {run(go())}"))


@click.command("migrate")
@click.option("--from", "source_url", required=True, metavar="URL", help="Store to copy from.")
@click.option("--to", "target_url", required=True, metavar="URL", help="Store to copy into.")
@click.option("--status", help="Only runs with this status (e.g. completed).")
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=JOBS,
    show_default=True,
    help="Runs copied at once.",
)
def migrate_command(source_url: str, target_url: str, status: str | None, jobs: int) -> None:
    """Copy every run from one store to another, verified by checksum; rerun to resume."""

    async def go() -> MigrateReport:
        source, target = open_backend(source_url), open_backend(target_url)
        try:
            with _progress(sys.stderr.isatty(), "copying") as bar:
                task = bar.add_task("copying", total=None)
                return await migrate(
                    source,
                    target,
                    status=status,
                    jobs=jobs,
                    progress=lambda n: bar.update(task, completed=n),
                )
        finally:
            await source.close()
            await target.close()

    report = run(go())
    out = console()
    for run_id in report.differ:
        out.print(plain(f"{run_id}: the target holds a different log under this id", "bold red"))
    summary = (
        f"{report.copied} run(s) copied and verified, {report.present} already there, "
        f"{len(report.differ)} differ"
    )
    out.print(plain(summary, "green" if report.ok else "bold red"))
    if not report.ok:
        raise click.exceptions.Exit(1)
