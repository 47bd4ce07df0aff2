"""Workflows of the schedule and queue tests, importable by worker subprocesses.

``conductor`` opens the backend named by $SUBSTANTIAL_TEST_URL;
``python -m tests.flow_workflows`` runs a worker for it that polls every
0.2 s (S3 has no wake-up signal: its workers find new work by polling) with
one-second leases, until SIGTERM; with $SUBSTANTIAL_TEST_GO, only once that
file exists. Steps
append a line with timestamps to $SUBSTANTIAL_TEST_TRACE: the ledger the
tests read to see what ran, where and when.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import timedelta

from substantial import ChildFailed, Conductor, Context, Every, InvalidArgument, workflow
from tests.workflows import trace


@workflow()
async def ticked(c: Context, scheduled_at: str, tag: str = "") -> str:
    def note() -> str:
        trace(f"{c.run_id} {scheduled_at} {time.time():.6f}")
        return scheduled_at

    return await c.save(note)


@workflow()
async def untimed(c: Context, tag: str = "") -> str:
    return tag


@workflow()
async def held(c: Context, n: int = 0, pause: float = 0.1, key: str = "") -> int:
    """Hold the run for ``pause`` seconds inside one step; the ledger says from when to when."""

    async def work() -> int:
        began = time.time()
        await asyncio.sleep(pause)
        trace(f"{c.run_id} {n} {key or '-'} {began:.6f} {time.time():.6f}")
        return n

    return await c.save(work)


@workflow()
async def fan_out(c: Context, n: int, queue: str, pause: float = 0.05) -> list[int]:
    """Run ``n`` children of ``held`` side by side through ``queue``."""
    children = [
        c.child(held, {"n": i, "pause": pause, "key": "child"}, queue=queue, priority=i % 3)
        for i in range(n)
    ]
    return list(await asyncio.gather(*children))


@workflow()
async def leave_early(c: Context, queue: str) -> list[str]:
    """Start three children into ``queue`` and end before they do: they are cancelled."""
    handles = [await c.start_child(held, {"n": i, "pause": 0.5}, queue=queue) for i in range(3)]
    return [h.run_id for h in handles]


@workflow()
async def bad_children(c: Context) -> list[str]:
    """Start children wrongly; return what each attempt raised."""
    out = []
    for kwargs in ({"key": "k"}, {"queue": "nowhere"}, {"queue": "a/b"}):
        try:
            await c.child(held, {"n": 1}, **kwargs)
        except (InvalidArgument, ChildFailed) as exc:
            out.append(f"{type(exc).__name__}: {exc}")
    return out


@workflow(schedule=Every(timedelta(seconds=0.2), kwargs={"tag": "declared"}))
async def declared(c: Context, scheduled_at: str, tag: str = "") -> str:
    """A workflow that brings its own schedule (not registered by the worker processes)."""
    return f"{tag} {scheduled_at}"


def _conductor() -> Conductor:
    conductor = Conductor(os.environ.get("SUBSTANTIAL_TEST_URL", "memory://"))
    for wf in (ticked, untimed, held, fan_out, leave_early, bad_children):
        conductor.register(wf)
    return conductor


conductor = _conductor()

#: The period of the schedule the multi-process test runs.
PERIOD = timedelta(seconds=0.3)


async def serve() -> None:
    # A standby process (started early, so a test does not wait for Python to start)
    # becomes a worker once the file named by $SUBSTANTIAL_TEST_GO exists.
    go = os.environ.get("SUBSTANTIAL_TEST_GO")
    while go and not os.path.exists(go):
        await asyncio.sleep(0.02)
    # Short leases: a worker skips a run another one holds until its lease ends, so they
    # bound how soon the runs of a killed worker are taken over.
    agent = conductor.run(poll_interval=0.2, lease_ttl=1.0)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, agent.cancel)
    await agent
    await conductor.close()


if __name__ == "__main__":
    asyncio.run(serve())
