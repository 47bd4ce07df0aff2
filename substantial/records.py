"""The record types of a run's log, and their codec.

A log entry is a JSON array of records; a record is a JSON object whose
``k`` field names its kind. docs/PROTOCOL.md is the normative description.
"""

from __future__ import annotations

from typing import Any

import orjson

from substantial.errors import CorruptRecord, SerializationError

__all__ = ["Record", "decode_entry", "encode_entry", "encode_value"]

Record = dict[str, Any]

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


def encode_value(value: Any) -> bytes:
    """Encode one value as JSON, raising :class:`SerializationError` with a useful message."""
    try:
        return orjson.dumps(value, option=_OPTS)
    except TypeError as exc:
        raise SerializationError(
            f"cannot store a value of type {type(value).__name__} in the log: {exc}. Use "
            "JSON-compatible data (dict, list, str, int, float, bool, None, dataclass, datetime)"
        ) from exc


def decode_entry(run_id: str, position: int, data: bytes) -> list[Record]:
    """Decode one log entry, raising :class:`CorruptRecord` naming the run and position."""
    try:
        records = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord(run_id, position, f"not valid JSON: {exc}") from exc
    if not isinstance(records, list) or not records:
        raise CorruptRecord(run_id, position, "an entry must be a non-empty JSON array")
    for record in records:
        if not isinstance(record, dict) or not isinstance(record.get("k"), str):
            raise CorruptRecord(run_id, position, "each record must be an object with a 'k' kind")
    return records


def _describe(records: list[Record]) -> str:
    kinds = ", ".join(str(r.get("k")) for r in records if isinstance(r, dict))
    return f"the record(s) [{kinds}]"
