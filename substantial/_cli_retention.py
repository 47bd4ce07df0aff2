"""``substantial runs delete`` and ``runs prune``: remove ended runs from a store."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import click
import orjson

from substantial._cli_common import backend_option, console, open_backend, plain, run
from substantial._cli_repair import parse_since
from substantial._retention import PruneReport, delete_run, prune_runs
from substantial.backends.base import TERMINAL_STATUSES
from substantial.errors import BackendUnavailable, InvalidArgument, SubstantialError, Unsupported
from substantial.retention import Retention

__all__ = ["delete_command", "keep_option", "prune_command"]


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    raise AssertionError("unreachable")


def _age(value: str) -> float:
    """Read ``--older-than``: a duration (``90m``, ``7d``, ``2w``) or an ISO date/time."""
    now = time.time()
    try:
        since = parse_since(value, now)
    except click.BadParameter:
        raise click.BadParameter(
            "use a duration like 90m, 24h, 7d, 2w, or an ISO date/time (2026-11-30T08:00)",
            param_hint="--older-than",
        ) from None
    assert since is not None
    return max(now - since, 0.0)


def _keep(_ctx: click.Context, _param: click.Parameter, values: tuple[str, ...]) -> Any:
    """Read ``--keep STATUS=AGE`` options into a :class:`Retention`, or None."""
    if not values:
        return None
    ages: dict[str, float] = {}
    for value in values:
        status, sep, age = value.partition("=")
        if not sep or status not in TERMINAL_STATUSES:
            raise click.BadParameter(
                f"{value!r}: use STATUS=AGE with an end status "
                f"({', '.join(sorted(TERMINAL_STATUSES))}), e.g. completed=7d",
                param_hint="--keep",
            )
        ages[status] = _age(age)
    try:
        return Retention(**ages)  # type: ignore[arg-type]
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), param_hint="--keep") from None


def keep_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--keep STATUS=AGE`` (repeatable) to the worker command: its retention policy."""
    return click.option(
        "--keep",
        "retention",
        multiple=True,
        metavar="STATUS=AGE",
        callback=_keep,
        help="Delete runs that ended so once this old, e.g. --keep completed=7d "
        "--keep failed=30d (docs/retention.md).",
    )(fn)


@click.command("delete")
@click.argument("run_ids", nargs=-1, required=True)
@backend_option
def delete_command(run_ids: tuple[str, ...], url: str | None) -> None:
    """Delete ended runs (RUN_IDS): log, inbox, metadata, due entry and lease.

    A run that has not ended is refused: cancel it first. Deleting a run
    that is not there is not an error. The exit status is 1 if any run
    could not be deleted.
    """

    async def go() -> list[tuple[str, str, bool]]:
        backend = open_backend(url)
        out: list[tuple[str, str, bool]] = []
        try:
            for run_id in run_ids:
                try:
                    done = await delete_run(backend, run_id)
                except (BackendUnavailable, Unsupported):
                    raise  # every other run would fail alike
                except SubstantialError as exc:
                    out.append((run_id, str(exc), False))
                    continue
                if done is None:
                    out.append((run_id, f"no run {run_id} (nothing to delete)", True))
                else:
                    out.append((run_id, f"deleted {run_id} ({_size(done.bytes)})", True))
        finally:
            await backend.close()
        return out

    failed = False
    for _, message, ok in run(go()):
        if ok:
            console().print(plain(message))
        else:
            failed = True
            console(stderr=True).print(plain(message, "bold red"))
    if failed:
        raise click.exceptions.Exit(1)


@click.command("prune")
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Ended more than this long ago: 90m, 24h, 7d, 2w, or an ISO date/time.",
)
@click.option(
    "--status",
    "statuses",
    multiple=True,
    type=click.Choice(sorted(TERMINAL_STATUSES)),
    help="Only runs that ended so (repeat for several; default: every end).",
)
@click.option("--workflow", help="Only runs of this workflow.")
@click.option("--limit", type=click.IntRange(min=0), help="Delete at most this many runs.")
@click.option(
    "--jobs", type=click.IntRange(min=1), default=8, show_default=True, help="Deletes at once."
)
@click.option("--dry-run", is_flag=True, help="Delete nothing: print what would go.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@backend_option
def prune_command(
    older_than: str,
    statuses: tuple[str, ...],
    workflow: str | None,
    limit: int | None,
    jobs: int,
    dry_run: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Delete the runs that ended (completed, failed, ...) more than --older-than ago.

    Runs that have not ended are never touched. A run a worker still holds
    is skipped and named. With --dry-run nothing is deleted.
    """
    age = _age(older_than)

    async def go() -> PruneReport:
        backend = open_backend(url)
        try:
            return await prune_runs(
                backend,
                older_than=age,
                status=statuses or None,
                workflow=workflow,
                dry_run=dry_run,
                limit=limit,
                jobs=jobs,
            )
        finally:
            await backend.close()

    report = run(go())
    if as_json:
        body = {
            "dry_run": report.dry_run,
            "count": report.count,
            "bytes": report.bytes,
            "runs": [{k: getattr(r, k) for k in r.__slots__} for r in report.runs],
            "skipped": report.skipped,
        }
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
        return
    out = console()
    verb = "would delete" if dry_run else "deleted"
    for r in report.runs:
        ended = datetime.fromtimestamp(r.updated_at, UTC).strftime("%Y-%m-%d %H:%M")
        line = f"{verb} {r.run_id}  {r.workflow}  {r.status}  ended {ended}  {_size(r.bytes)}"
        out.print(plain(line))
    for run_id, why in report.skipped.items():
        console(stderr=True).print(plain(f"skipped {run_id}: {why}", "yellow"))
    summary = f"{verb} {report.count} run(s), {_size(report.bytes)} of log and metadata"
    if report.skipped:
        summary += f"; {len(report.skipped)} skipped"
    out.print(plain(summary, "green"))
