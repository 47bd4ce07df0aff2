"""What the engine keeps about commands: issued, recorded, delivered, to undo."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from substantial.records import Record

__all__ = [
    "ACTIVATIONS",
    "Command",
    "Compensation",
    "Delivered",
    "Recorded",
    "command_of",
    "describe",
]

ACTIVATIONS = frozenset({"step", "timer", "event", "child", "sent", "compensated", "timeout"})
_COMMAND_OF = {"attempt": "step", "compensated": "compensate", "sent": "send"}


@dataclass
class Delivered:
    """An event recorded in the log and not yet consumed."""

    event_id: str
    name: str
    value: Any


@dataclass
class Compensation:
    """A completed step's undo action, run by ``revert()``."""

    name: str
    fn: Callable[..., Any]
    value: Any


@dataclass(slots=True)
class Command:
    """One primitive call the workflow is waiting on."""

    c: int
    kind: str
    name: str | None
    future: asyncio.Future[Any]
    #: What the live side needs to act (a step's function, a timer's due time, ...).
    spec: Any = None
    #: Called instead of resolving ``future`` when the completion is applied.
    on_done: Callable[[Record], None] | None = None
    #: The command's I/O is running (or armed) on the worker's loop.
    started: bool = False
    done: bool = False


@dataclass(slots=True)
class Recorded:
    """What the log says about one command number."""

    kind: str
    name: str | None
    position: int
    bound: list[Record] = field(default_factory=list)
    completed: bool = False


def describe(record: Record | None) -> str:
    """Render a record briefly for error messages."""
    if record is None:
        return "the end of the log"
    name = record.get("name")
    return f"{record['k']}" + (f" {name!r}" if name is not None else "")


def command_of(record: Record) -> tuple[str, str | None]:
    kind = str(record["k"])
    if kind == "sleep":
        name = record.get("name")
        return str(record.get("for", "sleep")), (None if name is None else str(name))
    name = record.get("name", record.get("key", record.get("stream", record.get("id"))))
    return _COMMAND_OF.get(kind, kind), (None if name is None else str(name))
