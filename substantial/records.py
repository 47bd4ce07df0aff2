"""The record types of a run's log, and their codec.

A log entry is a JSON array of records; a record is a JSON object whose
``k`` field names its kind. docs/PROTOCOL.md is the normative description;
the TypedDicts below mirror it. Records a workflow's primitive produces
carry ``c``, the number of the command (primitive call) they belong to.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import traceback
from collections.abc import Iterable
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from substantial.backends.base import PROTOCOL_VERSION, ErrorInfo
from substantial.errors import CorruptRecord, SerializationError

__all__ = [
    "EndRecord",
    "EventRecord",
    "Record",
    "StartRecord",
    "StepRecord",
    "as_stored",
    "decode_entry",
    "decode_log",
    "encode_entry",
    "encode_value",
    "error_of",
    "start_record",
    "unchanged_by_json",
]

Record = dict[str, Any]
"""A decoded record; :func:`decode_entry` has checked its fields against its kind."""


class StartRecord(TypedDict):
    """Position 0 of every run: what to run, with which arguments."""

    k: Literal["start"]
    p: int
    run_id: str
    workflow: str
    version: str | None
    kwargs: dict[str, Any]
    at: float
    seen: NotRequired[list[str]]
    parent: NotRequired[str]
    deadline: NotRequired[float]
    abandon: NotRequired[bool]
    #: The W3C trace context (``traceparent``, ``tracestate``) the run was started in.
    trace: NotRequired[dict[str, str]]


class StepRecord(TypedDict):
    """A ``save`` command completed: its value, or its error after the last attempt."""

    k: Literal["step"]
    c: int
    name: str
    t: float
    value: NotRequired[Any]
    error: NotRequired[ErrorInfo]
    attempts: NotRequired[int]
    key: NotRequired[str]


class EventRecord(TypedDict):
    """An inbox event delivered into the log."""

    k: Literal["event"]
    id: str
    name: str
    value: Any
    t: float


class EndRecord(TypedDict):
    """The run ended."""

    k: Literal["end"]
    status: str
    t: float
    value: NotRequired[Any]
    error: NotRequired[ErrorInfo]
    next: NotRequired[str]
    cancel_children: NotRequired[list[str]]


_NUM = (int, float)
# kind -> required fields and their types; optional fields are checked where they are read.
_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "start": {"workflow": str, "kwargs": dict, "at": _NUM},
    "step": {"c": int, "name": str},
    "attempt": {"c": int, "name": str, "n": int, "error": dict, "retry_at": _NUM},
    # Written by a queue at position 1 of a run it admits; replay passes over it.
    "admit": {"queue": str},
    "sleep": {"c": int, "until": _NUM},
    "timer": {"c": int},
    "event": {"id": str, "name": str},
    "now": {"c": int, "value": _NUM},
    "random": {"c": int, "value": _NUM},
    "uuid": {"c": int, "value": str},
    "log": {"c": int, "msg": str},
    "compensated": {"c": int, "name": str},
    "child": {"c": int, "run_id": str},
    "sent": {"c": int},
    "publish": {"c": int, "key": str},
    "emit": {"c": int, "stream": str},
    "patch": {"c": int, "id": str},
    "timeout": {},
    "snapshot": {"start": dict, "kwargs": dict, "next_c": int},
    "end": {"status": str},
    "repair": {"op": str, "at": _NUM},
}

#: The same, as the exact types JSON decodes to (a bool is no int here).
_EXACT: dict[str, tuple[tuple[str, frozenset[type]], ...]] = {
    kind: tuple(
        (name, frozenset(t if isinstance(t, tuple) else (t,))) for name, t in fields.items()
    )
    for kind, fields in _FIELDS.items()
}

_OPTS = orjson.OPT_NON_STR_KEYS
_JSON_TYPES = (
    "JSON-compatible data (dict, list, str, int, float, bool, None, dataclass, datetime, "
    "UUID, enum)"
)


def encode_entry(records: list[Record]) -> bytes:
    """Encode records as one log entry; raise :class:`SerializationError` if one cannot be.

    Values inside records were checked where they entered (:func:`as_stored`);
    here only the records' own numbers are: a non-finite time would be
    stored as ``null``.
    """
    try:
        # Values came through as_stored, so their keys are strings: the faster encoder
        # (without OPT_NON_STR_KEYS, 0.5 us of 1.2 here) takes them, and anything else
        # is given the encoder of as_stored.
        data = orjson.dumps(records)
    except TypeError:
        try:
            data = orjson.dumps(records, option=_OPTS)
        except TypeError as exc:
            raise SerializationError(
                f"cannot store {_describe(records)} in the log: {exc}. Return {_JSON_TYPES} "
                "from steps and events"
            ) from exc
    if b"null" in data:  # where a non-finite number would have gone, if anywhere
        for record in records:
            for name, field in record.items():
                if type(field) is float and not math.isfinite(field):
                    raise SerializationError(
                        f"cannot store a {record.get('k')!r} record whose {name!r} is "
                        f"{field!r}: the log holds finite numbers only"
                    )
    return data


def encode_value(value: Any, what: str = "a value", root: str = "value") -> bytes:
    """Encode one value as JSON, or raise :class:`SerializationError` naming where it fails.

    Encoding is faithful up to the documented conversions (a tuple becomes a
    list, a dataclass a dict, a non-string key a string, ...). What JSON would
    change silently is refused instead: NaN and infinities (``null`` in JSON),
    and two keys of one dict that become the same string (``1`` and ``"1"``).
    The error names ``what``, the place inside the value as ``root[...]``, and
    what to store instead.
    """
    try:
        data = orjson.dumps(value)
        keys_are_str = True
    except TypeError:
        try:
            data = orjson.dumps(value, option=_OPTS)
        except TypeError as exc:
            reason = _problem_at(value, root) or f"{root} cannot be encoded ({exc})"
            raise SerializationError(f"cannot store {what} in the log: {reason}") from exc
        keys_are_str = False
    # NaN and infinities come out as null, and only dicts with non-string keys can collide:
    # walk the value only when one of those is possible.
    if not keys_are_str or (b"null" in data and _suspect(value)):
        problem = _problem_at(value, root)
        if problem is not None:
            raise SerializationError(f"cannot store {what} in the log: {problem}")
    return data


def unchanged_by_json(value: Any) -> bool:
    """Tell, cheaply, whether the JSON round trip surely gives ``value`` back as it is.

    None, a bool, an int orjson stores, an ASCII str: the plain results of most
    steps, for which :func:`as_stored` need not encode anything. Anything else
    may change shape or be refused, and takes the round trip.
    """
    kind = type(value)
    return (
        value is None
        or kind is bool
        or (kind is int and value in _INT_RANGE)
        or (kind is str and value.isascii())
    )


def as_stored(value: Any, what: str = "a value", root: str = "value") -> Any:
    """Return ``value`` as the log will hand it back (JSON round trip), or raise clearly.

    A workflow sees the same shapes live and on replay: a tuple is a list
    both times, a dataclass a dict. See :func:`encode_value` for what is refused.
    """
    if unchanged_by_json(value):
        return value
    return orjson.loads(encode_value(value, what, root))


def decode_entry(run_id: str, position: int, data: bytes) -> list[Record]:
    """Decode one log entry, raising :class:`CorruptRecord` naming the run and position.

    Every record's required fields are checked against its kind, so a
    well-formed JSON record of the wrong shape is corrupt here, not a
    ``KeyError`` deep inside replay.
    """
    try:
        records = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(run_id, position, f"not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise CorruptRecord(run_id, position, "an entry must be a non-empty JSON array")
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("k"), str):
            raise CorruptRecord(run_id, position, "each record must be an object with a 'k' kind")
        fields = _EXACT.get(record["k"])
        if fields is None:
            raise CorruptRecord(run_id, position, f"unknown record kind {record['k']!r}")
        for name, types in fields:
            if type(record.get(name)) not in types:
                raise CorruptRecord(
                    run_id, position, f"a {record['k']!r} record needs a valid {name!r} field"
                )
    return records


def decode_log(
    run_id: str, start: int, entries: Iterable[bytes], marks: dict[str, int] | None = None
) -> list[tuple[int, Record]]:
    """Decode a run's entries, the first at position ``start``, as (position, record) pairs.

    With ``marks``, the index (in the returned list) of the last record of
    each kind already in ``marks`` is filled in: replay asks where the last
    snapshot is and whether there is any repair, and one pass answers both.
    """
    out: list[tuple[int, Record]] = []
    append = out.append
    for position, data in enumerate(entries, start):
        for record in decode_entry(run_id, position, data):
            if marks is not None and record["k"] in marks:
                marks[record["k"]] = len(out)
            append((position, record))
    return out


#: orjson's limit on nesting; deeper values (or values that contain themselves) fail.
_MAX_DEPTH = 254
_INT_RANGE = range(-(2**63), 2**64)

#: A problem found inside a value: the path to it, innermost step first, and what it is.
_Found = tuple[list[str], str]


_PLAIN = frozenset({str, int, bool, type(None)})


def _suspect(value: Any) -> bool:
    """Tell quickly whether ``value`` may hold a non-finite float (the full walk then decides)."""
    stack = [value]
    pop, extend, isfinite = stack.pop, stack.extend, math.isfinite
    while stack:
        item = pop()
        kind = type(item)
        if kind in _PLAIN:
            continue
        if kind is float:
            if not isfinite(item):
                return True
        elif kind is dict:
            extend(item.values())
        elif kind is list or kind is tuple:
            extend(item)
        else:
            return True  # a dataclass, an enum, a subclass...: let the full walk look inside
    return False


def _problem_at(value: Any, root: str) -> str | None:
    """Return what makes ``value`` unstorable or not faithful, at ``root[...]``, or None."""
    found = _problem(value, 0)
    if found is None:
        return None
    steps, what = found
    path = root + "".join(reversed(steps))
    if len(path) > 120:
        path = f"{path[:60]}...{path[-50:]}"
    return f"{path} {what}"


def _problem(value: Any, depth: int) -> _Found | None:
    if depth > _MAX_DEPTH:
        return [], f"nests deeper than {_MAX_DEPTH} levels (or contains itself): flatten it"
    kind = type(value)
    if kind is str:
        try:
            value.encode()
        except UnicodeEncodeError:
            return [], "is a str that is not valid UTF-8 (lone surrogates): clean it"
        return None
    if kind is bool or value is None:
        return None
    if isinstance(value, float):
        if math.isfinite(value):
            return None
        return [], (
            f"is {value!r}, which JSON cannot hold (it would come back as None): "
            "store None, or a string such as 'nan' or 'inf', instead"
        )
    if isinstance(value, int):
        if int(value) in _INT_RANGE:
            return None
        return [], f"is an integer beyond 64 bits ({value}): store it as a string"
    if isinstance(value, dict):
        return _dict_problem(value, depth)
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _problem(item, depth + 1)
            if found is not None:
                found[0].append(f"[{i}]")
                return found
        return None
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            found = _problem(getattr(value, f.name), depth + 1)
            if found is not None:
                found[0].append(f".{f.name}")
                return found
        return None
    if isinstance(value, enum.Enum):
        found = _problem(value.value, depth + 1)
        if found is not None:
            found[0].append(".value")
        return found
    if isinstance(value, str):
        return _problem(str(value), depth)
    try:
        orjson.dumps(value)
    except TypeError:
        return [], (
            f"is of type {type(value).__name__}, which the log cannot hold: use {_JSON_TYPES}"
        )
    return None


def _dict_problem(value: dict[Any, Any], depth: int) -> _Found | None:
    stored: dict[str, Any] = {}
    for key, item in value.items():
        if type(key) is str:
            name = key
        else:
            try:
                name = next(iter(orjson.loads(orjson.dumps({key: 0}, option=_OPTS))))
            except TypeError:
                return [], (
                    f"has a key {key!r} of type {type(key).__name__}, which cannot be a JSON "
                    "object key: use string keys"
                )
        if name in stored:
            return [], (
                f"has keys {stored[name]!r} and {key!r}, which the log stores as the same "
                f"string key {name!r}, so one would be lost: use distinct string keys"
            )
        stored[name] = key
        found = _problem(item, depth + 1)
        if found is not None:
            found[0].append(f"[{key!r}]")
            return found
    return None


def start_record(
    run_id: str,
    workflow: str,
    version: str | None,
    kwargs: dict[str, Any],
    at: float,
    *,
    seen: list[str] | None = None,
    parent: str | None = None,
    deadline: float | None = None,
    abandon: bool = False,
    trace: dict[str, str] | None = None,
) -> StartRecord:
    """Build the record at position 0 of a run."""
    record: StartRecord = {
        "k": "start",
        "p": PROTOCOL_VERSION,
        "run_id": run_id,
        "workflow": workflow,
        "version": version,
        "kwargs": kwargs,
        "at": at,
    }
    if seen:
        record["seen"] = seen
    if parent is not None:
        record["parent"] = parent
    if deadline is not None:
        record["deadline"] = deadline
    if abandon:
        record["abandon"] = True
    if trace:
        record["trace"] = trace
    return record


_OWN_FRAMES = (
    os.path.dirname(__file__) + os.sep,
    os.sep + "asyncio" + os.sep,
    os.sep + "concurrent" + os.sep,
)


def error_of(exc: BaseException, *, frames: int = 8) -> ErrorInfo:
    """Describe an exception as stored data: type, message and the user's innermost frames.

    Frames of the engine, asyncio and thread pools are left out: they say
    nothing about where the workflow or step went wrong.
    """
    info: ErrorInfo = {"type": type(exc).__name__, "message": str(exc)}
    tb = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not any(part in f.filename for part in _OWN_FRAMES)
    ][-frames:]
    if tb:
        info["traceback"] = [f"{f.filename}:{f.lineno} in {f.name}" for f in tb]
    return info


def _describe(records: list[Record]) -> str:
    kinds = ", ".join(str(r.get("k")) for r in records if isinstance(r, dict))
    return f"the record(s) [{kinds}]"
