"""Outages: a store that refuses writes or stops answering never crashes a worker.

A full disk on the directory backend (ENOSPC injected at the OS write call
of one run's log) makes that run wait with backoff, its step not run again,
while the worker serves other runs; when space returns the run completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from substantial import BackendUnavailable, Conductor, Context, ResultTimeout, workflow
from substantial.backends import Backend, from_url
from substantial.backends.fs import FSBackend
from substantial.backends.redis import RedisBackend
from substantial.backends.s3 import S3Backend
from tests.backend_redis import start_server
from tests.harness import Harness

#: Side effects of steps, counted outside the engine.
LEDGER: Counter[str] = Counter()


def effect(tag: str) -> str:
    LEDGER[tag] += 1
    return tag


@workflow()
async def one_step(c: Context, tag: str) -> str:
    return await c.save(lambda: effect(tag), name="effect")


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_a_full_disk_backs_off_without_rerunning_the_step_and_others_go_on(
    fs_harness: Harness, monkeypatch: Any
) -> None:
    LEDGER.clear()
    backend = await fs_harness.open()
    assert isinstance(backend, FSBackend)
    conductor = Conductor(backend)
    conductor.register(one_step)
    run = await conductor.start(one_step, {"tag": "full"}, run_id="full")
    log_file = str(backend.segment_path("full"))
    refused: list[float] = []
    disk_full = True
    real_open = os.open

    def open_on_a_full_disk(
        path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        # Every write to this run's log fails as on a full file system.
        if disk_full and str(path) == log_file and flags & (os.O_WRONLY | os.O_RDWR):
            refused.append(time.monotonic())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_on_a_full_disk)
    agent = conductor.run(poll_interval=0.2, lease_ttl=2.0)
    try:
        await wait_for(lambda: refused)
        started = time.monotonic()
        # The worker serves other runs meanwhile.
        other = await conductor.start(one_step, {"tag": "other"})
        assert await other.result(timeout=30) == "other"
        window = 4.0
        await asyncio.sleep(max(0.0, started + window - time.monotonic()))
        # Over the window: the step ran once (its result waits in memory for the disk),
        # and the write was retried with growing pauses, not in a loop.
        assert LEDGER["full"] == 1
        in_window = [t for t in refused if t >= started]
        assert 2 <= len(in_window) <= 10, len(in_window)
        gaps = [b - a for a, b in itertools.pairwise(in_window)]
        assert max(gaps) > 0.5, gaps
        print(
            f"full disk: the step ran {LEDGER['full']} time(s), its write was tried "
            f"{len(in_window)} times in {window:.0f} s (longest pause {max(gaps):.1f} s), "
            "another run completed meanwhile"
        )
        assert not agent.done()
        disk_full = False
        assert await run.result(timeout=30) == "full"
        assert LEDGER["full"] == 1
    finally:
        agent.cancel()
        await agent


# -- a networked store frozen (SIGSTOP) or stopped, then back -------------------------------


def open_quick(harness: Harness) -> Backend:
    """Open the harness's store with short client timeouts (the defaults are documented)."""
    if harness.name == "redis":
        return RedisBackend.from_url(
            harness.url, socket_timeout=0.5, connect_timeout=0.5, retries=1
        )
    if harness.name == "postgres":
        return from_url(f"{harness.url}&connect_timeout=1&command_timeout=1")
    server: Any = harness.server  # type: ignore[attr-defined]
    return S3Backend(
        server.bucket,
        harness.prefix,  # type: ignore[attr-defined]
        endpoint_url=server.endpoint,
        region=server.region,
        path_style=True,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        min_poll=0.02,
        max_poll=0.2,
        read_timeout=1.0,
        connect_timeout=1.0,
        max_attempts=1,
    )


#: How long a client call may take against a frozen store with those settings.
BOUND = 3.0


def server_pids(harness: Harness) -> list[int]:
    """The processes of the server behind ``harness`` (all of them: Postgres forks)."""
    server: Any = harness.server  # type: ignore[attr-defined]
    if harness.name == "postgres":
        main = int((server.data / "postmaster.pid").read_text().split()[0])
        pids = [main]
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat", "rb") as f:
                        stat = f.read()
                except OSError:
                    continue
                if int(stat[stat.rfind(b")") + 2 :].split()[1]) == main:
                    pids.append(int(entry))
        return pids
    assert server.proc is not None
    if harness.name == "s3":
        group = os.getpgid(server.proc.pid)
        return [int(p) for p in os.listdir("/proc") if p.isdigit() and _pgid(int(p)) == group]
    return [server.proc.pid]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


@contextlib.contextmanager
def frozen(harness: Harness) -> Iterator[None]:
    pids = server_pids(harness)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


@workflow()
async def waits_then_steps(c: Context, tag: str) -> str:
    value = await c.receive("go")
    return await c.save(lambda: effect(f"{tag}:{value}"), name="effect")


@pytest.fixture(params=["redis", "postgres", "s3"])
def networked(request: pytest.FixtureRequest) -> Harness:
    return request.getfixturevalue(f"{request.param}_harness")


async def test_a_frozen_store_fails_calls_in_bounded_time_and_runs_resume_after(
    networked: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    LEDGER.clear()
    backend = open_quick(networked)
    conductor = Conductor(backend)
    conductor.register(waits_then_steps)
    agent = conductor.run(poll_interval=0.2)
    patient = Conductor(await networked.open())
    try:
        run = await conductor.start(waits_then_steps, {"tag": networked.name})
        await wait_for_idle(agent, run.run_id)
        caplog.clear()
        with frozen(networked):
            for name, call in [
                ("get_run", lambda: backend.get_run(run.run_id)),
                ("send", lambda: run.send("go", 1, event_id="during")),
                ("result", lambda: run.result(timeout=1.0)),
            ]:
                started = time.monotonic()
                with pytest.raises((BackendUnavailable, ResultTimeout)) as err:
                    await call()
                took = time.monotonic() - started
                what = type(err.value).__name__
                print(f"{networked.name} frozen: {name} raised {what} in {took:.2f}s")
                assert took < BOUND, (name, took)
            # With the default (long) client timeouts, a client's own timeout still holds.
            started = time.monotonic()
            with pytest.raises(ResultTimeout):
                await patient.get(run.run_id).result(timeout=0.5)
            assert time.monotonic() - started < 1.5
            window = time.monotonic()
            await asyncio.sleep(2.0)  # the worker meets the outage
            assert not agent.done()
        storm = [r for r in caplog.records if r.created >= window and r.levelno >= logging.WARNING]
        print(f"{networked.name}: {len(storm)} warnings in the 2 s the store was frozen")
        assert len(storm) <= 4, [r.getMessage() for r in storm]
        # The server may take a moment to serve again (SeaweedFS's parts reconnect): a client
        # retries its send, which is safe with a fixed event id.
        await send_when_back(run, "go", 7, "after")
        assert await run.result(timeout=30) == f"{networked.name}:7"
        assert LEDGER[f"{networked.name}:7"] == 1
    finally:
        agent.cancel()
        await agent
        await conductor.close()
        await patient.close()


async def send_when_back(run: Any, name: str, value: Any, event_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await run.send(name, value, event_id=event_id)
            return
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def wait_for_idle(agent: Any, run_id: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        live = agent.worker.runs.get(run_id)
        if live is not None and live.driver is not None and live.driver.idle:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"run {run_id} never waited")
        await asyncio.sleep(0.01)


async def test_a_stopped_redis_is_waited_out_and_runs_resume_on_restart(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    LEDGER.clear()
    server = start_server(tmp_path / "redis")
    backend = RedisBackend.from_url(
        f"{server.url}?prefix=stopped", socket_timeout=0.5, connect_timeout=0.5, retries=1
    )
    conductor = Conductor(backend)
    conductor.register(waits_then_steps)
    agent = conductor.run(poll_interval=0.2)
    try:
        run = await conductor.start(waits_then_steps, {"tag": "stopped"})
        await wait_for_idle(agent, run.run_id)
        server.stop()
        started = time.monotonic()
        with pytest.raises(BackendUnavailable):
            await run.send("go", 1, event_id="while-down")
        assert time.monotonic() - started < BOUND
        caplog.clear()
        await asyncio.sleep(2.0)  # the worker meets the outage
        assert not agent.done()
        assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) <= 4
        server.start()
        await send_when_back(run, "go", 3, "after")
        assert await run.result(timeout=30) == "stopped:3"
        assert LEDGER["stopped:3"] == 1
    finally:
        agent.cancel()
        await agent
        await conductor.close()
        server.stop()
