"""Filter expressions over what runs produced: each operator, bad expressions, every backend."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import orjson
import pytest

from substantial import Conductor, Context, InvalidArgument, Queue, WorkflowFailed, workflow
from substantial._queue_flow import MESSAGE
from substantial._queue_members import queued_run_ids
from substantial._runs import store_run
from substantial.backends.base import RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.records import encode_entry, start_record
from substantial.search import RunQuery, check, find_runs, matches, parse_time
from tests.harness import Harness

T0 = 1_700_000_000.0


def run(
    status: str = "completed",
    output: Any = None,
    error: str | None = None,
    created: float = T0,
    updated: float = T0 + 10,
    run_id: str = "r",
) -> RunInfo:
    err = None if error is None else {"type": "RuntimeError", "message": error}
    return RunInfo(run_id, "wf", status, created, updated, output=output, error=err)  # type: ignore[arg-type]


def test_terms_on_the_value() -> None:
    three, text = run(output=3), run(output="a fatal end")
    obj = run(output={"a": {"b": 1}, "c": 2})
    assert matches(three, {"eq": 3}) and not matches(three, {"eq": "3"})
    assert (
        matches(three, {"lt": 4}) and matches(three, {"lte": 3}) and not matches(three, {"lt": 3})
    )
    assert (
        matches(three, {"gt": 2}) and matches(three, {"gte": 3}) and not matches(three, {"gt": 3})
    )
    assert not matches(three, {"lt": "4"})  # a number and a string never compare
    assert matches(text, {"gt": "a"}) and matches(text, {"contains": "fatal"})
    assert matches(three, {"in": [1, 2, 3]}) and not matches(three, {"in": [1, 2]})
    assert matches(text, {"in": "it was a fatal end indeed"})
    assert matches(obj, {"contains": {"a": {"b": 1}}}) and not matches(obj, {"contains": {"c": 3}})
    assert matches(obj, {"eq": {"c": 2, "a": {"b": 1}}})  # key order does not matter
    assert matches(run(output=[1, 2]), {"contains": 2})
    assert not matches(run(output=True), {"eq": 1}) and matches(run(output=True), {"eq": True})


def test_errors_are_searched_as_type_and_message_and_active_runs_have_no_value() -> None:
    failed = run("failed", error="fatal disk error")
    assert matches(failed, {"contains": "fatal"})
    assert matches(failed, {"eq": "RuntimeError: fatal disk error"})
    active = run("active", output=None, updated=T0)
    assert not matches(active, {"eq": None})  # no value: every term on it is false
    assert matches(active, {"not": {"eq": None}})
    assert matches(active, {"not": {"eq": 3}})


def test_and_or_not_and_fields() -> None:
    r = run(output=3, created=T0, updated=T0 + 10, run_id="order-42")
    assert matches(r, {"or": [{"lt": 1}, {"eq": 3}]})
    assert not matches(r, {"and": [{"lt": 10}, {"gt": 3}]})
    assert matches(r, {"not": {"and": [{"lt": 10}, {"gt": 3}]}})
    assert matches(r, {"run_id": {"contains": "42"}}) and matches(r, {"workflow": {"eq": "wf"}})
    assert matches(r, {"status": {"in": ["completed", "failed"]}})
    assert matches(r, {"started_at": {"eq": T0}}) and matches(r, {"ended_at": {"gt": T0 + 5}})
    iso = datetime.fromtimestamp(T0 + 5).isoformat()
    assert matches(r, {"started_at": {"lt": iso}}) and matches(r, {"ended_at": {"gte": iso}})
    assert not matches(run("active"), {"ended_at": {"gt": 0}})


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ({}, "at <root>: expected an object with exactly one key"),
        ({"lt": 1, "gt": 0}, "at <root>: expected an object with exactly one key"),
        ({"like": "x"}, "unknown operator 'like': use one of and, or, not, eq"),
        ({"or": {"lt": 3}}, "at <root>.or: 'or' expects a non-empty list of expressions"),
        ({"and": []}, "'and' expects a non-empty list"),
        ({"or": [{"lt": 3}, {"lt": [1]}]}, "at <root>.or.#1.lt: 'lt' expects a number or a string"),
        ({"not": 3}, "at <root>.not: expected an object with exactly one key"),
        ({"in": 3}, "'in' expects a list, a string or an object"),
        ({"status": "failed"}, "at <root>.status: expected an object with exactly one key"),
        ({"status": {"and": []}}, "unknown operator 'and': use one of eq, gt"),
        ({"started_at": {"gt": "whenever"}}, "cannot read 'whenever' as a time"),
        ({"ended_at": {"lt": True}}, "'lt' on a time expects epoch seconds or ISO 8601 text"),
    ],
)
def test_a_malformed_expression_names_the_operator_and_what_it_expects(
    expr: Any, message: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        check(expr)
    assert message in str(err.value)


def test_parse_time() -> None:
    assert parse_time("90s", now=1000.0) == 910.0
    assert parse_time("2h", now=10_000.0) == 2800.0
    assert parse_time("1700000000") == T0
    assert parse_time("2023-11-14T22:13:20Z") == T0
    with pytest.raises(InvalidArgument, match="use ISO 8601"):
        parse_time("tomorrow")


@workflow()
async def outcome(c: Context, value: Any = None, fail: str | None = None) -> Any:
    if fail is not None:
        raise RuntimeError(fail)
    return value


class CountingBackend(MemoryBackend):
    """A memory backend that notes the filters each listing was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[tuple[str | None, str | None]] = []
        self.logs_read: list[str] = []

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        self.logs_read.append(run_id)
        return await super().read_log(run_id, start)

    async def list_runs(self, **kwargs: Any) -> list[RunInfo]:
        if kwargs.get("ids") is None:  # a lookup of named runs (get_run) lists nothing
            self.asked.append((kwargs.get("status"), kwargs.get("workflow")))
        return await super().list_runs(**kwargs)


async def _fill(conductor: Conductor) -> None:
    conductor.register(outcome)
    agent = conductor.run(poll_interval=0.2)
    try:
        specs: list[tuple[str, dict[str, Any]]] = [
            ("one", {"value": 1}),
            ("five", {"value": 5}),
            ("text", {"value": "all good"}),
            ("boom", {"fail": "fatal: out of disk"}),
            ("oops", {"fail": "recoverable"}),
        ]
        for run_id, kwargs in specs:
            await conductor.start(outcome, kwargs, run_id=run_id)
        for run_id, kwargs in specs:
            if "fail" in kwargs:
                with pytest.raises(WorkflowFailed):
                    await conductor.get(run_id).result(timeout=30)
            else:
                await conductor.get(run_id).result(timeout=30)
    finally:
        agent.cancel()
        await agent


async def test_conductor_search_on_every_backend(harness: Harness) -> None:
    conductor = Conductor(await harness.open())
    await _fill(conductor)
    found = await conductor.search({"or": [{"lt": 3}, {"contains": "fatal"}]})
    assert {r.run_id for r in found} == {"one", "boom"}
    found = await conductor.search(
        {"and": [{"status": {"eq": "failed"}}, {"not": {"contains": "fatal"}}]}
    )
    assert [r.run_id for r in found] == ["oops"]
    later = await conductor.search({"started_at": {"gte": time.time() + 60}})
    assert later == []
    with pytest.raises(InvalidArgument, match="'gte' expects a number or a string"):
        await conductor.search({"gte": None})


async def test_status_and_workflow_terms_go_to_the_backends_index() -> None:
    backend = CountingBackend()
    conductor = Conductor(backend)
    await _fill(conductor)
    backend.asked.clear()
    expr = {
        "and": [{"status": {"eq": "failed"}}, {"workflow": {"eq": "outcome"}}, {"contains": "x"}]
    }
    assert await conductor.search(expr) == []
    assert backend.asked == [("failed", "outcome")]
    backend.asked.clear()
    await conductor.search({"or": [{"status": {"eq": "failed"}}, {"eq": 1}]})
    assert backend.asked == [(None, None)]  # an `or` cannot narrow the listing


async def test_listing_pages_in_id_order_stop_early() -> None:
    backend = CountingBackend()
    for i in range(1200):
        await backend.put_run(RunInfo(f"r{i:05d}", "wf", "completed", T0 + i, T0 + i, output=i))
    page = await find_runs(backend, RunQuery(sort="id", descending=False, limit=10, offset=5))
    assert [r.run_id for r in page.runs] == [f"r{i:05d}" for i in range(5, 15)]
    assert len(backend.asked) == 1 and page.truncated
    page = await find_runs(backend, RunQuery(where={"gte": 1190}, limit=3))
    assert [r.run_id for r in page.runs] == ["r01199", "r01198", "r01197"]
    assert page.total == 10 and page.scanned == 1200 and not page.truncated
    page = await find_runs(backend, RunQuery(scan_limit=700))
    assert page.scanned == 700 and page.truncated


@workflow()
async def mailer(c: Context, to: str = "") -> str:
    return str(await c.save(lambda: f"sent to {to}", name="send"))


async def test_runs_of_a_queue_are_named_by_the_queues_log_alone() -> None:
    backend = CountingBackend()
    conductor = Conductor(backend, queues=[Queue("mail", concurrency=1), Queue("other")])
    conductor.register(mailer)
    await conductor.start(mailer, {"to": "a"}, queue="mail", run_id="m-a")
    for _ in range(2):  # one run per dedup id
        await conductor.start(mailer, {"to": "b"}, queue="mail", dedup_id="b")
    await conductor.start(mailer, {"to": "x"}, queue="other", run_id="o-x")
    await conductor.start(mailer, {"to": "p"}, run_id="plain")
    # No worker yet: the queue's messages still wait in its inbox.
    page = await find_runs(backend, RunQuery(queue="mail", sort="id", descending=False))
    assert [(r.run_id, r.status) for r in page.runs] == [
        ("dedup:mail:b", "active"),
        ("m-a", "active"),
    ]
    agent = conductor.run(poll_interval=0.1)
    try:
        for run_id in ("m-a", "dedup:mail:b", "o-x", "plain"):
            await conductor.get(run_id).result(timeout=20)
        await (await conductor.start(mailer, {"to": "c"}, queue="mail", run_id="m-c")).result(
            timeout=20
        )
    finally:
        agent.cancel()
        await agent
    backend.logs_read.clear()
    backend.asked.clear()
    page = await find_runs(backend, RunQuery(queue="mail", sort="id", descending=False))
    assert [(r.run_id, r.status) for r in page.runs] == [
        ("dedup:mail:b", "completed"),
        ("m-a", "completed"),
        ("m-c", "completed"),
    ]
    # One log read, the queue's; no listing of the store, no run's own log.
    assert backend.logs_read == ["queue:mail"] and backend.asked == []
    assert page.total == 3 and page.scanned == 3 and not page.truncated
    where = await find_runs(backend, RunQuery(queue="mail", where={"contains": "sent to a"}))
    assert [r.run_id for r in where.runs] == ["m-a"]
    assert (await find_runs(backend, RunQuery(queue="mail", status="active"))).runs == []
    capped = await find_runs(backend, RunQuery(queue="mail", scan_limit=2))
    assert capped.scanned == 2 and capped.truncated
    with pytest.raises(InvalidArgument, match=r"no queue named 'nope'.*queues list"):
        await find_runs(backend, RunQuery(queue="nope"))
    with pytest.raises(InvalidArgument, match="invalid queue name"):
        await find_runs(backend, RunQuery(queue="no/such"))


async def test_a_compacted_queue_still_names_its_runs() -> None:
    """After compact(), the snapshot keeps the queue's waiting and running runs."""
    backend = MemoryBackend()
    start = start_record("queue:q", "substantial.queue", None, {"name": "q", "config": {}}, T0)
    info = RunInfo("queue:q", "substantial.queue", "active", T0, T0)
    assert await store_run(backend, info, encode_entry([dict(start)]), T0)

    def enqueue(run_id: str) -> dict[str, Any]:
        message = {"op": "enqueue", "run_id": run_id}
        return {"k": "event", "id": f"enqueue.{run_id}", "name": MESSAGE, "value": message, "t": T0}

    snapshot = {
        "k": "snapshot",
        "start": dict(start),
        "next_c": 9,
        "kwargs": {
            "name": "q",
            "config": {},
            "state": {"entries": {"r2": [0, 1, None, 0, None, T0]}, "running": {"r3": None}},
            "pending": [{"op": "enqueue", "run_id": "r4"}, {"op": "done", "run_id": "r1"}],
        },
    }
    for position, records in enumerate(
        [
            [enqueue("r1")],
            [snapshot],
            [
                enqueue("r5"),
                {
                    "k": "event",
                    "id": "x",
                    "name": "other",
                    "value": {"op": "enqueue", "run_id": "not-a-member"},
                    "t": T0,
                },
            ],
        ],
        start=1,
    ):
        await backend.append("queue:q", position, encode_entry(records))
    body = orjson.dumps({"name": MESSAGE, "value": {"op": "enqueue", "run_id": "r6"}})
    await backend.send_event("queue:q", "enqueue.r6", body)
    assert await queued_run_ids(backend, "q") == ["r1", "r2", "r3", "r4", "r5", "r6"]


@pytest.mark.parametrize("indexed", [False, True])
async def test_newest_first_pages_by_cursor_with_or_without_an_index(
    tmp_path: Any, indexed: bool
) -> None:
    from substantial.backends.sqlite import SQLiteBackend

    backend = SQLiteBackend(tmp_path / "s.db") if indexed else MemoryBackend()
    for i in range(12):
        at = T0 + i // 2  # two runs at each time: the id breaks the tie
        await backend.put_run(RunInfo(f"r{i:02d}", f"w{i % 3}", "completed", at, at, output=i))
    everything = await find_runs(backend, RunQuery(limit=50))
    expected = [f"r{i:02d}" for i in range(11, -1, -1)]
    assert [r.run_id for r in everything.runs] == expected
    walked: list[str] = []
    query = RunQuery(limit=5, where={"gte": 1})
    while page := (await find_runs(backend, query)).runs:
        walked += [r.run_id for r in page]
        query = RunQuery(limit=5, where={"gte": 1}, before=[page[-1].created_at, page[-1].run_id])
    assert walked == expected[:-1]
    before = (T0 + 3, "r07")
    page = await find_runs(backend, RunQuery(limit=3, workflow="w0", before=before))
    assert [r.run_id for r in page.runs] == ["r06", "r03", "r00"]
    with pytest.raises(InvalidArgument, match="not a cursor"):
        RunQuery(before=("soon", "r1"))  # type: ignore[arg-type]
    await backend.close()
