"""Chaos on every store several processes share: worker processes SIGKILLed while runs go on.

Three ``substantial worker`` processes serve a stream of runs of random
programs (tests/simulation.py: steps, slow steps, steps with compensations,
sleeps, receives, a handler collecting events, ``asyncio.gather``, child
runs, revert). Meanwhile the test SIGKILLs a random worker every fraction of
a second and starts another, and a client sends each run its events at
random times. Then the kills stop, the last events go out, and every run
must end.

Checked: every result is the program's; every log is well formed; every
event was recorded exactly once and no inbox keeps one; every step's side
effect (a line appended, O_APPEND, to a ledger file outside the engine) ran
exactly once, except a step in flight at a kill: one never started again
after its completion was recorded, and each extra run is in a process killed
before the completion was recorded. Those are counted, and bounded by the
kills times what one worker holds in flight. The counts are the last line
printed (``-s``).

CI runs each store for ``SUBSTANTIAL_CHAOS_SECONDS`` (4) of kills;
``SUBSTANTIAL_CHAOS_SECONDS=60`` runs longer, ``SUBSTANTIAL_CHAOS_SEED=n``
replays one plan of runs, events and kills (the timing is the machine's).
"""

from __future__ import annotations

import asyncio
import heapq
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from substantial import Conductor
from tests.harness import Harness
from tests.redis_server import RedisClusterServers
from tests.sim_checks import audit_runs, read_store
from tests.simulation import (
    expected,
    random_program,
    run_result,
    sends,
    sim,
)
from tests.test_crash import spawn_worker, stop
from tests.test_redis_cluster import RedisClusterHarness
from tests.test_redis_cluster import redis_cluster as redis_cluster  # the module's fixture

SECONDS = float(os.environ.get("SUBSTANTIAL_CHAOS_SECONDS", "4"))
WORKERS = 3
#: Runs one worker holds at once, and the most steps a run has running at once (a gather
#: of three): a kill cuts off at most their product.
CONCURRENCY = 10
#: Fewer SIGKILLs than this in a round would test little.
MIN_KILLS = 3
PARALLEL_STEPS = 3
TARGET = "tests.simulation:conductor"


class Workers:
    """The worker processes, and the kills."""

    def __init__(self, url: str, ledger: Path, rng: random.Random, short_leases: bool) -> None:
        self.url, self.ledger, self.rng = url, ledger, rng
        self.short_leases = short_leases
        self.procs = [self.spawn() for _ in range(WORKERS)]
        #: Each killed process's pid, and when it was certainly dead (reaped).
        self.killed: dict[str, float] = {}

    def spawn(self) -> subprocess.Popen[bytes]:
        idle = self.rng.choice(["0.2", "1", "60"])  # some runs leave memory while they wait
        # A short lease: idle runs held in memory are parked (handed back, lease left to
        # lapse) and taken again when they wake, often, and some by another worker. Not on
        # S3: SeaweedFS holds contended conditional writes for seconds (docs/SCALING.md).
        ttl = self.rng.choice(["0.9", "30"]) if self.short_leases else "30"
        return spawn_worker(
            self.url,
            self.ledger,
            "--concurrency",
            str(CONCURRENCY),
            "--idle-timeout",
            idle,
            "--lease-ttl",
            ttl,
            target=TARGET,
        )

    def kill_one(self) -> None:
        victim = self.procs.pop(self.rng.randrange(len(self.procs)))
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        # Reaped: from now on another worker may take its leases over.
        self.killed[str(victim.pid)] = time.time()
        stop(victim)
        self.procs.append(self.spawn())

    def stop_all(self) -> None:
        for proc in self.procs:
            stop(proc)


async def chaos(harness: Harness, tmp_path: Path, label: str) -> None:
    seed = int(os.environ.get("SUBSTANTIAL_CHAOS_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    ledger = tmp_path / "ledger"
    client = Conductor(await harness.open())
    client.register(sim)
    workers = Workers(harness.url, ledger, rng, short_leases=harness.name != "s3")
    plans: dict[str, tuple[list[Any], bool]] = {}
    results: dict[str, asyncio.Task[Any]] = {}
    outbox: list[tuple[float, str, str, str, str]] = []  # (when, run, event id, name, value)
    started = time.monotonic()
    try:
        next_run, next_kill = started, started + rng.uniform(0.15, 0.6)
        while time.monotonic() < started + SECONDS:
            now = time.monotonic()
            if now >= next_run:
                run_id = f"chaos{len(plans)}"
                program = random_program(rng, max_ops=5, pause_ms=40)
                revert = rng.random() < 0.1
                plans[run_id] = (program, revert)
                await client.start(
                    sim, {"program": program, "tag": run_id, "revert": revert}, run_id=run_id
                )
                results[run_id] = asyncio.ensure_future(run_result(client, run_id))
                events = sends(program)  # sent in this order: a receive takes them in order
                times = sorted(now + rng.uniform(0, 1.5) for _ in events)
                for at, (event_id, name, value) in zip(times, events, strict=True):
                    heapq.heappush(outbox, (at, run_id, event_id, name, value))
                next_run = now + rng.uniform(0.02, 0.15)
            while outbox and outbox[0][0] <= now:
                _at, run_id, event_id, name, value = heapq.heappop(outbox)
                await client.get(run_id).send(name, value, event_id=event_id)
            if now >= next_kill:
                workers.kill_one()
                next_kill = now + rng.uniform(0.15, 0.6)
            await asyncio.sleep(0.01)
        # On a slow store under load the loop above may kill too few to mean anything:
        # kill on while the runs are still in flight.
        while len(workers.killed) < MIN_KILLS:
            await asyncio.sleep(rng.uniform(0.15, 0.6))
            workers.kill_one()
        while outbox:
            _at, run_id, event_id, name, value = heapq.heappop(outbox)
            await client.get(run_id).send(name, value, event_id=event_id)
        done = await asyncio.wait_for(asyncio.gather(*results.values()), timeout=180)
        await settled(client)
    finally:
        workers.stop_all()
        for task in results.values():
            task.cancel()
    elapsed = time.monotonic() - started
    counts = await check(client, plans, dict(zip(results, done, strict=True)), ledger, workers)
    print(f"{label}: {counts}; seed {seed}, {elapsed:.1f}s")


async def settled(client: Conductor, timeout: float = 60) -> None:
    """Wait until nothing is due: what follows each end (reports, cleanup) is done."""
    deadline = time.monotonic() + timeout
    while await client.backend.due(time.time() + 365 * 86400.0, 1):
        assert time.monotonic() < deadline, "runs still due long after every run ended"
        await asyncio.sleep(0.05)


async def check(
    client: Conductor,
    plans: dict[str, tuple[list[Any], bool]],
    results: dict[str, Any],
    ledger: Path,
    workers: Workers,
) -> str:
    """Check everything the runs left; return the counts."""
    for run_id, (program, revert) in plans.items():
        assert results[run_id] == expected(program, run_id, revert), run_id
    stored = await read_store(client.backend, plans)
    assert not stored.problems, stored.problems
    sent = {
        (run_id, eid) for run_id, (program, _r) in plans.items() for eid, _n, _v in sends(program)
    }
    recorded_events = {key for key in stored.events if key[0] in plans}
    assert sent <= recorded_events, sent - recorded_events
    assert all(n == 1 for n in stored.events.values()), "an event was recorded twice"
    assert stored.inbox_left == 0, "an event was left in an inbox"
    calls = []
    for line in ledger.read_text().splitlines():
        sid, when, pid = line.split()
        calls.append((sid, pid, float(when)))
    recorded = {sid: at for (_run, sid), at in stored.steps.items()}
    audit = audit_runs(calls, recorded, workers.killed)
    assert not audit.problems, audit.problems[:10]
    assert audit.unexplained == 0, "a step ran twice in processes that lived on"
    kills = len(workers.killed)
    bound = kills * CONCURRENCY * PARALLEL_STEPS
    assert audit.in_flight <= bound
    return (
        f"{len(plans)} runs and {stored.runs - len(plans)} children, {kills} SIGKILLs, "
        f"{audit.calls} step calls, {audit.in_flight} re-run in flight at a kill "
        f"(bound {bound}), {len(sent)} events each recorded once"
    )


@pytest.fixture
async def cluster_harness(redis_cluster: RedisClusterServers) -> AsyncIterator[Harness]:
    h = RedisClusterHarness(redis_cluster)
    yield h
    await h.aclose()


async def test_sigkilled_workers_lose_nothing(shared_harness: Harness, tmp_path: Path) -> None:
    await chaos(shared_harness, tmp_path, f"chaos on {shared_harness.name}")


async def test_sigkilled_workers_lose_nothing_on_a_redis_cluster(
    cluster_harness: Harness, tmp_path: Path
) -> None:
    await chaos(cluster_harness, tmp_path, "chaos on a redis cluster")
