"""Values in the log are faithful or refused: NaN, infinities and colliding keys never pass.

JSON has no NaN or infinity (orjson writes ``null``), and a dict with keys
``1`` and ``"1"`` is stored with two equal string keys (one is lost on
reading). Each value path refuses them up front with an error that names
the place inside the value and what to store instead; nothing is recorded.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import orjson
import pytest

from substantial import (
    Conductor,
    Context,
    SerializationError,
    WorkflowFailed,
    workflow,
)
from substantial.records import as_stored, encode_entry, encode_value
from substantial.testing import log_records, running

NAN, INF = float("nan"), float("inf")


@dataclasses.dataclass
class Point:
    x: float
    tags: list[Any]


# -- the codec -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "where", "says"),
    [
        ({"a": [1, 2, NAN]}, "result['a'][2]", "is nan"),
        ([INF], "result[0]", "is inf"),
        ({"p": Point(1.0, [-INF])}, "result['p'].tags[0]", "is -inf"),
        ({"deep": {"er": (0, {"x": NAN})}}, "result['deep']['er'][1]['x']", "is nan"),
        ({1: "a", "1": "b"}, "result has keys 1 and '1'", "same string key '1'"),
        ({"m": {None: 1, "null": 2}}, "result['m'] has keys None and 'null'", "distinct"),
        ({"n": 2**64}, "result['n']", "beyond 64 bits"),
        ({"s": {1, 2}}, "result['s']", "of type set"),
        ({"k": {(1, 2): 3}}, "result['k'] has a key (1, 2)", "string keys"),
        (["\ud800"], "result[0]", "not valid UTF-8"),
    ],
)
def test_unfaithful_values_are_refused_naming_the_place(value: Any, where: str, says: str) -> None:
    with pytest.raises(SerializationError) as err:
        as_stored(value, "the result of step 'f'", "result")
    message = str(err.value)
    assert message.startswith("cannot store the result of step 'f' in the log: ")
    assert where in message and says in message


def test_nan_and_infinity_say_what_to_store_instead() -> None:
    with pytest.raises(SerializationError, match="store None, or a string such as 'nan'"):
        encode_value({"x": NAN})


def test_a_value_that_contains_itself_is_refused_with_a_short_message() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(SerializationError, match="contains itself") as err:
        encode_value(loop)
    assert len(str(err.value)) < 400


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ({"a": None, "b": [1.5, -0.0, 2**64 - 1, -(2**63)]}, None),
        ((1, "x"), [1, "x"]),
        ({1: "a", 2: "b"}, {"1": "a", "2": "b"}),
        (Point(1.0, [None]), {"x": 1.0, "tags": [None]}),
        (1e308, None),
    ],
)
def test_faithful_values_pass_with_the_documented_conversions(value: Any, stored: Any) -> None:
    assert as_stored(value) == (value if stored is None else stored)


def test_a_record_with_a_non_finite_time_is_not_written() -> None:
    with pytest.raises(SerializationError, match="'until' is inf"):
        encode_entry([{"k": "sleep", "c": 0, "until": INF}])


# -- every path a value takes into the log ---------------------------------------


@workflow()
async def step_returns(c: Context, which: str) -> str:
    bad: dict[str, Any] = {
        "nan": {"a": [1, 2, NAN]},
        "keys": {1: "a", "1": "b"},
    }
    try:
        await c.save(lambda: bad[which], name="produce")
    except SerializationError as exc:
        return str(exc)
    return "stored"


@pytest.mark.parametrize(
    ("which", "says"),
    [("nan", "['a'][2] is nan"), ("keys", " has keys 1 and '1'")],
)
async def test_a_step_result_that_json_would_change_fails_the_step_clearly(
    which: str, says: str
) -> None:
    async with running(step_returns) as conductor:
        run = await conductor.start(step_returns, {"which": which})
        message = await run.result(timeout=20)
        assert f"result{says}" in message and "step 'produce'" in message
        records = await log_records(conductor.backend, run.run_id)
        steps = [r for r in records if r["k"] == "step"]
        # The failure is recorded (so a replay raises the same), never a value with None in it.
        assert len(steps) == 1 and "value" not in steps[0]
        assert steps[0]["error"]["type"] == "SerializationError"


@workflow()
async def takes(c: Context, x: Any = None) -> Any:
    return x


async def test_arguments_with_nan_or_colliding_keys_start_nothing() -> None:
    conductor = Conductor("memory://")
    conductor.register(takes)
    with pytest.raises(SerializationError, match=r"kwargs\['x'\]\['v'\] is nan"):
        await conductor.start(takes, {"x": {"v": NAN}}, run_id="never")
    with pytest.raises(SerializationError, match="has keys 1 and '1'"):
        await conductor.start(takes, {"x": {1: 0, "1": 1}}, run_id="never")
    assert await conductor.backend.get_run("never") is None


@workflow()
async def waits(c: Context) -> Any:
    return await c.receive("e")


async def test_an_event_with_infinity_is_refused_at_send_and_the_run_still_waits() -> None:
    async with running(waits) as conductor:
        run = await conductor.start(waits)
        with pytest.raises(SerializationError, match=r"event\['value'\]\[0\] is inf"):
            await run.send("e", [INF])
        assert await conductor.backend.read_inbox(run.run_id) == []
        await run.send("e", [1.5])
        assert await run.result(timeout=20) == [1.5]


@workflow()
async def publishes(c: Context) -> list[str]:
    errors = []
    for value in ({"load": NAN}, {True: 1, "true": 2}):
        try:
            c.publish("state", value)
        except SerializationError as exc:
            errors.append(str(exc))
    c.publish("state", {"load": 0.5})
    return errors


async def test_a_published_value_that_json_would_change_is_refused_in_the_workflow() -> None:
    async with running(publishes) as conductor:
        run = await conductor.start(publishes)
        errors = await run.result(timeout=20)
        assert "published as 'state'" in errors[0] and "['load'] is nan" in errors[0]
        assert "has keys True and 'true'" in errors[1]
        assert await run.read("state", timeout=5) == {"load": 0.5}


@workflow()
async def child_of(c: Context) -> Any:
    return "child"


@workflow()
async def other_paths(c: Context) -> list[str]:
    errors = []
    attempts = [
        lambda: c.emit("s", [NAN]),
        lambda: c.log("note", ratio=INF),
    ]
    for attempt in attempts:
        try:
            attempt()
        except SerializationError as exc:
            errors.append(str(exc))
    try:
        await c.child(child_of, {"x": -INF})
    except SerializationError as exc:
        errors.append(str(exc))
    return errors


async def test_emitted_values_log_data_and_child_arguments_are_checked_too() -> None:
    async with running(other_paths, child_of) as conductor:
        run = await conductor.start(other_paths)
        errors = await run.result(timeout=20)
        assert len(errors) == 3, errors
        assert "is nan" in errors[0] and "is inf" in errors[1]
        assert "the child's arguments in the log: kwargs['x'] is -inf" in errors[2]


@workflow()
async def returns_nan(c: Context) -> float:
    return math.nan


async def test_a_return_value_with_nan_fails_the_run_instead_of_completing_with_none() -> None:
    async with running(returns_nan) as conductor:
        run = await conductor.start(returns_nan)
        with pytest.raises(WorkflowFailed, match="is nan"):
            await run.result(timeout=20)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_record_with_a_non_finite_time_is_refused_not_stored_as_null(bad: float) -> None:
    for record in (
        {"k": "sleep", "c": 0, "until": bad},
        {"k": "step", "c": 1, "name": "s", "value": None, "t": bad},
    ):
        with pytest.raises(SerializationError, match="finite numbers only"):
            encode_entry([{"k": "step", "c": 0, "name": "ok", "value": 1}, record])


def test_a_record_value_with_non_string_keys_is_still_encoded() -> None:
    # Values normally arrive with string keys (as_stored); one that does not is encoded as
    # as_stored would have: its keys become strings.
    entry = encode_entry([{"k": "step", "c": 0, "name": "s", "value": {1: "a", "b": 2}}])
    assert orjson.loads(entry) == [{"k": "step", "c": 0, "name": "s", "value": {"1": "a", "b": 2}}]
