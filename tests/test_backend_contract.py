"""The Backend contract, checked on every backend (the conformance suite)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from substantial.backends.base import Backend, RunInfo, make_owner
from substantial.errors import CorruptRecord, InvalidArgument, PositionTaken
from substantial.records import decode_entry, encode_entry
from tests.harness import NEVER_CLOSED, Harness

ROOT = Path(__file__).resolve().parent.parent


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str, workflow: str = "wf", status: str = "active") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, workflow, status, now, now)  # type: ignore[arg-type]


# -- the log ----------------------------------------------------------------


async def test_append_and_read(backend: Backend) -> None:
    assert await backend.read_log("r1") == []
    for i in range(5):
        await backend.append("r1", i, entry(i))
    log = await backend.read_log("r1")
    assert [decode_entry("r1", i, e)[0]["value"] for i, e in enumerate(log)] == [0, 1, 2, 3, 4]
    tail = await backend.read_log("r1", 3)
    assert [decode_entry("r1", 3 + i, e)[0]["value"] for i, e in enumerate(tail)] == [3, 4]
    assert await backend.read_log("r1", 5) == []
    assert await backend.read_log("other") == []


async def test_entry_with_many_records_is_one_position(backend: Backend) -> None:
    data = encode_entry([{"k": "timer", "c": c} for c in range(3)])
    await backend.append("r", 0, data)
    await backend.append("r", 1, entry("next"))
    log = await backend.read_log("r")
    assert len(log) == 2
    assert [r["c"] for r in decode_entry("r", 0, log[0])] == [0, 1, 2]


async def test_append_at_taken_position_raises_and_keeps_the_first(backend: Backend) -> None:
    await backend.append("r", 0, entry("first"))
    with pytest.raises(PositionTaken) as err:
        await backend.append("r", 0, entry("second"))
    assert err.value.run_id == "r" and err.value.position == 0
    assert "position 0" in str(err.value)
    (stored,) = await backend.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == "first"


async def test_large_entry_roundtrips(backend: Backend) -> None:
    big = "é" * 300_000
    await backend.append("big", 0, entry(big))
    (stored,) = await backend.read_log("big")
    assert decode_entry("big", 0, stored)[0]["value"] == big


async def test_32_concurrent_appenders_exactly_one_wins(harness: Harness) -> None:
    clients = [await harness.open() for _ in range(4)]
    await clients[0].append("race", 0, entry("base"))

    async def attempt(i: int) -> bool:
        try:
            await clients[i % len(clients)].append("race", 1, entry(f"w{i}"))
            return True
        except PositionTaken:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(32)))
    assert sum(results) == 1
    winner = results.index(True)
    log = await clients[1].read_log("race")
    assert len(log) == 2
    assert decode_entry("race", 1, log[1])[0]["value"] == f"w{winner}"


async def test_32_concurrent_processes_exactly_one_wins(shared_harness: Harness) -> None:
    harness = shared_harness
    backend = await harness.open()
    await backend.append("prace", 0, entry("base"))
    start_at = time.time() + 2.5
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.proc_helpers",
                "append-race",
                harness.url,
                "prace",
                "1",
                f"p{i}",
                str(start_at),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(32)
    ]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outputs.append(out.strip())
    assert sorted(set(outputs)) == ["lost", "won"], outputs
    assert outputs.count("won") == 1
    log = await backend.read_log("prace")
    assert len(log) == 2
    assert decode_entry("prace", 1, log[1])[0]["value"] == f"p{outputs.index('won')}"


async def test_corrupt_entry_is_reported_and_the_rest_stays_readable(
    harness: Harness, backend: Backend
) -> None:
    for i in range(4):
        await backend.append("c", i, entry(i))
    await harness.corrupt_entry("c", 2)
    log = await backend.read_log("c")
    assert len(log) == 4
    with pytest.raises(CorruptRecord) as err:
        decode_entry("c", 2, log[2])
    assert "'c'" in str(err.value) and "record 2" in str(err.value)
    assert err.value.position == 2
    assert decode_entry("c", 3, (await backend.read_log("c", 3))[0])[0]["value"] == 3
    assert decode_entry("c", 1, log[1])[0]["value"] == 1


async def test_invalid_run_id_is_rejected(backend: Backend) -> None:
    for bad in ["", "../etc", "a/b", ".hidden", "x" * 201, "spa ce"]:
        with pytest.raises(InvalidArgument, match="invalid run id"):
            await backend.append(bad, 0, entry(1))


async def test_an_append_that_would_leave_a_gap_is_refused(harness: Harness) -> None:
    backend = await harness.open()
    with pytest.raises(InvalidArgument, match="gap"):
        await backend.append("g", 1, entry(1))
    await backend.append("g", 0, entry(0))
    with pytest.raises(InvalidArgument, match="position 1 is empty"):
        await backend.append("g", 2, entry(2))
    # A client that never read the log judges by what is stored, not by what it saw.
    fresh = await harness.open()
    await fresh.append("g", 1, entry(1))
    with pytest.raises(InvalidArgument, match="gap"):
        await fresh.append("g", 3, entry(3))
    with pytest.raises(PositionTaken):
        await backend.append("g", 1, entry("again"))
    log = await backend.read_log("g")
    assert [decode_entry("g", i, e)[0]["value"] for i, e in enumerate(log)] == [0, 1]


async def test_positions_must_be_whole_numbers_from_zero(backend: Backend) -> None:
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(InvalidArgument, match="whole number"):
            await backend.append("n", bad, entry(0))  # type: ignore[arg-type]
        with pytest.raises(InvalidArgument, match="whole number"):
            await backend.read_log("n", bad)  # type: ignore[arg-type]
    assert await backend.read_log("n") == []


async def test_every_operation_refuses_an_invalid_run_id(backend: Backend) -> None:
    bad = "../escape"
    calls = [
        backend.append(bad, 0, entry(0)),
        backend.read_log(bad),
        backend.post_event(bad, "e", b"1"),
        backend.read_inbox(bad),
        backend.ack_events(bad, ["e"]),
        backend.schedule(bad, time.time()),
        backend.unschedule(bad),
        backend.acquire_lease(bad, "me", 30),
        backend.release_lease(bad, "me"),
        backend.get_lease(bad),
        backend.put_run(info(bad)),
        backend.get_run(bad),
    ]
    for call in calls:
        with pytest.raises(InvalidArgument, match="invalid run id"):
            await call


async def test_unknown_runs_read_as_empty_and_cleanup_of_them_is_a_no_op(
    backend: Backend,
) -> None:
    assert await backend.read_log("ghost") == []
    assert await backend.read_log("ghost", 7) == []
    assert await backend.read_inbox("ghost") == []
    assert await backend.get_run("ghost") is None
    assert await backend.get_lease("ghost") is None
    await backend.ack_events("ghost", ["e1"])
    await backend.unschedule("ghost")
    await backend.release_lease("ghost", "me")
    assert await backend.list_runs() == []
    assert await backend.due(time.time() + 3600) == []
    assert await backend.next_due_at() is None


async def test_schedule_refuses_a_time_that_is_not_a_finite_number(backend: Backend) -> None:
    for bad in (float("nan"), float("inf"), -float("inf"), "soon", None):
        with pytest.raises(InvalidArgument, match="finite number"):
            await backend.schedule("t", bad)  # type: ignore[arg-type]
    assert await backend.next_due_at() is None


async def test_due_with_no_room_returns_nothing(backend: Backend) -> None:
    await backend.schedule("d", time.time() - 1)
    assert await backend.due(time.time(), limit=0) == []
    assert await backend.due(time.time(), limit=-1) == []
    assert [r for r, _ in await backend.due(time.time(), limit=1)] == ["d"]


# -- the inbox --------------------------------------------------------------


async def test_inbox_is_idempotent_and_ordered(backend: Backend) -> None:
    assert await backend.read_inbox("r") == []
    assert await backend.post_event("r", "e1", b'{"n":1}') is True
    assert await backend.post_event("r", "e2", b'{"n":2}') is True
    assert await backend.post_event("r", "e1", b'{"n":"dup"}') is False
    assert await backend.post_event("r", "e3", b'{"n":3}') is True
    events = await backend.read_inbox("r")
    assert [e.event_id for e in events] == ["e1", "e2", "e3"]
    assert events[0].data == b'{"n":1}'
    assert await backend.read_inbox("other") == []
    await backend.ack_events("r", ["e2", "nope"])
    assert [e.event_id for e in await backend.read_inbox("r")] == ["e1", "e3"]


async def test_inbox_keeps_send_order_of_one_sender(backend: Backend) -> None:
    for i in range(50):
        await backend.post_event("order", f"ev{i:03d}-{os.urandom(2).hex()}", str(i).encode())
    events = await backend.read_inbox("order")
    assert [int(e.data) for e in events] == list(range(50))


async def test_concurrent_posts_of_one_id_store_it_once(harness: Harness) -> None:
    clients = [await harness.open() for _ in range(4)]
    results = await asyncio.gather(
        *(clients[i % 4].post_event("r", "same", str(i).encode()) for i in range(32))
    )
    assert sum(results) == 1
    events = await clients[0].read_inbox("r")
    assert len(events) == 1 and events[0].data == str(results.index(True)).encode()


async def test_concurrent_posts_of_distinct_ids_are_all_kept(harness: Harness) -> None:
    clients = [await harness.open() for _ in range(4)]
    await asyncio.gather(*(clients[i % 4].post_event("r", f"e{i}", b"1") for i in range(32)))
    assert len(await clients[0].read_inbox("r")) == 32


async def test_invalid_event_id_is_rejected(backend: Backend) -> None:
    with pytest.raises(InvalidArgument, match="invalid event id"):
        await backend.post_event("r", "a/b", b"1")


async def test_ack_ignores_ids_not_in_the_inbox_and_malformed_ones(backend: Backend) -> None:
    await backend.post_event("r", "e1", b"1")
    await backend.post_event("r", "e2", b"2")
    await backend.ack_events("r", ["e1", "e1", "missing", "../e2", "", "a b", 5, None])  # type: ignore[list-item]
    assert [e.event_id for e in await backend.read_inbox("r")] == ["e2"]
    await backend.ack_events("r", [])
    assert [e.event_id for e in await backend.read_inbox("r")] == ["e2"]


async def test_an_acknowledged_event_id_can_be_posted_again(backend: Backend) -> None:
    # Deduplication after consumption is the log's job (recorded ids), not the inbox's.
    assert await backend.post_event("r", "once", b"1") is True
    await backend.ack_events("r", ["once"])
    assert await backend.post_event("r", "once", b"2") is True
    (event,) = await backend.read_inbox("r")
    assert event.data == b"2"


# -- the due index ----------------------------------------------------------


async def test_due_index_orders_by_time(backend: Backend) -> None:
    now = time.time()
    assert await backend.due(now) == []
    assert await backend.next_due_at() is None
    await backend.schedule("late", now - 1)
    await backend.schedule("early", now - 30)
    await backend.schedule("future", now + 3600)
    await backend.schedule("mid", now - 10)
    due = await backend.due(now)
    assert [r for r, _ in due] == ["early", "mid", "late"]
    assert due[0][1] == pytest.approx(now - 30, abs=0.01)
    assert [r for r, _ in await backend.due(now, limit=2)] == ["early", "mid"]
    assert await backend.next_due_at() == pytest.approx(now - 30, abs=0.01)


async def test_reschedule_replaces_and_unschedule_removes(backend: Backend) -> None:
    now = time.time()
    await backend.schedule("a", now - 5)
    await backend.schedule("b", now - 4)
    await backend.schedule("a", now + 100)
    assert [r for r, _ in await backend.due(now)] == ["b"]
    await backend.schedule("a", now - 10)
    assert [r for r, _ in await backend.due(now)] == ["a", "b"]
    await backend.unschedule("a")
    await backend.unschedule("never-scheduled")
    assert [r for r, _ in await backend.due(now)] == ["b"]
    await backend.unschedule("b")
    assert await backend.due(now + 1000) == []
    assert await backend.next_due_at() is None


async def test_due_index_at_scale_answers_only_due(backend: Backend) -> None:
    now = time.time()
    await asyncio.gather(*(backend.schedule(f"w{i}", now + 3600 + i) for i in range(300)))
    await backend.schedule("ready", now - 1)
    assert [r for r, _ in await backend.due(now)] == ["ready"]


# -- leases -----------------------------------------------------------------


async def test_lease_take_renew_release(backend: Backend) -> None:
    assert await backend.get_lease("r") is None
    assert await backend.acquire_lease("r", "alice", 30)
    assert not await backend.acquire_lease("r", "bob", 30)
    lease = await backend.get_lease("r")
    assert lease is not None and lease.owner == "alice"
    assert lease.expires_at == pytest.approx(time.time() + 30, abs=2)
    assert await backend.acquire_lease("r", "alice", 60)  # renewal
    lease = await backend.get_lease("r")
    assert lease is not None and lease.expires_at == pytest.approx(time.time() + 60, abs=2)
    await backend.release_lease("r", "bob")  # not bob's: no effect
    assert not await backend.acquire_lease("r", "bob", 30)
    await backend.release_lease("r", "alice")
    assert await backend.acquire_lease("r", "bob", 30)


async def test_lease_expires(backend: Backend) -> None:
    # Long enough that a slow store's round trip cannot outlast it, short enough to wait out.
    assert await backend.acquire_lease("r", "alice", 1.0)
    assert not await backend.acquire_lease("r", "bob", 10)
    await asyncio.sleep(1.2)
    assert await backend.acquire_lease("r", "bob", 10)
    assert not await backend.acquire_lease("r", "alice", 10)


async def test_lease_steal_only_from_named_owner(backend: Backend) -> None:
    assert await backend.acquire_lease("r", "alice", 30)
    assert not await backend.acquire_lease("r", "bob", 30, steal_from="carol")
    assert await backend.acquire_lease("r", "bob", 30, steal_from="alice")
    lease = await backend.get_lease("r")
    assert lease is not None and lease.owner == "bob"


async def test_concurrent_lease_takers_exactly_one_wins(harness: Harness) -> None:
    clients = [await harness.open() for _ in range(4)]
    results = await asyncio.gather(
        *(clients[i % 4].acquire_lease("hot", f"w{i}", 30) for i in range(32))
    )
    assert sum(results) == 1
    lease = await clients[0].get_lease("hot")
    assert lease is not None and lease.owner == f"w{results.index(True)}"


async def test_lease_of_a_dead_process_on_this_host_is_taken_over(backend: Backend) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from substantial.backends.base import make_owner; print(make_owner())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    dead_owner = proc.stdout.strip()
    assert await backend.acquire_lease("r", dead_owner, 3600)
    me = make_owner()
    assert not await backend.acquire_lease("r", me, 30)
    assert await backend.try_lease("r", me, 30)
    # A live owner on this host is never taken over.
    assert not await backend.try_lease("r", make_owner(), 30)


# -- run metadata -----------------------------------------------------------


async def test_run_metadata(backend: Backend) -> None:
    assert await backend.get_run("r1") is None
    a = info("r1", "alpha")
    await backend.put_run(a)
    assert await backend.get_run("r1") == a
    done = a.with_status("completed")
    await backend.put_run(done)
    assert (await backend.get_run("r1")) == done
    await backend.put_run(info("r2", "beta"))
    await backend.put_run(info("r3", "alpha"))
    assert [r.run_id for r in await backend.list_runs()] == ["r1", "r2", "r3"]
    assert [r.run_id for r in await backend.list_runs(workflow="alpha")] == ["r1", "r3"]
    assert [r.run_id for r in await backend.list_runs(status="active")] == ["r2", "r3"]
    assert [r.run_id for r in await backend.list_runs(limit=2)] == ["r1", "r2"]
    assert [r.run_id for r in await backend.list_runs(after="r1")] == ["r2", "r3"]


async def test_create_run_is_idempotent(backend: Backend) -> None:
    first = info("once")
    assert await backend.create_run(first, entry("start"), time.time()) is True
    assert await backend.create_run(info("once"), entry("again"), time.time()) is False
    (stored,) = await backend.read_log("once")
    assert decode_entry("once", 0, stored)[0]["value"] == "start"
    assert await backend.get_run("once") == first
    assert [r for r, _ in await backend.due(time.time())] == ["once"]


async def test_create_run_completes_a_half_done_start(backend: Backend) -> None:
    await backend.append("half", 0, entry("start"))  # crashed before metadata
    assert await backend.create_run(info("half"), entry("start"), time.time()) is False
    assert await backend.get_run("half") is not None
    assert [r for r, _ in await backend.due(time.time())] == ["half"]


# -- wake-ups ---------------------------------------------------------------


async def test_scheduling_now_wakes_a_waiting_client(harness: Harness) -> None:
    waiter = await harness.open()
    sender = await harness.open()
    await waiter.due(time.time())  # start any listener the backend uses
    await asyncio.sleep(0.05)
    task = asyncio.create_task(waiter.wait_for_work(10))
    await asyncio.sleep(0.1)
    t0 = time.perf_counter()
    await sender.send_event("w", "e", b"1")
    assert await asyncio.wait_for(task, 5) is True
    assert time.perf_counter() - t0 < 1.0


async def test_wait_times_out_when_nothing_happens(backend: Backend) -> None:
    t0 = time.perf_counter()
    assert await backend.wait_for_work(0.2) is False
    assert 0.15 < time.perf_counter() - t0 < 2


# -- crash safety -----------------------------------------------------------


async def test_kill_9_mid_append_never_leaves_a_half_entry(shared_harness: Harness) -> None:
    harness = shared_harness
    backend = await harness.open()
    for round_ in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.proc_helpers", "append-forever", harness.url, "k9"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        await asyncio.sleep(0.15 + 0.07 * round_)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()  # reap it and close its pipes
        log = await backend.read_log("k9")
        for position, data in enumerate(log):
            (record,) = decode_entry("k9", position, data)
            assert record["name"] == str(position)
            assert len(record["value"]) == 200_000
    assert len(await backend.read_log("k9")) > 4


# -- lifecycle --------------------------------------------------------------


def test_a_backend_never_closed_leaves_no_warning_at_exit(harness: Harness) -> None:
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", NEVER_CLOSED, harness.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "42\n", "")
