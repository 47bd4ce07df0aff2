"""Queues: concurrency, per-key limits, rate limits, priority, dedup, debounce and delay,
held across worker processes (one of them SIGKILLed) on every backend."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from substantial import (
    Conductor,
    InvalidArgument,
    Queue,
    RunCancelled,
    RunConflict,
    Workflow,
)
from substantial._queue_flow import MESSAGE
from substantial._ticks import tick_stamp
from substantial.backends.memory import MemoryBackend
from substantial.records import decode_entry, encode_value
from tests.flow_workflows import PERIOD, bad_children, fan_out, held, leave_early, ticked
from tests.harness import Harness
from tests.test_schedules import _count, halt, spawn, tick_runs, wait_until


def ledger(trace: Path) -> list[tuple[str, int, str, float, float]]:
    """(run id, n, key, began, ended) of every execution of ``held`` that finished."""
    rows = []
    for line in trace.read_text().splitlines() if trace.exists() else ():
        if len(line.split()) == 6:  # not a line of ``ticked``
            run_id, n, key, began, ended, _pid = line.split()
            rows.append((run_id, int(n), key, float(began), float(ended)))
    return rows


def per_run(rows: list[tuple[str, int, str, float, float]]) -> list[tuple[str, float, float]]:
    """One interval per run, from its first execution's start to its last one's end.

    A step may run twice (a worker that lost its lease to a slow store runs on until its
    write is refused): that is still one run, holding one slot from admit to end.
    """
    spans: dict[str, tuple[float, float]] = {}
    for run_id, _n, _key, began, ended in rows:
        first, last = spans.get(run_id, (began, ended))
        spans[run_id] = (min(first, began), max(last, ended))
    return [(run_id, a, b) for run_id, (a, b) in spans.items()]


def most_at_once(rows: list[tuple[Any, ...]]) -> int:
    """The largest number of intervals (the last two fields of each row) open at one instant."""
    marks = sorted([(r[-2], 1) for r in rows] + [(r[-1], -1) for r in rows])
    best = now = 0
    for _t, delta in marks:
        now += delta
        best = max(best, now)
    return best


async def admitted_at(conductor: Conductor, run_id: str) -> float:
    """When the queue admitted a run: the time of the admit record at position 1."""
    entry = (await conductor.backend.read_log(run_id, 1))[0]
    (record,) = decode_entry(run_id, 1, entry)
    assert record["k"] == "admit"
    return float(record["t"])


async def slot(conductor: Conductor, run_id: str) -> tuple[float, float]:
    """When a queued run held its slot: from its admit record to its end record."""
    log = await conductor.backend.read_log(run_id)
    records = [r for p, e in enumerate(log) for r in decode_entry(run_id, p, e)]
    assert records[1]["k"] == "admit" and records[-1]["k"] == "end"
    return float(records[1]["t"]), float(records[-1]["t"])


def in_memory(*queues: Queue, wf: Workflow[Any] = held) -> Conductor:
    conductor = Conductor(MemoryBackend(), queues=list(queues))
    conductor.register(wf)
    return conductor


# -- one process ---------------------------------------------------------------------


async def test_priority_first_then_fifo_within_a_priority(tmp_path: Path, monkeypatch: Any) -> None:
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SUBSTANTIAL_TEST_TRACE", str(trace))
    conductor = in_memory(Queue("one", concurrency=1))
    agent = conductor.run()
    try:
        # The slot is busy while the others arrive: then they are all waiting at once.
        blocker = await conductor.start(held, {"n": 99, "pause": 0.3}, queue="one")
        await wait_until(lambda: _running(conductor, blocker.run_id))
        priorities = [0, 2, 1, 2, 0, 1, 2, 0]
        runs = [
            await conductor.start(held, {"n": i, "pause": 0.0}, queue="one", priority=p)
            for i, p in enumerate(priorities)
        ]
        await asyncio.gather(*(r.result(timeout=20) for r in [blocker, *runs]))
    finally:
        agent.cancel()
        await agent
    order = [n for _r, n, *_ in sorted(ledger(trace), key=lambda row: row[3])]
    assert order == [99, 1, 3, 6, 2, 5, 0, 4, 7]
    admits = [await admitted_at(conductor, r.run_id) for r in runs]
    assert [n for _t, n in sorted(zip(admits, range(8), strict=True))] == order[1:]


async def test_a_backlog_is_admitted_in_priority_order(tmp_path: Path, monkeypatch: Any) -> None:
    """Runs queued while no worker runs reach the queue in one delivery: one turn ranks them."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SUBSTANTIAL_TEST_TRACE", str(trace))
    conductor = in_memory(Queue("two", concurrency=2))
    priorities = [0, 1, 3, 2, 3, 0, 1, 2, 0, 3]
    runs = [
        await conductor.start(held, {"n": i, "pause": 0.0}, queue="two", priority=p)
        for i, p in enumerate(priorities)
    ]
    agent = conductor.run()
    try:
        await asyncio.gather(*(r.result(timeout=20) for r in runs))
    finally:
        agent.cancel()
        await agent
    admits = [await admitted_at(conductor, r.run_id) for r in runs]
    ranked = sorted(range(len(runs)), key=lambda i: (-priorities[i], i))
    assert [admits[i] for i in ranked] == sorted(admits), "admitted out of priority order"
    assert admits[ranked[0]] == admits[ranked[1]] < admits[ranked[2]], "two at once, then more"


async def test_dedup_debounce_and_delay(tmp_path: Path, monkeypatch: Any) -> None:
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SUBSTANTIAL_TEST_TRACE", str(trace))
    conductor = in_memory(Queue("q", concurrency=4))
    agent = conductor.run()
    try:
        first = await conductor.start(held, {"n": 1}, queue="q", dedup_id="order-7")
        again = await conductor.start(held, {"n": 2}, queue="q", dedup_id="order-7")
        assert again.run_id == first.run_id == "dedup:q:order-7"
        assert await again.result(timeout=10) == 1
        later = await conductor.start(held, {"n": 3}, queue="q", dedup_id="order-7")
        assert await later.result(timeout=10) == 1, "a dedup id names one run"

        t0 = time.time()
        burst = []
        for i in range(5):
            burst.append(
                await conductor.start(
                    held, {"n": 10 + i, "key": "k"}, queue="q", key="k", debounce=0.3
                )
            )
        assert [await r.result(timeout=10) for r in burst] == [14] * 5
        assert {(await r.status()).status for r in burst[:-1]} == {"continued"}
        assert await admitted_at(conductor, burst[-1].run_id) >= t0 + 0.3
        other_key = await conductor.start(held, {"n": 20}, queue="q", key="j", debounce=0.05)
        assert await other_key.result(timeout=10) == 20

        t1 = time.time()
        delayed = await conductor.start(held, {"n": 30}, queue="q", delay=timedelta(seconds=0.4))
        assert await delayed.result(timeout=10) == 30
        assert await admitted_at(conductor, delayed.run_id) >= t1 + 0.4
    finally:
        agent.cancel()
        await agent
    ran = sorted(n for _r, n, *_ in ledger(trace))
    assert ran == [1, 14, 20, 30], "collapsed or deduplicated starts must not run"


async def test_a_run_cancelled_while_it_waits_ends_without_taking_a_slot(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("SUBSTANTIAL_TEST_TRACE", str(tmp_path / "trace.txt"))
    conductor = in_memory(Queue("q", concurrency=1))
    waiting = await conductor.start(held, {"n": 1}, queue="q")
    await waiting.cancel()
    behind = await conductor.start(held, {"n": 2}, queue="q")
    agent = conductor.run()
    try:
        with pytest.raises(RunCancelled):
            await waiting.result(timeout=10)
        assert await behind.result(timeout=10) == 2
        await wait_until(lambda: _settled(conductor, "q"))
    finally:
        agent.cancel()
        await agent
    log = await conductor.backend.read_log(waiting.run_id)
    kinds = [r["k"] for p, e in enumerate(log) for r in decode_entry(waiting.run_id, p, e)]
    assert kinds == ["start", "end"], "a run cancelled in the queue never ran"


async def test_children_started_through_a_queue_obey_its_limits(
    tmp_path: Path, monkeypatch: Any
) -> None:
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("SUBSTANTIAL_TEST_TRACE", str(trace))
    conductor = in_memory(Queue("kids", concurrency=2), Queue("one", concurrency=1))
    for wf in (fan_out, leave_early, bad_children):
        conductor.register(wf)
    agent = conductor.run()
    try:
        parent = await conductor.start(fan_out, {"n": 8, "queue": "kids"})
        assert await parent.result(timeout=30) == list(range(8))
        early = await conductor.start(leave_early, {"queue": "one"})
        children = await early.result(timeout=30)
        for child in children:  # ended with their parent, waiting or running
            with pytest.raises(RunCancelled):
                await conductor.get(child).result(timeout=30)
        await wait_until(lambda: _settled(conductor, "one"))  # and gave their slots back
        refused = await (await conductor.start(bad_children)).result(timeout=30)
    finally:
        agent.cancel()
        await agent
    rows = [r for r in ledger(trace) if r[2] == "child"]
    assert sorted(r[1] for r in rows) == list(range(8))
    assert most_at_once(per_run(rows)) == 2, "children through concurrency=2 must run two at a time"
    kids = [r.run_id for r in await conductor.list(parent=parent.run_id)]
    assert len(kids) == 8 and all([await admitted_at(conductor, k) for k in kids])
    assert refused[0].startswith("InvalidArgument: start_child(key=..., priority=...) needs")
    assert "ChildFailed" in refused[1] and "no queue named 'nowhere': declare it" in refused[1]
    assert refused[2].startswith("InvalidArgument: invalid queue name 'a/b'")


async def test_an_idle_queue_sent_a_done_twice_goes_back_to_costing_nothing() -> None:
    """A ``done`` posted again (a worker finishing an ended run anew) is acknowledged."""
    conductor = in_memory(Queue("q", concurrency=1))
    agent = conductor.run(idle_timeout=0.1)
    backend, queue_id = conductor.backend, "queue:q"
    try:
        run = await conductor.start(held, {"n": 1, "pause": 0.0}, queue="q")
        await run.result(timeout=10)

        async def delivered() -> bool:  # the first ``done`` is in the queue's log, and acked
            log = await backend.read_log(queue_id)
            ids = {r.get("id") for p, e in enumerate(log) for r in decode_entry(queue_id, p, e)}
            return f"done.{run.run_id}" in ids and not await backend.read_inbox(queue_id)

        await wait_until(delivered)
        body = encode_value({"name": MESSAGE, "value": {"op": "done", "run_id": run.run_id}})
        assert await backend.send_event(queue_id, f"done.{run.run_id}", body)

        async def quiet() -> bool:
            due = [r for r, _at in await backend.due(time.time() + 3600, 1000)]
            return not await backend.read_inbox(queue_id) and queue_id not in due

        await wait_until(quiet)  # not loaded again and again, every idle_timeout
    finally:
        agent.cancel()
        await agent


async def _running(conductor: Conductor, run_id: str) -> bool:
    return len(await conductor.backend.read_log(run_id)) > 1


async def _settled(conductor: Conductor, name: str) -> bool:
    (info,) = [q for q in await conductor.list_queues() if q.name == name]
    return info.waiting == 0 and info.running == 0


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Queue("q", concurrency=0), "concurrency=...\\) takes a whole number >= 1"),
        (lambda: Queue("q", rate_limit=(5, 0)), "window of Queue\\(rate_limit=...\\) must be > 0"),
        (lambda: Queue("a/b"), "invalid queue name 'a/b'"),
    ],
)
def test_bad_queue_declarations_are_refused_clearly(make: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        make()


async def test_bad_queued_starts_are_refused_clearly() -> None:
    conductor = in_memory(Queue("q"))
    with pytest.raises(InvalidArgument, match="no queue named 'nope': declare it"):
        await conductor.start(held, queue="nope")
    with pytest.raises(InvalidArgument, match="need queue="):
        await conductor.start(held, key="k")
    with pytest.raises(InvalidArgument, match="run_id= or dedup_id=, not both"):
        await conductor.start(held, queue="q", run_id="a", dedup_id="b")
    with pytest.raises(InvalidArgument, match="delay= must be a duration >= 0"):
        await conductor.start(held, queue="q", delay=-1)
    await conductor.start(held, {"n": 1}, queue="q", run_id="fixed")
    with pytest.raises(RunConflict):
        await conductor.start(held, {"n": 2}, queue="q", run_id="fixed")
    assert await conductor.list(status="active", workflow="held") != []


# -- worker processes ----------------------------------------------------------------


async def test_limits_and_ticks_hold_across_worker_processes_sigkilled_and_stopped(
    shared_harness: Harness, tmp_path: Path
) -> None:
    """Three worker processes serve three queues and a schedule; they die and come back.

    Queues: concurrency=2 over 30 runs, one run at a time per key over three keys, 5
    admissions per 0.5 s over 20 runs. Schedule: a tick every 0.3 s, catch_up="all". The
    worker holding the schedule is SIGKILLed while the queues drain; once they have, every
    worker is SIGKILLed, none runs for a while, then one comes back.
    """
    trace = tmp_path / "trace.txt"
    queues = [
        Queue("pair", concurrency=2),
        Queue("keyed", per_key_concurrency=1),
        Queue("paced", rate_limit=(5, 0.5)),
    ]
    client = Conductor(await shared_harness.open(), queues=queues)
    client.register(held)
    client.register(ticked)
    # S3 has no wake-up signal: a run's end reaches its queue at the next poll, so there
    # the runs are fewer and longer, or they would not overlap.
    slow = shared_harness.name == "s3"
    n_pair, n_keyed, n_paced, hold = (5, 6, 8, 0.3) if slow else (30, 12, 20, 0.04)
    sched = await client.schedule("pulse", ticked, every=PERIOD, catch_up="all")
    workers = [spawn(shared_harness.url, trace) for _ in range(3)]
    comeback = tmp_path / "go"
    standby = spawn(shared_harness.url, trace, go=comeback)  # serves nothing until told
    workers.append(standby)
    try:
        pair = [
            client.start(held, {"n": i, "pause": hold, "key": "pair"}, queue="pair")
            for i in range(n_pair)
        ]
        keyed = [
            client.start(held, {"n": i, "pause": 2 * hold, "key": k}, queue="keyed", key=k)
            for i, k in zip(range(n_keyed), itertools.cycle("abc"), strict=False)
        ]
        paced = [
            client.start(held, {"n": i, "pause": 0.0, "key": "paced"}, queue="paced")
            for i in range(n_paced)
        ]
        # Started side by side: order is not what this test is about, and S3 is slow per call.
        everything = await asyncio.gather(*pair, *keyed, *paced)

        async def going() -> bool:
            return await _count(client, 2) and len(ledger(trace)) >= (4 if slow else 8)

        await wait_until(going, timeout=60)
        lease = await client.backend.get_lease(sched.run_id)
        assert lease is not None
        holder = next(w for w in workers[:3] if f"/{w.pid}/" in lease.owner)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        killed_at = len(await tick_runs(client))
        results = await asyncio.gather(*(r.result(timeout=90) for r in everything))
        await wait_until(lambda: _count(client, killed_at + 3), timeout=60)
        for w in workers[:3]:  # every worker gone: the ticks of this gap are missed
            w.send_signal(signal.SIGKILL)
            w.wait()
        down_at = len(await tick_runs(client))
        await asyncio.sleep(3 * PERIOD.total_seconds())
        comeback.touch()  # a worker again
        # The ticks missed meanwhile, then one on time.
        await wait_until(lambda: _count(client, down_at + 4), timeout=60)
    finally:
        for w in workers:
            halt(w)
    # The queues.
    assert results == [*range(n_pair), *range(n_keyed), *range(n_paced)]
    rows = ledger(trace)
    pair_runs = per_run([r for r in rows if r[2] == "pair"])
    assert most_at_once(pair_runs) <= 2, "concurrency=2 was passed"
    for key in "abc":
        key_runs = per_run([r for r in rows if r[2] == key])
        assert most_at_once(key_runs) == 1, f"two runs of key {key} ran at once"
    # Reached, not only never passed: from admission to end, two runs held slots at once
    # (the runs' own steps may not overlap where workers find work by polling).
    pair_slots = [await slot(client, r.run_id) for r in everything[:n_pair]]
    assert most_at_once(pair_slots) == 2, "concurrency=2 must be reached"
    keyed_slots = [await slot(client, r.run_id) for r in everything[n_pair : n_pair + n_keyed]]
    assert most_at_once(keyed_slots) >= 2, "keys should run side by side"
    times = sorted([await admitted_at(client, r.run_id) for r in everything[-n_paced:]])
    for i in range(len(times) - 5):
        assert times[i + 5] - times[i] >= 0.5 - 1e-6, "more than 5 admitted within 0.5 s"
    for r in everything:  # recorded once, whoever ran it
        log = await client.backend.read_log(r.run_id)
        kinds = [k["k"] for p, e in enumerate(log) for k in decode_entry(r.run_id, p, e)]
        assert kinds.count("step") == 1 and kinds.count("admit") == 1
    # The schedule.
    runs = await tick_runs(client)
    ticks = [datetime.fromisoformat(at).timestamp() for _, at in runs]
    assert len(set(ticks)) == len(ticks), "a tick started twice"
    expected = [min(ticks) + i * PERIOD.total_seconds() for i in range(len(ticks))]
    assert ticks == pytest.approx(expected), "catch_up='all' must leave no tick out"
    assert [rid for rid, _ in runs] == [f"schedule:pulse:{tick_stamp(t)}" for t in ticks]
    for rid, _ in runs:
        log = await client.backend.read_log(rid)
        kinds = [r["k"] for p, e in enumerate(log) for r in decode_entry(rid, p, e)]
        assert kinds.count("start") == 1
    lines = [line.split() for line in trace.read_text().splitlines()]
    ticked_on = {line[-1] for line in lines if len(line) == 4}  # lines of ``ticked``
    assert len(ticked_on) >= 2, "ticks should have run on more than one worker"
