"""The workflow engine on every backend: each primitive, replay, errors."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest

from substantial import (
    Conductor,
    Context,
    ReceiveTimeout,
    RetryPolicy,
    SerializationError,
    StepFailed,
    WorkflowFailed,
    workflow,
)
from substantial.backends.base import Backend
from substantial.records import decode_entry


async def records_of(backend: Backend, run_id: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for position, data in enumerate(await backend.read_log(run_id)):
        out.extend(decode_entry(run_id, position, data))
    return out


def kinds(records: list[dict[str, Any]]) -> list[str]:
    return [r["k"] for r in records]


# -- save ----------------------------------------------------------------------


@workflow()
async def add_steps(c: Context, a: int = 1, b: int = 2) -> int:
    x = await c.save(lambda: a)

    async def plus() -> int:
        await asyncio.sleep(0)
        return x + b

    return await c.save(plus)


async def test_save_runs_sync_and_async_steps_and_records_them(
    conductor: Conductor, agent: None
) -> None:
    conductor.register(add_steps)
    run = await conductor.start(add_steps, {"a": 40, "b": 2})
    assert await run.result(timeout=10) == 42
    recs = await records_of(conductor.backend, run.run_id)
    assert kinds(recs) == ["start", "step", "step", "end"]
    assert recs[1]["value"] == 40 and recs[2]["value"] == 42
    assert {k: v for k, v in recs[3].items() if k != "t"} == {
        "k": "end",
        "status": "completed",
        "value": 42,
    }
    assert [r["c"] for r in recs[1:3]] == [0, 1]
    info = await run.status()
    assert info.status == "completed" and info.output == 42


attempts_seen: list[int] = []


@workflow()
async def flaky(c: Context, fail_times: int = 2, max_attempts: int = 5) -> str:
    def step() -> str:
        attempts_seen.append(1)
        if len(attempts_seen) <= fail_times:
            raise ConnectionError(f"boom {len(attempts_seen)}")
        return "ok"

    try:
        return await c.save(step, retry=RetryPolicy(max_attempts=max_attempts, initial_delay=0.01))
    except StepFailed as exc:
        return f"caught {exc.error_type} after {exc.attempts}"


async def test_save_retries_with_backoff_recording_each_attempt(
    conductor: Conductor, agent: None
) -> None:
    attempts_seen.clear()
    conductor.register(flaky)
    run = await conductor.start(flaky, {"fail_times": 2})
    assert await run.result(timeout=10) == "ok"
    recs = await records_of(conductor.backend, run.run_id)
    assert kinds(recs) == ["start", "attempt", "attempt", "step", "end"]
    assert recs[1]["error"]["type"] == "ConnectionError"
    assert recs[1]["error"]["message"] == "boom 1"
    assert any("in step" in frame for frame in recs[1]["error"]["traceback"])
    assert recs[2]["n"] == 2 and recs[2]["retry_at"] > recs[1]["retry_at"]


async def test_save_final_failure_is_recorded_and_catchable(
    conductor: Conductor, agent: None
) -> None:
    attempts_seen.clear()
    conductor.register(flaky)
    run = await conductor.start(flaky, {"fail_times": 99, "max_attempts": 3})
    assert await run.result(timeout=10) == "caught ConnectionError after 3"
    recs = await records_of(conductor.backend, run.run_id)
    assert kinds(recs) == ["start", "attempt", "attempt", "step", "end"]
    assert recs[3]["error"]["type"] == "ConnectionError" and recs[3]["attempts"] == 3
    assert len(attempts_seen) == 3


@workflow()
async def slow_step(c: Context) -> str:
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    try:
        return await c.save(slow, timeout=0.05, retry=RetryPolicy(max_attempts=2, initial_delay=0))
    except StepFailed as exc:
        return exc.error_type


async def test_save_timeout(conductor: Conductor, agent: None) -> None:
    conductor.register(slow_step)
    run = await conductor.start(slow_step)
    assert await run.result(timeout=10) == "StepTimeout"


class Opaque:
    pass


@workflow()
async def unserializable(c: Context, catch: bool = False) -> str:
    try:
        await c.save(Opaque)
    except SerializationError as exc:
        if catch:
            return "caught: " + str(exc)[:40]
        raise
    return "unreachable"


async def test_unserializable_result_is_a_clear_error_and_nothing_half_written(
    conductor: Conductor, agent: None
) -> None:
    conductor.register(unserializable)
    run = await conductor.start(unserializable, {"catch": True})
    assert (await run.result(timeout=10)).startswith("caught: cannot store the result of step")
    run = await conductor.start(unserializable)
    with pytest.raises(WorkflowFailed) as err:
        await run.result(timeout=10)
    assert err.value.error_type == "SerializationError"
    assert "Opaque" in err.value.message and "JSON" in err.value.message
    assert "step 'Opaque'" in err.value.message and repr(run.run_id) in err.value.message
    recs = await records_of(conductor.backend, run.run_id)
    # The failure is recorded whole (so a replay raises it again), never a half-written value.
    assert kinds(recs) == ["start", "step", "end"]
    assert "value" not in recs[1] and recs[1]["error"]["type"] == "SerializationError"


@workflow()
async def returns_opaque(c: Context) -> Any:
    return Opaque()


async def test_unserializable_return_value_fails_the_run_clearly(
    conductor: Conductor, agent: None
) -> None:
    conductor.register(returns_opaque)
    run = await conductor.start(returns_opaque)
    with pytest.raises(WorkflowFailed, match="SerializationError"):
        await run.result(timeout=10)


@workflow()
async def raises(c: Context) -> None:
    await c.save(lambda: 1)
    raise KeyError("missing thing")


async def test_a_workflow_that_raises_fails_with_its_error(
    conductor: Conductor, agent: None
) -> None:
    conductor.register(raises)
    run = await conductor.start(raises)
    with pytest.raises(WorkflowFailed) as err:
        await run.result(timeout=10)
    assert err.value.error_type == "KeyError" and "missing thing" in err.value.message
    info = await run.status()
    assert info.status == "failed" and info.error is not None
    assert info.error["type"] == "KeyError" and "missing thing" in info.error["message"]
    assert kinds(await records_of(conductor.backend, run.run_id)) == ["start", "step", "end"]


# -- sleep ---------------------------------------------------------------------


@workflow()
async def naps(c: Context, seconds: float = 0.2) -> float:
    t0 = await c.save(time.time)
    await c.sleep(timedelta(seconds=seconds))
    return await c.save(time.time) - t0


async def test_sleep_is_durable_and_on_time(conductor: Conductor, agent: None) -> None:
    conductor.register(naps)
    run = await conductor.start(naps, {"seconds": 0.3})
    elapsed = await run.result(timeout=10)
    assert 0.29 <= elapsed < 2.0
    recs = await records_of(conductor.backend, run.run_id)
    assert kinds(recs) == ["start", "step", "sleep", "timer", "step", "end"]


async def test_long_sleep_leaves_memory_and_any_worker_resumes_it(conductor: Conductor) -> None:
    conductor.register(naps)
    first = conductor.run(poll_interval=0.2, idle_timeout=0.1)
    run = await conductor.start(naps, {"seconds": 1.0})
    await asyncio.sleep(0.6)
    # Evicted: nobody holds it in memory, and the due index has its wake-up time.
    assert first.worker.runs == {}
    due_at = dict(await conductor.backend.due(time.time() + 5))
    assert run.run_id in due_at and due_at[run.run_id] > time.time()
    first.cancel()
    await first
    second = conductor.run(poll_interval=0.2)
    try:
        elapsed = await run.result(timeout=10)
    finally:
        second.cancel()
        await second
    assert 0.99 <= elapsed < 3.0


# -- events --------------------------------------------------------------------


@workflow()
async def greeter(c: Context) -> str:
    name = await c.receive("name")
    greeting = await c.receive("greeting")
    return f"{greeting}, {name}"


async def test_receive_takes_events_by_name_in_order(conductor: Conductor, agent: None) -> None:
    conductor.register(greeter)
    run = await conductor.start(greeter)
    await run.send("greeting", "hello")
    await asyncio.sleep(0.05)
    await run.send("name", "ada")
    assert await run.result(timeout=10) == "hello, ada"


async def test_events_sent_with_no_worker_are_delivered_later(conductor: Conductor) -> None:
    conductor.register(greeter)
    run = await conductor.start(greeter)
    await run.send("name", "bob")
    await run.send("greeting", "hi")
    await run.send("name", "ignored-second-name")
    agent = conductor.run(poll_interval=0.5)
    try:
        assert await run.result(timeout=10) == "hi, bob"
    finally:
        agent.cancel()
        await agent


async def test_event_id_makes_send_idempotent(conductor: Conductor, agent: None) -> None:
    conductor.register(greeter)
    run = await conductor.start(greeter)
    await run.send("name", "x", event_id="e-1")
    await run.send("name", "y", event_id="e-1")
    await run.send("greeting", "yo", event_id="e-2")
    assert await run.result(timeout=10) == "yo, x"
    recs = await records_of(conductor.backend, run.run_id)
    assert [r["id"] for r in recs if r["k"] == "event"] == ["e-1", "e-2"]


@workflow()
async def waits_with_timeout(c: Context) -> str:
    try:
        return await c.receive("never", timeout=0.2)
    except ReceiveTimeout:
        return "timed out"


async def test_receive_timeout(conductor: Conductor, agent: None) -> None:
    conductor.register(waits_with_timeout)
    run = await conductor.start(waits_with_timeout)
    assert await run.result(timeout=10) == "timed out"
    recs = await records_of(conductor.backend, run.run_id)
    assert [r.get("for") for r in recs if r["k"] == "sleep"] == ["receive"]


@dataclass
class Box:
    items: list[Any]


@workflow()
async def handler_flow(c: Context) -> list[Any]:
    box = Box([])
    c.handle("add", lambda v: box.items.append(v))
    await c.ensure(lambda: len(box.items) >= 3)
    return box.items


async def test_handlers_fire_in_arrival_order_and_ensure_is_event_driven(
    conductor: Conductor, agent: None
) -> None:
    conductor.register(handler_flow)
    run = await conductor.start(handler_flow)
    for v in ["a", "b", "c"]:
        await run.send("add", v)
    assert await run.result(timeout=10) == ["a", "b", "c"]
    recs = await records_of(conductor.backend, run.run_id)
    assert [r["value"] for r in recs if r["k"] == "event"] == ["a", "b", "c"]
    # Handlers are code, not records: replaying the events replays them.
    assert kinds(recs).count("event") == 3


# -- recorded values -------------------------------------------------------------


replay_probe: list[tuple[Any, ...]] = []


@workflow()
async def values(c: Context) -> dict[str, Any]:
    now = c.now()
    r = c.random()
    u = c.uuid4()
    c.log("values drawn: %s", r, answer=42)
    replay_probe.append((now, r, u))
    await c.receive("go")
    return {"now": now.isoformat(), "random": r, "uuid": str(u)}


async def test_now_random_uuid_log_are_recorded_and_replayed(
    conductor: Conductor, caplog: pytest.LogCaptureFixture
) -> None:
    replay_probe.clear()
    conductor.register(values)
    first = conductor.run(poll_interval=0.2, idle_timeout=0.1)
    with caplog.at_level(logging.INFO, logger="substantial.workflow"):
        run = await conductor.start(values)
        await asyncio.sleep(0.5)  # evicted while waiting for "go"
        assert first.worker.runs == {}
        await run.send("go")
        out = await run.result(timeout=10)
    first.cancel()
    await first
    assert len(replay_probe) == 2 and replay_probe[0] == replay_probe[1]
    now, r, u = replay_probe[0]
    assert isinstance(now, datetime) and 0 <= r < 1
    assert out == {"now": now.isoformat(), "random": r, "uuid": str(u)}
    assert sum("values drawn" in m for m in caplog.messages) == 1
    recs = await records_of(conductor.backend, run.run_id)
    (log,) = [x for x in recs if x["k"] == "log"]
    assert log["data"] == {"answer": 42}
