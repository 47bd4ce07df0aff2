"""S3-specific behaviour on a real server, continued: adaptive polling, the due index, the
request counts docs/PROTOCOL.md promises, and the client's lifecycle."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import substantial.backends.s3._due as s3due
from substantial._runs import store_run
from substantial.backends.s3 import S3Backend
from substantial.testing._support import NEVER_CLOSED
from tests.backend_s3 import S3Harness
from tests.s3_server import S3Server
from tests.test_s3_backend import entry, info, open_s3, raw_keys

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def h(s3_server: S3Server) -> AsyncIterator[S3Harness]:
    harness = S3Harness(s3_server)
    yield harness
    await harness.aclose()


# -- wake-ups --------------------------------------------------------------------------


async def poll_times(b: S3Backend) -> list[float]:
    times: list[float] = []
    client = await b._objects.open()
    client.meta.events.register(
        "before-send.s3.ListObjectsV2", lambda **_: times.append(time.monotonic())
    )
    return times


async def test_idle_polling_backs_off_from_min_to_max_poll(h: S3Harness) -> None:
    b = open_s3(h, min_poll=0.05, max_poll=0.4)
    times = await poll_times(b)
    t0 = time.monotonic()
    assert await b.wait_for_work(2.2) is False
    gaps = [b_ - a for a, b_ in zip([t0, *times], times, strict=False)]
    # 0.05, 0.1, 0.2, 0.4, 0.4, ...: doubling, capped at max_poll. Each gap also holds
    # one LIST round trip, which a loaded machine can stretch: bound it, don't pin it.
    slack = 0.15
    assert 5 <= len(times) <= 9, gaps
    for gap, nominal in zip(gaps, [0.05, 0.1, 0.2, 0.4], strict=False):
        assert nominal - 0.01 <= gap <= nominal + slack, gaps
    assert all(g <= 0.4 + slack for g in gaps), gaps
    assert b._due.poll_interval == 0.4


async def test_a_poll_finds_work_made_due_by_another_process(h: S3Harness) -> None:
    b = open_s3(h, min_poll=0.05, max_poll=0.4)
    await b.due(time.time())
    await b.wait_for_work(1.0)  # idle: the interval has grown to max_poll
    assert b._due.poll_interval == 0.4
    times = await poll_times(b)
    waiter = asyncio.create_task(b.wait_for_work(20))
    code = (
        "import asyncio, sys\n"
        "from substantial.backends import from_url\n"
        "async def main():\n"
        "    b = from_url(sys.argv[1])\n"
        "    await b.send_event('r', 'e1', b'1')\n"
        "    await b.close()\n"
        "asyncio.run(main())\n"
    )
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, h.url, cwd=ROOT)
    assert await proc.wait() == 0
    sent = time.monotonic()
    assert await asyncio.wait_for(waiter, 5) is True
    # The first poll after the send finds the work, and it comes within max_poll (plus the
    # loop's lateness); how long the server takes to answer it is not the poller's to bound.
    after = [t - sent for t in times if t >= sent]
    assert len(after) <= 1, after
    assert not after or after[0] < 0.4 + 0.15, after
    assert b._due.poll_interval == b.min_poll  # work arrived: poll fast again
    assert await b.due(time.time()) == [("r", pytest.approx(time.time(), abs=30))]


async def test_a_poll_does_not_report_due_runs_already_seen(h: S3Harness) -> None:
    b = open_s3(h, min_poll=0.05, max_poll=0.2)
    other = open_s3(h)
    await other.schedule("held-elsewhere", time.time() - 5)
    assert await b.wait_for_work(0.01) is True  # the in-process wake-up, kept for b
    assert [r for r, _ in await b.due(time.time())] == ["held-elsewhere"]
    times = await poll_times(b)
    # The run stays due (another worker holds it): no news, so no spinning.
    assert await b.wait_for_work(0.8) is False
    assert len(times) <= 7


async def test_a_cancel_is_never_lost_while_waiting(h: S3Harness) -> None:
    b = open_s3(h)
    task = asyncio.create_task(b.wait_for_work(10))
    await asyncio.sleep(0.05)
    # A wake-up and a cancel in the same loop iteration: on Python 3.11,
    # asyncio.wait_for (inside Waker.wait) returns the wake-up and drops the cancel.
    b.waker.notify()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_poll_wakes_when_a_future_run_comes_due(h: S3Harness) -> None:
    b = open_s3(h, min_poll=0.05, max_poll=5.0)
    other = open_s3(h)
    await b.due(time.time())
    await other.schedule("soon", time.time() + 0.6)
    b._due.due_hint = None  # as if scheduled by another process
    b._due.poll_interval = 5.0  # idle for long: only the timer can wake it in time
    t0 = time.monotonic()
    assert await b._due.peek() is False  # sees the future key and keeps it as a timer
    assert await b.wait_for_work(10) is True
    assert time.monotonic() - t0 < 1.5


# -- the due index ---------------------------------------------------------------------


async def test_next_due_at_after_due_sees_schedules_made_in_between(h: S3Harness) -> None:
    b, other = open_s3(h), open_s3(h)
    now = time.time()
    await other.schedule("later", now + 100)
    assert await b.due(now) == []
    assert await b.next_due_at() == pytest.approx(now + 100)  # the future key, checked
    assert await b.due(now) == []
    await other.schedule("sooner", now + 50)  # this process: forgets the cached listing
    assert await b.next_due_at() == pytest.approx(now + 50)
    assert await b.due(now) == []
    await other.unschedule("sooner")
    assert await b.next_due_at() == pytest.approx(now + 100)
    await other.unschedule("later")
    assert await b.due(now) == []
    assert await b.next_due_at() is None


async def test_concurrent_reschedules_leave_one_live_due_key(h: S3Harness) -> None:
    clients = [open_s3(h) for _ in range(4)]
    now = time.time()
    times = [now - 100 + i for i in range(12)]
    await asyncio.gather(*(clients[i % 4].schedule("r", t) for i, t in enumerate(times)))
    (due,) = await clients[0].due(time.time())
    assert due[0] == "r" and due[1] in times
    assert len([k for k in raw_keys(h) if k.startswith("due/")]) == 1


async def test_orphan_due_keys_are_skipped_then_collected(
    h: S3Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = open_s3(h)
    await b.schedule("live", time.time() - 2)
    # What a crash between "put the new key" and "move the pointer" leaves behind.
    ghost = f"due/{int((time.time() - 1) * 1e6):017d}!ghost!0123456789abcdef"
    client = h.server.client()
    try:
        client.put_object(Bucket=h.server.bucket, Key=f"{h.prefix}/{ghost}", Body=b"")
    finally:
        client.close()
    assert [r for r, _ in await b.due(time.time())] == ["live"]
    assert ghost in raw_keys(h)  # young: perhaps a schedule still under way
    monkeypatch.setattr(s3due, "ORPHAN_GRACE", -1.0)
    assert [r for r, _ in await b.due(time.time())] == ["live"]
    assert ghost not in raw_keys(h)


async def test_list_runs_orders_ids_like_python_on_any_server(h: S3Harness) -> None:
    b = open_s3(h)
    ids = ["r1", "r1.x", "r10", "r1+x", "r1-a", "a", "r1_z", "R2"]
    await asyncio.gather(*(b.put_run(info(i)) for i in ids))
    assert [r.run_id for r in await b.list_runs()] == sorted(ids)
    later = [i for i in sorted(ids) if i > "r1"][:3]
    assert [r.run_id for r in await b.list_runs(after="r1", limit=3)] == later


async def test_layout_is_as_documented(h: S3Harness) -> None:
    b = open_s3(h)
    await store_run(b, info("r"), entry("start"), time.time())
    await b.post_event("r", "ev", b"1")
    await b.acquire_lease("r", "me", 30)
    keys = raw_keys(h)
    due = [k for k in keys if k.startswith("due/")]
    assert len(due) == 1 and due[0].split("!")[1] == "r"
    assert sorted(k for k in keys if not k.startswith("due/")) == [
        "meta/r",
        "runs/r/due",
        "runs/r/inbox/ev",
        "runs/r/lease",
        "runs/r/log/0000000000",
    ]


# -- requests per operation (docs/PROTOCOL.md, "Requests per operation") ----------------


async def test_requests_per_operation(h: S3Harness) -> None:
    b = open_s3(h)
    await b.append("warm-up", 0, entry(0))  # connects, and checks conditional writes once

    async def cost(aw: Any) -> dict[str, int]:
        before = b.requests.copy()
        await aw
        return dict(b.requests - before)

    now = time.time()
    assert await cost(store_run(b, info("r"), entry(0), now)) == {"PutObject": 4, "GetObject": 1}
    assert await cost(b.append("r", 1, entry(1))) == {"PutObject": 1}
    assert await cost(b.send_event("r", "e2", b"2")) == {
        "PutObject": 3,
        "GetObject": 1,
        "DeleteObject": 1,
    }
    assert await cost(b.schedule("r", now + 60)) == {
        "PutObject": 2,
        "GetObject": 1,
        "DeleteObject": 1,
    }
    assert await cost(b.unschedule("r")) == {"GetObject": 1, "DeleteObject": 2}
    await b.schedule("r", now - 1)
    # A due() call lists once; a due key it has not checked yet costs one GET of its pointer.
    fresh = open_s3(h)
    await fresh.read_log("warm-up")
    before = fresh.requests.copy()
    assert [r for r, _ in await fresh.due(time.time())] == ["r"]
    assert dict(fresh.requests - before) == {"ListObjectsV2": 1, "GetObject": 1}
    # The next due time comes from the same listing (a key this process wrote or checked
    # costs no GET of its pointer).
    await b.set_due("later", now + 60)
    before = fresh.requests.copy()
    due = await fresh.due(time.time())
    assert due.next_at == pytest.approx(now + 60)
    assert dict(fresh.requests - before) == {"ListObjectsV2": 1}
    # Leases: a take reads then writes; the holder renews and gives it up with one write each.
    assert await cost(b.lease("r", "me", 30)) == {"GetObject": 1, "PutObject": 1}
    assert await cost(b.lease("r", "me", 30)) == {"PutObject": 1}
    assert await cost(b.lease("r", "me", 0)) == {"PutObject": 1}
    assert await cost(b.lease("r")) == {"GetObject": 1}
    # Reads: a LIST and one GET per object; "anything new after n?" is one GET.
    assert await cost(b.read_log("r")) == {"ListObjectsV2": 1, "GetObject": 2}
    assert await cost(b.read_log("r", 2)) == {"GetObject": 1}
    await b.send_event("r", "e3", b"3")
    assert await cost(b.read_inbox("r")) == {"ListObjectsV2": 1, "GetObject": 2}
    # Acknowledging deletes while it lists what remains, in parallel.
    acked = {"DeleteObject": 2, "ListObjectsV2": 1}
    assert await cost(b.read_inbox("r", ack=["e2", "e3"])) == acked
    assert await cost(b.put_run(info("r"))) == {"PutObject": 1}
    assert await cost(b.get_run("r")) == {"GetObject": 1}
    assert await cost(b.list_runs()) == {"ListObjectsV2": 1, "GetObject": 1}


# -- lifecycle --------------------------------------------------------------


def test_a_backend_never_closed_prints_nothing_at_exit(h: S3Harness) -> None:
    # With default warning filters aiohttp still prints "Unclosed client session" and
    # "Unclosed connector" through the loop's exception handler; the shared suite runs
    # the same script with warnings as errors on every backend.
    proc = subprocess.run(
        [sys.executable, "-c", NEVER_CLOSED, h.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "42\n", "")


# -- unscheduling a run that waits for events ------------------------------------------


async def test_a_schedule_that_loses_its_cas_to_unschedule_idle_still_takes_effect(
    h: S3Harness,
) -> None:
    # A post stores its event, then schedules; the schedule read the pointer before a
    # worker's unschedule_idle moved it (that worker saw no event yet). Giving up, as a
    # schedule that loses to another schedule does, would leave the event unscheduled.
    b = open_s3(h)
    await b.set_due("r", time.time() - 1)
    stale = await b._due.read_pointer("r")
    assert stale is not None and stale.name is not None
    assert await b.unschedule_idle("r") is True
    assert await b.due(time.time() + 3600) == []
    real = b._due.read_pointer
    reads = 0

    async def first_read_is_stale(run_id: str) -> Any:
        nonlocal reads
        reads += 1
        return stale if reads == 1 else await real(run_id)

    b._due.read_pointer = first_read_is_stale  # type: ignore[method-assign]
    await b.set_due("r", time.time() - 1)
    b._due.read_pointer = real  # type: ignore[method-assign]
    assert reads == 2  # the CAS on the stale pointer failed, and was tried again
    assert [r for r, _ in await open_s3(h).due(time.time() + 1)] == ["r"]
