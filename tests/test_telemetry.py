"""OpenTelemetry spans (SDK in-memory exporter) and structured log lines from a real worker."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from substantial import (
    Conductor,
    Context,
    Queue,
    RetryPolicy,
    StepFailed,
    WorkflowFailed,
    records,
    telemetry,
    workflow,
)
from substantial._runs import create_run
from substantial.backends.memory import MemoryBackend

ROOT = Path(__file__).resolve().parent.parent
_calls: dict[str, int] = {}


@workflow()
async def traced(c: Context) -> str:
    def flaky() -> int:
        _calls[c.run_id] = _calls.get(c.run_id, 0) + 1
        if _calls[c.run_id] < 3:
            raise ValueError(f"flaky failure {_calls[c.run_id]}")
        return 7

    def doomed() -> None:
        raise KeyError("gone")

    await c.save(flaky, name="flaky", retry=RetryPolicy(initial_delay=0.01))
    with contextlib.suppress(StepFailed):
        await c.save(doomed, name="doomed", retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    c.log("halfway")
    await c.sleep(0.3)  # longer than the idle timeout: the run leaves the worker and comes back
    return str(await c.save(lambda: "done", name="last"))


@workflow()
async def kid(c: Context, x: int = 1) -> int:
    return int(await c.save(lambda: x + 1, name="inside kid"))


@workflow()
async def parent(c: Context, again: bool = False) -> int:
    v = await c.save(lambda: 1, name="before")
    got = await c.child(kid, {"x": v})
    if again:
        await c.continue_using(parent)
    return got


#: The conductor a worker subprocess serves (``substantial worker tests.test_telemetry:served``).
served = Conductor(os.environ.get("SUBSTANTIAL_TEST_URL", "memory://"))
for _wf in (traced, parent, kid):
    served.register(_wf)


_providers: dict[int, TracerProvider] = {}


def exporter_provider(memory: InMemorySpanExporter) -> TracerProvider:
    """The provider exporting to ``memory`` (one per exporter)."""
    if id(memory) not in _providers:
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        _providers[id(memory)] = provider
    return _providers[id(memory)]


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    telemetry.enable(exporter_provider(memory))
    yield memory
    telemetry.disable()
    _providers.pop(id(memory), None)


@pytest.fixture
async def conductor() -> AsyncIterator[Conductor]:
    c = Conductor(MemoryBackend())
    for wf in (traced, parent, kid):
        c.register(wf)
    agent = c.run(poll_interval=0.1, idle_timeout=0.05)
    yield c
    agent.cancel()
    await agent


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


async def test_a_span_per_run_attempt_and_per_step_attempt(
    exporter: InMemorySpanExporter, conductor: Conductor
) -> None:
    run = await conductor.start(traced, run_id="traced-1")
    assert await run.result(timeout=20) == "done"
    spans = exporter.get_finished_spans()
    runs = [s for s in spans if s.name == "run traced"]
    # Taken, handed back during the sleep, taken again to finish.
    assert [attrs(s)["substantial.outcome"] for s in runs] == ["handed back", "done"]
    assert all(attrs(s)["substantial.run_id"] == "traced-1" for s in runs)
    assert all(attrs(s)["substantial.workflow"] == "traced" for s in runs)

    flaky = [s for s in spans if s.name == "step flaky"]
    assert [attrs(s)["substantial.attempt"] for s in flaky] == [1, 2, 3]
    assert [s.status.status_code for s in flaky] == [
        StatusCode.ERROR,
        StatusCode.ERROR,
        StatusCode.UNSET,
    ]
    assert [attrs(s)["substantial.outcome"] for s in flaky] == ["error", "error", "ok"]
    failure = flaky[0].events[0]
    assert failure.name == "exception"
    assert dict(failure.attributes or {})["exception.message"] == "flaky failure 1"
    doomed = [s for s in spans if s.name == "step doomed"]
    assert [attrs(s)["substantial.attempt"] for s in doomed] == [1, 2]
    assert all(s.status.status_code == StatusCode.ERROR for s in doomed)
    first_run = runs[0]
    for step in flaky + doomed:
        assert attrs(step)["substantial.run_id"] == "traced-1"
        assert attrs(step)["substantial.workflow"] == "traced"
        assert step.parent is not None and step.parent.span_id == first_run.context.span_id
        assert first_run.start_time <= step.start_time <= step.end_time <= first_run.end_time
    (last,) = [s for s in spans if s.name == "step last"]
    assert last.parent is not None and last.parent.span_id == runs[1].context.span_id


async def test_a_failing_workflow_marks_its_run_span() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    telemetry.enable(provider)
    try:

        @workflow(name="explodes")
        async def explodes(c: Context) -> None:
            await c.save(lambda: 1, name="fine")
            raise RuntimeError("the workflow itself failed")

        conductor = Conductor(MemoryBackend())
        conductor.register(explodes)
        agent = conductor.run(poll_interval=0.1)
        run = await conductor.start(explodes, run_id="explodes-1")
        with pytest.raises(Exception, match="the workflow itself failed"):
            await run.result(timeout=20)
        agent.cancel()
        await agent
    finally:
        telemetry.disable()
    (span,) = [s for s in memory.get_finished_spans() if s.name == "run explodes"]
    # The run attempt itself worked: it recorded the failure and ended the run.
    assert attrs(span)["substantial.outcome"] == "done"
    assert [s.name for s in memory.get_finished_spans()] == ["step fine", "run explodes"]


def test_off_by_default_and_nothing_of_opentelemetry_is_loaded() -> None:
    code = (
        "import asyncio, sys\n"
        "from substantial import Conductor, telemetry\n"
        "from substantial.backends.memory import MemoryBackend\n"
        "from tests.workflows import ten_steps\n"
        "async def go():\n"
        "    c = Conductor(MemoryBackend()); c.register(ten_steps); a = c.run()\n"
        "    r = await c.start(ten_steps)\n"
        "    assert await r.result(timeout=20) == [i * i for i in range(10)]\n"
        "    a.cancel(); await a\n"
        "asyncio.run(go())\n"
        "assert telemetry.on is False\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_json_logs_carry_run_workflow_and_step(conductor: Conductor) -> None:
    stream = io.StringIO()
    handler = telemetry.use_json_logs(logging.INFO, stream)
    try:
        run = await conductor.start(traced, run_id="logged-1")
        assert await run.result(timeout=20) == "done"
    finally:
        logging.getLogger().removeHandler(handler)
        telemetry.disable()
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    retry = [x for x in lines if "attempt 1 failed" in x["message"] and "flaky" in x["message"]]
    assert retry, lines
    assert retry[0]["run_id"] == "logged-1" and retry[0]["workflow"] == "traced"
    assert retry[0]["step"] == "flaky" and retry[0]["attempt"] == 1
    assert retry[0]["level"] == "WARNING" and retry[0]["logger"] == "substantial.workflow"
    (halfway,) = [x for x in lines if x["message"].endswith("halfway")]
    assert halfway["run_id"] == "logged-1" and halfway["workflow"] == "traced"
    assert "step" not in halfway  # logged by the workflow's own code, not inside a step


def test_worker_command_logs_json(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'store.db'}"
    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    start = (
        "import asyncio\nfrom tests.test_telemetry import served, traced\n"
        "async def go():\n"
        "    await served.start(traced, run_id='json-logs')\n"
        "    await served.close()\n"
        "asyncio.run(go())"
    )
    subprocess.run([sys.executable, "-c", start], cwd=ROOT, env=env, check=True, timeout=60)
    command = [sys.executable, "-m", "substantial.cli", "worker", "tests.test_telemetry:served"]
    worker = subprocess.Popen(
        [*command, "--log-format", "json", "-v"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stderr is not None
        record: dict[str, Any] = {}
        for line in worker.stderr:
            if line.startswith("{") and "attempt 1 failed" in line:
                record = orjson.loads(line)
                break
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        if worker.stderr is not None:
            worker.stderr.close()
    assert record["run_id"] == "json-logs" and record["step"] == "flaky"
    assert record["workflow"] == "traced" and record["attempt"] == 1


def test_enable_without_the_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    with pytest.raises(Exception, match=r"pip install 'substantial\[otel\]'"):
        telemetry.enable()
    assert telemetry.on is False


async def start_record(conductor: Conductor, run_id: str) -> dict[str, Any]:
    entries = await conductor.backend.read_log(run_id)
    record: dict[str, Any] = orjson.loads(entries[0])[0]
    return record


def traceparent(span: Any) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"


async def test_a_run_and_its_children_continue_the_trace_they_were_started_in(
    exporter: InMemorySpanExporter, conductor: Conductor
) -> None:
    tracer = trace.get_tracer("app", tracer_provider=exporter_provider(exporter))
    with tracer.start_as_current_span("handle request") as request:
        run = await conductor.start(parent, {"again": True}, run_id="traced-tree")
    outside = await conductor.start(kid, run_id="untraced")
    assert await run.result(timeout=20) == 2
    assert await outside.result(timeout=20) == 2

    # The start record holds the W3C trace context of the span start() was called in.
    assert (await start_record(conductor, "traced-tree"))["trace"] == {
        "traceparent": traceparent(request)
    }
    assert "trace" not in await start_record(conductor, "untraced")
    spans = exporter.get_finished_spans()
    by_run: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        if span.name.startswith("run "):
            by_run.setdefault(attrs(span)["substantial.run_id"], []).append(span)
    trace_id = request.get_span_context().trace_id
    (first,) = by_run["traced-tree"]
    assert first.parent is not None and first.parent.span_id == request.get_span_context().span_id
    assert first.context.trace_id == trace_id
    # The child's start record names the span of the parent's run attempt that started it.
    (child,) = by_run["traced-tree:1"]
    child_start = await start_record(conductor, "traced-tree:1")
    assert child_start["trace"]["traceparent"] == traceparent(first)
    assert child.parent is not None and child.parent.span_id == first.context.span_id
    assert child.context.trace_id == trace_id
    (inside,) = [
        s
        for s in spans
        if s.name == "step inside kid" and attrs(s)["substantial.run_id"] == "traced-tree:1"
    ]
    assert inside.parent is not None and inside.parent.span_id == child.context.span_id
    # continue_using: the successor goes on in the same trace, under the run it continues.
    (successor,) = by_run["traced-tree+1"]
    assert successor.parent is not None and successor.parent.span_id == first.context.span_id
    assert {s.context.trace_id for s in by_run["traced-tree+1:1"]} == {trace_id}
    # A run started outside any span is a trace of its own, not part of anyone's.
    (alone,) = by_run["untraced"]
    assert alone.parent is None and alone.context.trace_id != trace_id


async def test_a_damaged_trace_context_starts_a_new_trace(
    exporter: InMemorySpanExporter, conductor: Conductor
) -> None:
    for run_id, damaged in (("bad-1", {"traceparent": "00-zz-1-01"}), ("bad-2", "text")):
        record: dict[str, Any] = dict(
            records.start_record(run_id, "kid", None, {"x": 4}, time.time())
        )
        record["trace"] = damaged
        created = await create_run(conductor.backend, record)  # type: ignore[arg-type]
        assert created
        assert await conductor.get(run_id).result(timeout=20) == 5
    runs = [s for s in exporter.get_finished_spans() if s.name == "run kid"]
    assert len(runs) == 2 and all(s.parent is None for s in runs)


def test_trace_context_crosses_to_a_worker_process(tmp_path: Path) -> None:
    provider = TracerProvider()  # the client's spans need no exporter here: only their ids
    telemetry.enable(provider)
    url = f"sqlite:///{tmp_path / 'store.db'}"
    try:

        async def start() -> str:
            client = Conductor(url)
            client.register(parent)
            tracer = trace.get_tracer("app", tracer_provider=provider)
            with tracer.start_as_current_span("client") as span:
                await client.start(parent, run_id="crossed")
            await client.close()
            return traceparent(span)

        sent = asyncio.run(start())
    finally:
        telemetry.disable()
    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", WORKER_EXPORTING_SPANS],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    spans = {
        name: (trace_id, span_id, parent_id)
        for name, trace_id, span_id, parent_id in orjson.loads(out.stdout)
    }
    _, trace_id, span_id, _ = sent.split("-")
    # The worker's run span continues the client's trace, under the client's span ...
    assert spans["run parent"][0] == trace_id and spans["run parent"][2] == span_id
    # ... and the child run's, under the parent's run span, whose step spans it holds.
    assert spans["run kid"][0] == trace_id and spans["run kid"][2] == spans["run parent"][1]
    assert spans["step inside kid"][2] == spans["run kid"][1]


#: A worker process that serves ``served`` until run "crossed" ends, then prints its spans.
WORKER_EXPORTING_SPANS = """
import asyncio, orjson
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from substantial import telemetry
from tests.test_telemetry import served

async def go():
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    telemetry.enable(provider)
    agent = served.run(poll_interval=0.1)
    assert await served.get("crossed").result(timeout=30) == 2
    agent.cancel()
    await agent
    print(orjson.dumps([
        [s.name, f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}",
         f"{s.parent.span_id:016x}" if s.parent else None]
        for s in memory.get_finished_spans()
    ]).decode())

asyncio.run(go())
"""


@workflow()
async def waits(c: Context) -> Any:
    return await c.receive("go")


@workflow()
async def fails(c: Context) -> None:
    raise RuntimeError("no")


def points(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], Any]:
    """The data points of metric ``name``, by their attribute values (sorted by key)."""
    out: dict[tuple[Any, ...], Any] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data is not None else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        key = tuple(v for _, v in sorted((point.attributes or {}).items()))
                        out[key] = point
    return out


def values(reader: InMemoryMetricReader, name: str) -> dict[tuple[Any, ...], Any]:
    return {k: p.value for k, p in points(reader, name).items()}


async def test_metrics_of_steps_runs_and_events() -> None:
    reader = InMemoryMetricReader()
    telemetry.enable(TracerProvider(), MeterProvider(metric_readers=[reader]))
    conductor = Conductor(MemoryBackend(), queues=[Queue("q", concurrency=2)])
    for wf in (traced, parent, kid, waits, fails):
        conductor.register(wf)
    agent = conductor.run(poll_interval=0.1)
    try:
        assert await (await conductor.start(traced, run_id="m-1")).result(timeout=20) == "done"
        assert await (await conductor.start(parent, run_id="m-2")).result(timeout=20) == 2
        await conductor.start(parent, run_id="m-2")  # the same run again: not started twice
        with pytest.raises(WorkflowFailed):
            await (await conductor.start(fails)).result(timeout=20)
        for _ in range(2):  # one run per dedup id
            queued = await conductor.start(kid, {"x": 5}, queue="q", dedup_id="once")
        assert await queued.result(timeout=20) == 6
        assert await (await conductor.start(kid, {"x": 6}, queue="q")).result(timeout=20) == 7

        held = await conductor.start(waits, run_id="m-held")

        async def holding() -> bool:
            # The worker holds the waiting run (and the queue's run): the gauge says as much.
            held_now = values(reader, "substantial.runs.held").get(())
            return "m-held" in agent.worker.runs and held_now == len(agent.worker.runs)

        await wait_for(holding)
        await held.send("go", 1)
        assert await held.result(timeout=20) == 1
    finally:
        agent.cancel()
        await agent
        telemetry.disable()

    attempts = values(reader, "substantial.step.attempts")
    assert attempts[("error", "flaky", "traced")] == 2
    assert attempts[("ok", "flaky", "traced")] == 1
    assert attempts[("error", "doomed", "traced")] == 2
    assert attempts[("ok", "last", "traced")] == 1
    assert attempts[("ok", "inside kid", "kid")] == 3
    durations = points(reader, "substantial.step.duration")
    assert {k: p.count for k, p in durations.items()} == attempts
    assert all(p.sum >= 0 and p.max < 20 for p in durations.values())
    assert values(reader, "substantial.runs.started") == {
        ("traced",): 1,
        ("parent",): 1,
        ("kid",): 3,
        ("fails",): 1,
        ("waits",): 1,
    }
    ended = values(reader, "substantial.runs.ended")
    assert ended[("completed", "traced")] == 1 and ended[("completed", "kid")] == 3
    assert ended[("failed", "fails")] == 1 and ended[("completed", "waits")] == 1
    assert values(reader, "substantial.runs.held")[()] == 0  # every run given back
    latency = points(reader, "substantial.event.latency")
    assert latency[("waits",)].count == 1 and 0 <= latency[("waits",)].sum < 20
    assert latency[("parent",)].count == 1  # the child's end, delivered to its parent


async def wait_for(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
