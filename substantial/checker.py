"""Check code against stored runs before deploying it: replay every log, run nothing.

Each run's log is replayed against the workflow code a registry holds for
its (name, version), exactly as a worker would after a crash, except that
no step runs and nothing is written. A run whose history the code no
longer reproduces is reported with the command, log position, and what was
recorded against what the code asks for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from substantial._offline import replay
from substantial.backends._paging import iter_runs
from substantial.backends.base import Backend
from substantial.errors import NonDeterminismError, SubstantialError
from substantial.portable import ExportedRun
from substantial.records import decode_entry
from substantial.workflow import Registry

__all__ = ["CheckReport", "Finding", "check_exported", "check_store", "describe_finding"]


@dataclass(frozen=True, slots=True)
class Finding:
    """A run the code cannot replay (``kind`` "nondeterministic") or could not check."""

    run_id: str
    workflow: str
    version: str | None
    #: "nondeterministic", "unknown-workflow" (no code registered) or "unreadable".
    kind: str
    message: str
    position: int | None = None
    command: int | None = None
    recorded: str | None = None
    requested: str | None = None


@dataclass
class CheckReport:
    """What a check found: runs replayed cleanly, runs skipped, and every finding."""

    checked: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def diverged(self) -> list[Finding]:
        """Return the runs the code replays differently from their logs."""
        return [f for f in self.findings if f.kind == "nondeterministic"]

    @property
    def ok(self) -> bool:
        """Tell whether every run checked replays and none was skipped."""
        return not self.findings


async def _check_one(
    registry: Registry, run_id: str, entries: list[bytes], report: CheckReport
) -> None:
    try:
        start = decode_entry(run_id, 0, entries[0])[0] if entries else None
        if start is None or start["k"] != "start":
            raise ValueError("the log does not begin with a start record")
        name, version = str(start["workflow"]), start.get("version")
    except (ValueError, SubstantialError) as exc:
        report.findings.append(Finding(run_id, "?", None, "unreadable", str(exc)))
        return
    wf = registry.lookup(name, version)
    if wf is None or wf.version != version:
        wanted = name + (f" (version {version})" if version is not None else "")
        report.findings.append(
            Finding(run_id, name, version, "unknown-workflow", f"no code registered for {wanted}")
        )
        return
    try:
        await replay(wf, entries)
    except NonDeterminismError as exc:
        report.findings.append(
            Finding(
                run_id,
                name,
                version,
                "nondeterministic",
                str(exc),
                exc.position,
                exc.command,
                exc.recorded,
                exc.requested,
            )
        )
        return
    except SubstantialError as exc:
        report.findings.append(Finding(run_id, name, version, "unreadable", str(exc)))
        return
    except Exception as exc:  # the workflow's own code failed differently on replay
        message = f"replay raised {type(exc).__name__}: {exc}"
        report.findings.append(Finding(run_id, name, version, "nondeterministic", message))
        return
    report.checked += 1


async def check_store(
    registry: Registry,
    backend: Backend,
    *,
    workflow: str | None = None,
    status: str | None = None,
    since: float | None = None,
    concurrency: int = 32,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Replay every stored run matching the filters against the code in ``registry``.

    ``since`` keeps runs created at or after that epoch time. ``progress`` is
    called with the number of runs done after each one. Logs are read
    ``concurrency`` at a time.
    """
    report = CheckReport()
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=2 * concurrency)
    done = 0

    async def consume() -> None:
        nonlocal done
        while (run_id := await queue.get()) is not None:
            await _check_one(registry, run_id, await backend.read_log(run_id), report)
            done += 1
            if progress is not None:
                progress(done)

    consumers = [asyncio.create_task(consume()) for _ in range(concurrency)]
    try:
        async for info in iter_runs(backend, workflow=workflow, status=status, since=since):
            if info.status == "corrupt":
                note = info.note or "its metadata is corrupt"
                report.findings.append(
                    Finding(info.run_id, info.workflow, None, "unreadable", note)
                )
                continue
            await queue.put(info.run_id)
        for _ in consumers:
            await queue.put(None)
        await asyncio.gather(*consumers)
    finally:
        for task in consumers:
            task.cancel()
    report.findings.sort(key=lambda f: f.run_id)
    return report


async def check_exported(
    registry: Registry,
    runs: Iterable[ExportedRun],
    *,
    progress: Callable[[int], None] | None = None,
) -> CheckReport:
    """Replay runs read from an export (:func:`substantial.portable.read_exported`)."""
    report = CheckReport()
    for done, run in enumerate(runs, 1):
        await _check_one(registry, run.run_id, run.entries(), report)
        if progress is not None:
            progress(done)
    return report


def describe_finding(finding: Finding) -> str:
    """Render a finding as one line for people."""
    return f"{finding.run_id} ({finding.workflow}): {finding.kind}: {finding.message}"
