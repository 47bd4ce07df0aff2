"""What every workload of ``python -m bench`` shares: its sitting, the floor, the checks.

A workload is ``async def fn(s: Sitting) -> dict``: it runs on the fresh
store of ``s`` (``s.open()``, or ``s.url()`` from another process) with
``s.n`` as its size, and returns at least ``seconds``, ``per_op_ms`` and
``ok`` (whether its result was right, checked against what it asked for),
optionally ``ratio`` (when the floor is not one write per operation) and
``error`` (what was wrong). :func:`measure` runs it ``repeat`` times, each
round on a new store beside the store's floor measured in that round, and
returns one JSON-ready line: medians, and no time at all if any round was
wrong (a wrong result is an error, never a figure).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.bench_backends import TARGETS, Target
from substantial.backends.base import Backend

ROOT = Path(__file__).resolve().parent.parent
#: Records written per floor measurement, best of FLOOR_TRIES.
FLOOR_N = 200
FLOOR_TRIES = 3


@dataclass
class Sitting:
    """One round of one workload on one store: where, how durable, how big, and the floor."""

    backend: str
    work: Path
    durability: str
    n: int
    #: One record written the cheapest way the store allows, this round, in ms.
    floor_ms: float
    _memory: dict[Path, Backend] = field(default_factory=dict)

    @property
    def target(self) -> Target:
        """The store's entry in bench.bench_backends.TARGETS."""
        return TARGETS[self.backend]

    def url(self, sub: str = "") -> str | None:
        """Return the URL of the store (None: it lives in this process only)."""
        return self.target.url(self.work / sub if sub else self.work, self.durability)

    def open(self, sub: str = "") -> Backend:
        """Open the store (``sub``: another store of this round); reopening gives the same data."""
        work = self.work / sub if sub else self.work
        if self.url(sub) is None:
            # A memory store lives as long as the round: reopening it must find its runs.
            if work not in self._memory:
                self._memory[work] = self.target.open(work, self.durability)
            return self._memory[work]
        return self.target.open(work, self.durability)


Workload = Callable[[Sitting], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Spec:
    """A workload of ``python -m bench``: its function, default size, and what it needs."""

    fn: Workload
    n: int
    what: str
    #: Needs a store other processes can open (worker or sender processes).
    shared: bool = False
    #: Run once whatever ``--repeat`` says (a store of a million runs is built once).
    once: bool = False


def append_floor_ms(name: str, work: Path, durability: str) -> float:
    """Return one record write on the raw store in ms, best of FLOOR_TRIES."""
    floor = TARGETS[name].floors["append"]
    times = []
    for i in range(FLOOR_TRIES):
        d = work / f"floor{i}"
        d.mkdir(parents=True)
        times.append(floor(d, FLOOR_N, durability))
        shutil.rmtree(d, ignore_errors=True)
    return min(times) / FLOOR_N * 1000


def _error(exc: BaseException) -> str:
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" at {Path(frame.filename).name}:{frame.lineno}" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}"


async def one_round(spec: Spec, name: str, n: int, durability: str, base: Path | None) -> Any:
    """Run one round on a fresh store; return the workload's dict, with ``floor_ms``."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-", dir=base))
    try:
        floor = append_floor_ms(name, work / "floors", durability)
        s = Sitting(name, work / "store", durability, n, floor)
        s.work.mkdir()
        try:
            result = await spec.fn(s)
        except Exception as exc:
            result = {"ok": False, "error": _error(exc)}
        finally:
            for backend in s._memory.values():
                await backend.close()
        result.setdefault("floor_ms", round(floor, 5))
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def measure(
    workload: str, spec: Spec, name: str, n: int, durability: str, repeat: int, base: Path | None
) -> list[dict[str, Any]]:
    """Run ``spec`` ``repeat`` times on store ``name``; return the lines to print.

    A workload may return more lines under ``lines`` (each with its own
    ``workload`` name and ``ok``): they come from its median round.
    """
    line: dict[str, Any] = {"workload": workload, "backend": name, "durability": durability}
    line["n"] = n
    if spec.shared and TARGETS[name].url(Path("/nonexistent"), durability) is None:
        return [{**line, "ok": None, "skipped": "needs a store other processes can open"}]
    rounds = [
        await one_round(spec, name, n, durability, base)
        for _ in range(1 if spec.once else max(1, repeat))
    ]
    line["repeat"] = len(rounds)
    main = _aggregate(line, rounds)
    out = [main]
    for extra in main.pop("lines", []):
        if extra.get("ok") is not True:
            # The same rule for a workload's other lines: no figure from a wrong result.
            extra = {k: v for k, v in extra.items() if k not in ("seconds", "per_op_ms", "ratio")}
            extra.setdefault("error", "the workload's result was wrong")
        out.append({**line, **extra})
    return out


def _aggregate(line: dict[str, Any], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    wrong = [r for r in rounds if r.get("ok") is not True]
    if wrong:
        # No figure from a run that did not do what it was asked.
        first = wrong[0]
        drop = ("seconds", "per_op_ms", "ratio", "lines")
        keep = {k: v for k, v in first.items() if k not in drop}
        error = first.get("error") or "the workload's result was wrong"
        return {**line, **keep, "ok": False, "error": error, "wrong_rounds": len(wrong)}
    ratios = sorted(_ratio(r) for r in rounds if _ratio(r) is not None)  # type: ignore[misc]
    middle = sorted(rounds, key=lambda r: float(r["per_op_ms"]))[len(rounds) // 2]
    out = {**line, **middle}
    out["per_op_ms"] = round(statistics.median(float(r["per_op_ms"]) for r in rounds), 5)
    out["seconds"] = round(statistics.median(float(r["seconds"]) for r in rounds), 5)
    out["floor_ms"] = round(statistics.median(float(r["floor_ms"]) for r in rounds), 5)
    out["ratio"] = round(statistics.median(ratios), 3) if ratios else None
    if len(ratios) > 1:
        out["ratio_range"] = [round(ratios[0], 3), round(ratios[-1], 3)]
    out["ok"] = True
    return out


def _ratio(r: dict[str, Any]) -> float | None:
    if "ratio" in r:
        return None if r["ratio"] is None else float(r["ratio"])
    floor = float(r["floor_ms"])
    return float(r["per_op_ms"]) / floor if floor > 0 else None


# -- helpers the workloads share ---------------------------------------------------------


def worker_process(url: str, trace: Path | None = None) -> subprocess.Popen[str]:
    """Start ``substantial worker`` for tests.workflows on ``url``; return once it serves."""
    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    if trace is not None:
        env["SUBSTANTIAL_TEST_TRACE"] = str(trace)
    cmd = [sys.executable, "-m", "substantial.cli", "worker", "tests.workflows:conductor"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()  # the worker prints "worker ready ..." once it can serve
    if "ready" not in line:
        proc.kill()
        rest = proc.communicate()[1]
        raise RuntimeError(f"the worker did not start: {line}{rest}"[:2000])
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    """End a worker process started by :func:`worker_process` (SIGTERM, then wait)."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def memory_mb(pid: int) -> dict[str, float]:
    """Return a process's resident memory now and at its peak, in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields["VmRSS"], "peak_rss_mb": fields["VmHWM"]}


def requests(backend: Backend) -> Counter[str]:
    """The requests an S3 backend has sent, by operation (empty for other stores)."""
    return Counter(getattr(backend, "requests", {}))


def spent(backend: Backend, before: Counter[str], per: float, unit: str) -> dict[str, Any]:
    """Requests sent since ``before``, in total and per ``unit`` (S3 only; else nothing)."""
    sent = requests(backend) - before
    if not sent:
        return {}
    return {"requests": dict(sent), f"requests_per_{unit}": round(sum(sent.values()) / per, 3)}


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` until true; raise TimeoutError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.0005)
