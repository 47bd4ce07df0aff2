"""The Backend contract: the few storage primitives everything else is built on.

A backend stores opaque bytes. It knows nothing about workflows; replay,
scheduling policy, lease renewal and compaction live above it. Every
backend passes the same conformance suite (``tests/test_backend_contract.py``).

Guarantees every implementation gives:

* ``append`` is create-if-absent: of many concurrent writers at one position
  exactly one succeeds and the others get :class:`PositionTaken`. No reader
  ever observes a partially written entry, even after a crash mid-write.
* ``post_event`` stores an event once per ``event_id``; the inbox is read in
  arrival order.
* ``due`` answers from a time-ordered index without scanning every run.
* Lease operations are atomic compare-and-set on (owner, expiry). Leases only
  avoid wasted work: correctness comes from ``append``'s fencing.

See docs/PROTOCOL.md for the layout each backend uses.
"""

from __future__ import annotations

import abc
import asyncio
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, NotRequired, TypedDict

import orjson

from substantial.backends._owner import host_owner_is_dead, make_owner
from substantial.errors import CorruptRecord, InvalidArgument, PositionTaken, ProtocolMismatch

__all__ = [
    "PROTOCOL_VERSION",
    "Backend",
    "Durability",
    "ErrorInfo",
    "Event",
    "Lease",
    "RunInfo",
    "RunStatus",
    "Waker",
    "host_owner_is_dead",
    "make_owner",
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


def validate_id(kind: str, value: str) -> str:
    """Check that ``value`` is usable as a run or event id on every backend."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise InvalidArgument(
            f"invalid {kind} {value!r}: use 1-200 characters from A-Z a-z 0-9 _ . : = + -, "
            "not starting with '.', '-', ':', '=' or '+'"
        )
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


class Backend(abc.ABC):
    """Storage for run logs, inboxes, the due index, leases and run metadata.

    All methods are coroutines and may raise :class:`BackendUnavailable`
    when the store cannot be reached; writes that raise it either did not
    happen or can be retried as they are.
    """

    #: Short name used in URLs, logs and benchmarks.
    name: str = "abstract"

    def __init__(self) -> None:
        self.waker = Waker()

    # -- the log ----------------------------------------------------------

    @abc.abstractmethod
    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store ``entry`` at ``position`` of the run's log if that position is free.

        An entry is one atomic unit holding one or more records. Raises
        :class:`PositionTaken` if the position already holds an entry; the
        stored entry is left untouched. Concurrent callers at one position:
        exactly one succeeds.
        """

    @abc.abstractmethod
    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Return the entries at ``start``, ``start+1``, ... up to the first free position."""

    # -- the inbox --------------------------------------------------------

    @abc.abstractmethod
    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add an event to the run's inbox unless ``event_id`` is already there.

        Returns True if stored now, False if an event with that id was
        already in the inbox (the stored one is kept).
        """

    @abc.abstractmethod
    async def read_inbox(self, run_id: str) -> list[Event]:
        """Return the run's pending events in arrival order."""

    @abc.abstractmethod
    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Remove events from the inbox once the log has recorded them; unknown ids are ignored."""

    # -- the due index ----------------------------------------------------

    @abc.abstractmethod
    async def schedule(self, run_id: str, at: float) -> None:
        """Set the time (epoch seconds) at which the run is next due, replacing any earlier one."""

    @abc.abstractmethod
    async def unschedule(self, run_id: str) -> None:
        """Remove the run from the due index (it waits for an event, or it ended)."""

    @abc.abstractmethod
    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Return up to ``limit`` ``(run_id, at)`` with ``at <= now``, earliest first."""

    @abc.abstractmethod
    async def next_due_at(self) -> float | None:
        """Return the earliest scheduled time in the index, or None if it is empty."""

    # -- leases -----------------------------------------------------------

    @abc.abstractmethod
    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take the run's lease for ``ttl`` seconds.

        Succeeds if no lease exists, it has expired, it is already held by
        ``owner`` (a renewal), or it is held by ``steal_from``. Atomic.
        """

    @abc.abstractmethod
    async def release_lease(self, run_id: str, owner: str) -> None:
        """Drop the lease if ``owner`` holds it; otherwise do nothing."""

    @abc.abstractmethod
    async def get_lease(self, run_id: str) -> Lease | None:
        """Return the current lease, expired or not, or None."""

    # -- run metadata -----------------------------------------------------

    @abc.abstractmethod
    async def put_run(self, info: RunInfo) -> None:
        """Create or replace the run's metadata (atomically: readers see old or new)."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunInfo | None:
        """Return the run's metadata, or None if there is no such run."""

    @abc.abstractmethod
    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """Return runs ordered by run id, after the id ``after``, filtered by status/workflow."""

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until something may have become due, or ``timeout`` seconds pass.

        Backends with a cross-process signal feed it into ``self.waker``;
        the fallback is a plain timed sleep (polling).
        """
        return await self.waker.wait(timeout)

    async def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release connections and files; the backend is unusable afterwards."""

    # -- shared helpers built on the primitives ---------------------------

    async def create_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool:
        """Write a new run's first entry, metadata and schedule; False if it existed.

        The first entry at position 0 is the fence: of two starts with one
        run id, one wins. A start that crashed half-way is completed by a
        retry with the same id. Backends with transactions override this to
        do all three at once.
        """
        validate_id("run id", info.run_id)
        try:
            await self.append(info.run_id, 0, entry)
        except PositionTaken:
            existing = await self.get_run(info.run_id)
            if existing is None:
                await self.put_run(info)
                await self.schedule(info.run_id, due_at)
            elif existing.status == "active" and not await self.read_log(info.run_id, 1):
                # A start that died between metadata and schedule: nothing has run, and
                # with no due entry nothing would. Scheduling it again is at worst a wake-up.
                await self.schedule(info.run_id, due_at)
            return False
        await self.put_run(info)
        await self.schedule(info.run_id, due_at)
        return True

    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Post an event and make the run due now, so a worker picks it up."""
        stored = await self.post_event(run_id, event_id, data)
        await self.schedule(run_id, time.time())
        return stored

    async def try_lease(self, run_id: str, owner: str, ttl: float) -> bool:
        """Take the lease, or take it over from a dead process on this host."""
        if await self.acquire_lease(run_id, owner, ttl):
            return True
        lease = await self.get_lease(run_id)
        if lease is not None and lease.owner != owner and host_owner_is_dead(lease.owner):
            return await self.acquire_lease(run_id, owner, ttl, steal_from=lease.owner)
        return False

    def describe(self) -> str:
        """Return a short human-readable description, e.g. for the CLI."""
        return self.name


def encode_json(obj: Any) -> bytes:
    """Encode with orjson; the one JSON encoder backends use for their own records."""
    return orjson.dumps(obj)
