"""The data a backend stores and returns: run metadata, events, leases, due runs.

Everything here is plain data and validation, shared by every backend and
by the engine; :mod:`substantial.backends.base` re-exports it beside the
contract.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from substantial.errors import CorruptRecord, InvalidArgument, ProtocolMismatch

__all__ = [
    "PROTOCOL_VERSION",
    "RUN_STATUSES",
    "TERMINAL_STATUSES",
    "Capabilities",
    "DueRuns",
    "Durability",
    "ErrorInfo",
    "Event",
    "Lease",
    "NewEvent",
    "RunInfo",
    "RunStatus",
    "Waker",
    "encode_json",
    "error_info",
    "validate_id",
]

PROTOCOL_VERSION = 2

RunStatus = Literal[
    "active", "completed", "failed", "cancelled", "reverted", "continued", "timed_out", "corrupt"
]
"""``corrupt`` is never stored: listing reports it for a run whose metadata cannot be read."""
TERMINAL_STATUSES: frozenset[str] = frozenset(
    {"completed", "failed", "cancelled", "reverted", "continued", "timed_out"}
)
RUN_STATUSES: frozenset[str] = TERMINAL_STATUSES | {"active", "corrupt"}


class ErrorInfo(TypedDict):
    """A failure as stored data: the exception's type, its message, where it was raised."""

    type: str
    message: str
    traceback: NotRequired[list[str]]


def error_info(value: Any) -> ErrorInfo | None:
    """Read a stored error: a structured one, or a protocol-1 ``"Type: message"`` string."""
    if value is None:
        return None
    if isinstance(value, str):
        kind, sep, message = value.partition(": ")
        return {"type": kind, "message": message} if sep else {"type": "Error", "message": value}
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        info: ErrorInfo = {"type": value["type"], "message": str(value.get("message", ""))}
        tb = value.get("traceback")
        if isinstance(tb, list) and all(isinstance(line, str) for line in tb):
            info["traceback"] = tb
        return info
    raise ValueError(f"an error must be an object with a 'type', got {value!r}")


Durability = Literal["process", "fsync"]
"""``process``: a write survives the writing process being killed (it reached the OS).
``fsync``: a write survives power loss (it reached the disk)."""

_ID_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:=+-]{0,199}")


#: Ids already found valid: a run's id is checked at every call, the regex only once.
_VALID: set[str] = set()


def validate_id(kind: str, value: str) -> str:
    """Check that ``value`` is usable as a run or event id on every backend."""
    if type(value) is str and value in _VALID:
        return value
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise InvalidArgument(
            f"invalid {kind} {value!r}: use 1-200 characters from A-Z a-z 0-9 _ . : = + -, "
            "not starting with '.', '-', ':', '=' or '+'"
        )
    if len(_VALID) >= 65536:
        _VALID.clear()
    _VALID.add(value)
    return value


@dataclass(frozen=True, slots=True)
class RunInfo:
    """Metadata of one run, kept beside its log for listing and lookup.

    The log is the source of truth; this record is an index that the worker
    keeps in step with it.
    """

    run_id: str
    workflow: str
    status: RunStatus
    created_at: float
    updated_at: float
    version: str | None = None
    protocol: int = PROTOCOL_VERSION
    error: ErrorInfo | None = None
    #: The run's return value once completed (or ``{"next": run_id}`` once continued).
    output: Any = None
    #: Position of the log's latest snapshot: replay reads from here (a hint; 0 is always safe).
    log_start: int = 0
    #: The run that started this one as a child, if any.
    parent: str | None = None
    #: When the run times out (epoch seconds), if it has a deadline.
    deadline: float | None = None
    #: Why an active run is not progressing (e.g. no worker knows its workflow), for people.
    note: str | None = None
    #: The latest value of each key the workflow published with ``c.publish``.
    published: dict[str, Any] | None = None

    def with_status(
        self, status: RunStatus, *, error: ErrorInfo | None = None, output: Any = None
    ) -> RunInfo:
        """Return a copy with a new status and ``updated_at`` set to now."""
        return replace(
            self, status=status, updated_at=time.time(), error=error, output=output, note=None
        )

    @classmethod
    def unreadable(cls, run_id: str, detail: str) -> RunInfo:
        """Stand in for a run whose metadata cannot be decoded, so a listing can flag it."""
        return cls(
            run_id,
            "?",
            "corrupt",
            0.0,
            0.0,
            error={"type": "CorruptRecord", "message": detail},
        )

    def to_bytes(self) -> bytes:
        """Encode as the JSON object stored by every backend."""
        return orjson.dumps(
            {
                "run_id": self.run_id,
                "workflow": self.workflow,
                "status": self.status,
                "created_at": self.created_at,
                "updated_at": self.updated_at,
                "version": self.version,
                "protocol": self.protocol,
                "error": self.error,
                "output": self.output,
                "log_start": self.log_start,
                "parent": self.parent,
                "deadline": self.deadline,
                "note": self.note,
                "published": self.published,
            },
            option=orjson.OPT_NON_STR_KEYS,
        )

    @classmethod
    def from_bytes(cls, run_id: str, data: bytes) -> RunInfo:
        """Decode stored metadata, raising :class:`CorruptRecord` if it is malformed."""
        try:
            obj = orjson.loads(data)
            protocol = int(obj["protocol"])
            status = obj["status"]
            if status not in RUN_STATUSES or status == "corrupt":
                raise ValueError(f"unknown status {status!r}")
            info = cls(
                run_id=str(obj["run_id"]),
                workflow=str(obj["workflow"]),
                status=status,
                created_at=float(obj["created_at"]),
                updated_at=float(obj["updated_at"]),
                version=obj.get("version"),
                protocol=protocol,
                error=error_info(obj.get("error")),
                output=obj.get("output"),
                log_start=int(obj.get("log_start", 0)),
                parent=_opt_str(obj.get("parent")),
                deadline=None if obj.get("deadline") is None else float(obj["deadline"]),
                note=_opt_str(obj.get("note")),
                published=_opt_dict(obj.get("published")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise CorruptRecord(run_id, "meta", str(exc)) from exc
        if protocol > PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"run {run_id!r} was written with storage protocol {protocol}, this version of "
                f"substantial reads up to {PROTOCOL_VERSION}: upgrade substantial"
            )
        return info


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise ValueError(f"expected a string or null, got {value!r}")


def _opt_dict(value: Any) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise ValueError(f"expected an object or null, got {value!r}")


@dataclass(frozen=True, slots=True)
class Event:
    """One event in a run's inbox."""

    event_id: str
    data: bytes
    posted_at: float


@dataclass(frozen=True, slots=True)
class Lease:
    """Who holds a run, and until when (epoch seconds)."""

    run_id: str
    owner: str
    expires_at: float


class Waker:
    """An in-process wake-up signal, usable from any event loop.

    Workers sleep on :meth:`wait`; anything that makes work due calls
    :meth:`notify`. Cross-process signals (sockets, pub/sub, LISTEN) feed the
    same waker, so the worker has one thing to wait on.
    """

    def __init__(self) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        # A notify with nobody waiting (the worker was busy reading the index) is kept
        # for the next wait, which returns at once: a spurious wake-up costs one poll,
        # a lost one costs a whole poll interval.
        self._pending = False

    def notify(self) -> None:
        """Wake every waiter, from any thread."""
        if not self._waiters:
            self._pending = True
            return
        for loop, fut in list(self._waiters):
            if loop.is_closed():
                continue
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is loop:
                if not fut.done():
                    fut.set_result(None)
            else:
                loop.call_soon_threadsafe(_resolve, fut)

    def clear(self) -> None:
        """Forget a kept signal: the caller is about to read the state it announced."""
        self._pending = False

    async def wait(self, timeout: float) -> bool:
        """Sleep until notified or ``timeout`` seconds pass; return True if notified."""
        if self._pending:
            self._pending = False
            return True
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        key = (loop, fut)
        self._waiters.add(key)
        try:
            # Not asyncio.wait_for: on Python 3.11 it can swallow a cancel() that lands in
            # the same loop iteration as the notify, and the worker would never stop.
            async with asyncio.timeout(timeout):
                await fut
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.discard(key)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to deliver into a run's inbox: its unique id and its data."""

    event_id: str
    data: bytes


class DueRuns(list[tuple[str, float]]):
    """Runs due now, ``(run_id, at)`` earliest first, and when the next one is due.

    ``next_at`` is the due time of the earliest run of the index that is not
    in the list (later than ``now``, or beyond ``limit``), or None if there
    is none: how long a worker may sleep without missing work.
    """

    __slots__ = ("next_at",)

    def __init__(self, runs: Any = (), next_at: float | None = None) -> None:
        super().__init__(runs)
        self.next_at = next_at

    def __repr__(self) -> str:
        return f"DueRuns({list(self)!r}, next_at={self.next_at!r})"


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend offers beyond the contract, declared by the backend, read by the engine.

    ``wake_ups``: :meth:`Backend.wait_for_work` returns as soon as any client
    of the store, in any process, makes work due (NOTIFY, pub/sub, sockets);
    without it, other processes' work is found by polling.
    ``shared``: other processes open the same store by its URL (not so for
    an in-process store).
    ``group_commit``: concurrent writes of one process share a round trip
    or a transaction, so many runs' steps cost less than one write each.
    ``server_time``: lease expiry is judged by the store's clock, so
    workers with skewed clocks agree on it.
    ``delete``: :meth:`Backend.delete` removes a run (retention); without
    it, deleting raises :class:`~substantial.errors.Unsupported`.
    ``list_recent``: :meth:`Backend.list_recent` answers from an index in
    creation order, a page at a cost independent of the number of runs;
    without it, the contract's fallback reads every run's metadata (O(n)).
    ``unschedule_idle``: :meth:`Backend.unschedule_idle` takes a run out of
    the due index only if no event waits in its inbox, in one atomic step;
    without it, a worker handing back a run that waits for events alone
    re-reads the inbox after unscheduling it (docs/RELIABILITY.md).
    """

    wake_ups: bool = False
    shared: bool = True
    group_commit: bool = False
    server_time: bool = False
    delete: bool = False
    list_recent: bool = False
    unschedule_idle: bool = False


def encode_json(obj: Any) -> bytes:
    """Encode with orjson; the one JSON encoder backends use for their own records."""
    return orjson.dumps(obj)
