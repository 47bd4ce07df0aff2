"""Properties of the log's codec and of replay, checked on values drawn by hypothesis.

* every record kind round-trips through encode_entry/decode_entry unchanged;
* decode_entry, given any bytes (or any JSON), returns records or raises
  CorruptRecord, never anything else;
* a record missing a required field, or holding one of the wrong type, is
  CorruptRecord;
* a value is stored exactly (plain JSON) or with the documented conversions,
  or refused up front with SerializationError: never changed silently;
* a run's log, replayed offline against the same code, ends the same way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from substantial.errors import CorruptRecord, SerializationError
from substantial.records import _FIELDS, as_stored, decode_entry, encode_entry
from substantial.testing import replay
from tests.simulation import scenario, sim
from tests.test_simulation import programs

FAST = settings(max_examples=100, deadline=None, database=None)

finite = st.floats(allow_nan=False, allow_infinity=False)
json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), finite, st.text(max_size=12)
)
json_values = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=10,
)

_BY_TYPE: dict[Any, st.SearchStrategy[Any]] = {
    str: st.text(max_size=12),
    int: st.integers(0, 2**31),
    dict: st.dictionaries(st.text(max_size=6), json_values, max_size=3),
    (int, float): st.one_of(st.integers(0, 2**40), st.floats(0, 4e9)),
}


@st.composite
def records(draw: st.DrawFn, kind: str | None = None) -> dict[str, Any]:
    """A valid record of ``kind`` (any kind if None), with extra optional fields."""
    k = kind or draw(st.sampled_from(sorted(_FIELDS)))
    record: dict[str, Any] = {"k": k}
    for name, typ in _FIELDS[k].items():
        record[name] = draw(_BY_TYPE[typ])
    extra = draw(st.dictionaries(st.sampled_from(["value", "t", "note", "x"]), json_values))
    for name, value in extra.items():
        record.setdefault(name, value)
    return record


@settings(max_examples=50, deadline=None, database=None)
@given(st.lists(records(), min_size=1, max_size=4))
def test_every_record_kind_round_trips(entry: list[dict[str, Any]]) -> None:
    assert decode_entry("r", 3, encode_entry(entry)) == entry


@FAST
@given(st.binary(max_size=300))
def test_decoding_any_bytes_gives_records_or_corrupt_record(data: bytes) -> None:
    try:
        decoded = decode_entry("r", 0, data)
    except CorruptRecord as exc:
        assert exc.run_id == "r" and exc.position == 0
    else:
        assert isinstance(decoded, list) and all(isinstance(r, dict) for r in decoded)


# JSON shaped like entries, with kinds and field names the codec knows, values of any type.
hostile_records = st.dictionaries(
    st.sampled_from(["k", "c", "name", "id", "until", "value", "kwargs", "start", "status"]),
    st.one_of(json_values, st.sampled_from(sorted(_FIELDS))),
)


@FAST
@given(st.one_of(json_values, st.lists(hostile_records, max_size=4)))
def test_decoding_any_json_gives_checked_records_or_corrupt_record(value: Any) -> None:
    data = orjson.dumps(value)
    try:
        decoded = decode_entry("r", 1, data)
    except CorruptRecord:
        return
    for record in decoded:
        for name, typ in _FIELDS[record["k"]].items():
            assert isinstance(record[name], typ) and not isinstance(record[name], bool)


@FAST
@given(records(), st.data())
def test_a_record_missing_or_mistyping_a_required_field_is_corrupt(
    record: dict[str, Any], data: st.DataObject
) -> None:
    required = sorted(_FIELDS[record["k"]])
    if not required:
        return
    name = data.draw(st.sampled_from(required))
    if data.draw(st.booleans()):
        del record[name]
    else:
        record[name] = data.draw(st.sampled_from([None, True, [], "x", 1.5, {}]))
        if isinstance(record[name], _FIELDS[record["k"]][name]) and not isinstance(
            record[name], bool
        ):
            return  # the drawn replacement happens to be of the right type
    with pytest.raises(CorruptRecord, match=f"valid {name!r} field"):
        decode_entry("r", 2, encode_entry([record]))


# -- values ----------------------------------------------------------------------------


@dataclasses.dataclass
class Box:
    inner: Any


risky_leaf = st.one_of(
    json_leaf,
    st.floats(),  # NaN and infinities included
    st.integers(-(2**70), 2**70),
    st.tuples(st.integers()),
)
risky_values = st.recursive(
    risky_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.one_of(st.text(max_size=3), st.integers(-3, 3), st.none()), inner),
        st.builds(Box, inner),
    ),
    max_leaves=12,
)


def expected(value: Any) -> Any:
    """What the log hands back for ``value``, by the documented conversions (None: refused)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else _REFUSED
    if isinstance(value, int) and not isinstance(value, bool):
        return value if -(2**63) <= value < 2**64 else _REFUSED
    if isinstance(value, list | tuple):
        items = [expected(v) for v in value]
        return _REFUSED if _REFUSED in items else items
    if isinstance(value, Box):
        inner = expected(value.inner)
        return _REFUSED if inner is _REFUSED else {"inner": inner}
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            name = key if isinstance(key, str) else orjson.dumps(key).decode()
            converted = expected(item)
            if name in out or converted is _REFUSED:
                return _REFUSED
            out[name] = converted
        return out
    return value


_REFUSED = object()


@settings(max_examples=300, deadline=None, database=None)
@given(risky_values)
def test_a_value_is_stored_faithfully_or_refused_up_front(value: Any) -> None:
    want = expected(value)
    if want is _REFUSED:
        with pytest.raises(SerializationError, match="cannot store"):
            as_stored(value)
        return
    got = as_stored(value)
    assert orjson.dumps(got) == orjson.dumps(want)
    assert got == want


@FAST
@given(json_values)
def test_plain_json_comes_back_exactly_with_its_types(value: Any) -> None:
    got = as_stored(value)
    assert got == value
    assert repr(got) == repr(value)  # bools stay bools, ints ints, -0.0 stays -0.0


# -- replay ------------------------------------------------------------------------------


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(program=programs, revert=st.booleans())
def test_a_log_replayed_offline_ends_as_it_did_live(program: list[Any], revert: bool) -> None:
    async def check() -> None:
        outcome = await scenario(program, revert=revert, crash_after=None)
        assert outcome.store is not None
        replayed = await replay(sim, await outcome.store.read_log("sim"))
        assert replayed.matches, (program, replayed)

    asyncio.run(check())
