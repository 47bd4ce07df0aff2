"""The record types of a run's log, and their codec.

A log entry is a JSON array of records; a record is a JSON object whose
``k`` field names its kind. docs/PROTOCOL.md is the normative description;
the TypedDicts below mirror it. Records a workflow's primitive produces
carry ``c``, the number of the command (primitive call) they belong to.
"""

from __future__ import annotations

import os
import traceback
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
    "encode_entry",
    "encode_value",
    "error_of",
    "start_record",
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
}

_OPTS = orjson.OPT_NON_STR_KEYS


def encode_entry(records: list[Record]) -> bytes:
    """Encode records as one log entry; raise :class:`SerializationError` if one cannot be."""
    try:
        return orjson.dumps(records, option=_OPTS)
    except TypeError as exc:
        raise SerializationError(
            f"cannot store {_describe(records)} in the log: {exc}. Return JSON-compatible data "
            "(dict, list, str, int, float, bool, None, dataclass, datetime) from steps and events"
        ) from exc


def encode_value(value: Any, what: str = "a value") -> bytes:
    """Encode one value as JSON, raising :class:`SerializationError` naming ``what``."""
    try:
        return orjson.dumps(value, option=_OPTS)
    except TypeError as exc:
        raise SerializationError(
            f"cannot store {what} of type {type(value).__name__} in the log: {exc}. Use "
            "JSON-compatible data (dict, list, str, int, float, bool, None, dataclass, datetime)"
        ) from exc


def as_stored(value: Any, what: str = "a value") -> Any:
    """Return ``value`` as the log will hand it back (JSON round trip), or raise clearly.

    A workflow sees the same shapes live and on replay: a tuple is a list
    both times, a dataclass a dict.
    """
    return orjson.loads(encode_value(value, what))


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
        fields = _FIELDS.get(record["k"])
        if fields is None:
            raise CorruptRecord(run_id, position, f"unknown record kind {record['k']!r}")
        for name, kind in fields.items():
            value = record.get(name)
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                raise CorruptRecord(
                    run_id, position, f"a {record['k']!r} record needs a valid {name!r} field"
                )
    return records


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
