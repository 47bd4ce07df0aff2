"""The s3 backend: the log, the inbox, leases and metadata as objects in one bucket."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from substantial.backends._common import (
    Page,
    ack_ids,
    check_due,
    check_position,
    check_ttl,
    filtered_runs,
    gap_error,
)
from substantial.backends._redact import redact_url
from substantial.backends.base import (
    Backend,
    Capabilities,
    DueRuns,
    Event,
    Lease,
    NewEvent,
    RunInfo,
    validate_id,
)
from substantial.backends.s3._due import DueIndex
from substantial.backends.s3._leases import Leases
from substantial.backends.s3._objects import ObjectStore
from substantial.errors import InvalidArgument, PositionTaken

__all__ = ["POSITION_DIGITS", "S3Backend"]

#: Log positions are zero-padded so that key order is position order.
POSITION_DIGITS = 10

# Per-sender arrival stamps must increase even when two posts share a clock tick.
_stamp_lock = threading.Lock()
_last_stamp = 0.0


def _arrival_stamp() -> float:
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time(), _last_stamp + 1e-6)
        return _last_stamp


def _bool_param(name: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise InvalidArgument(f"{name}={value!r}: use 1/true or 0/false")


def _float_param(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InvalidArgument(f"{name}={value!r}: use a number of seconds") from None


class S3Backend(Backend):
    """Store runs in an S3-compatible bucket, coordinating through conditional writes.

    Endpoint, region and credentials come from the standard AWS chain
    (``AWS_ENDPOINT_URL``, ``AWS_REGION``/``AWS_DEFAULT_REGION``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, config
    files, instance roles); keyword arguments override them. ``path_style``
    defaults to path-style addressing whenever a custom endpoint is set.

    S3 has no notifications, so :meth:`wait_for_work` polls the due index
    with an interval that starts at ``min_poll`` when work arrives and doubles
    up to ``max_poll`` while idle; work made due by this process wakes its
    waiters at once.
    """

    name = "s3"
    capabilities = Capabilities(delete=True, unschedule_idle=True)

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        profile: str | None = None,
        path_style: bool | None = None,
        min_poll: float = 0.05,
        max_poll: float = 2.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 4,
        max_concurrency: int = 32,
    ) -> None:
        super().__init__()
        if not bucket or "/" in bucket:
            raise InvalidArgument(f"invalid bucket name {bucket!r}: use s3://bucket/prefix")
        if (access_key_id is None) != (secret_access_key is None):
            raise InvalidArgument("pass both access_key_id and secret_access_key, or neither")
        if not 0 < min_poll <= max_poll:
            raise InvalidArgument(
                f"min_poll={min_poll} and max_poll={max_poll}: need 0 < min_poll <= max_poll"
            )
        if max_attempts < 1 or max_concurrency < 1:
            raise InvalidArgument("max_attempts and max_concurrency must be at least 1")
        stripped = prefix.strip("/")
        self._objects = ObjectStore(
            bucket,
            f"{stripped}/" if stripped else "",
            endpoint_url=endpoint_url,
            region=region,
            credentials=(access_key_id, secret_access_key, session_token),
            profile=profile,
            path_style=path_style,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            max_concurrency=max_concurrency,
        )
        self.bucket = bucket
        #: Every key this backend writes starts with this (empty, or ending in '/').
        self.key_prefix = self._objects.key_prefix
        self.endpoint_url = endpoint_url
        self.min_poll = min_poll
        self.max_poll = max_poll
        #: Requests sent, by S3 operation, as botocore sends them (each of our retries
        #: counts): the bill, in requests.
        self.requests = self._objects.requests
        # Per run, how many leading log positions are known to hold entries.
        self._log_ends: OrderedDict[str, int] = OrderedDict()
        self._due = DueIndex(self._objects, self.waker, min_poll=min_poll, max_poll=max_poll)
        self._leases = Leases(self._objects, self._lease_key, self._took)

    # -- construction -----------------------------------------------------

    @classmethod
    def from_url(cls, url: str) -> S3Backend:
        """Build from ``s3://[key:secret@]bucket/prefix?endpoint=...&path_style=1``.

        Query parameters: ``endpoint`` (or ``endpoint_url``), ``region``,
        ``profile``, ``path_style``, ``min_poll``, ``max_poll``,
        ``read_timeout``, ``connect_timeout``. Anything not given comes from
        the standard AWS environment and config files.
        """
        parts = urlsplit(url)
        if parts.scheme.lower() != "s3":
            raise InvalidArgument(f"{redact_url(url)!r} is not an s3:// URL")
        userinfo, at, host = parts.netloc.rpartition("@")
        access_key_id = secret_access_key = None
        if at:
            key, colon, secret = userinfo.partition(":")
            if not colon:
                raise InvalidArgument(f"credentials in {redact_url(url)!r} must be key:secret")
            access_key_id, secret_access_key = unquote(key), unquote(secret)
        if not host:
            raise InvalidArgument(f"{redact_url(url)!r} names no bucket: use s3://bucket/prefix")
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        known = {
            "endpoint",
            "endpoint_url",
            "region",
            "profile",
            "path_style",
            "min_poll",
            "max_poll",
            "read_timeout",
            "connect_timeout",
        }
        unknown = sorted(set(query) - known)
        if unknown:
            raise InvalidArgument(
                f"unknown parameter(s) {', '.join(unknown)} in {redact_url(url)!r}: "
                f"use {', '.join(sorted(known))}"
            )
        kwargs: dict[str, Any] = {}
        for name in ("min_poll", "max_poll", "read_timeout", "connect_timeout"):
            if name in query:
                kwargs[name] = _float_param(name, query[name])
        return cls(
            unquote(host),
            unquote(parts.path),
            endpoint_url=query.get("endpoint") or query.get("endpoint_url"),
            region=query.get("region"),
            profile=query.get("profile"),
            path_style=_bool_param("path_style", query["path_style"])
            if "path_style" in query
            else None,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
            **kwargs,
        )

    def describe(self) -> str:
        """Return ``s3://bucket/prefix`` and the endpoint, if not AWS."""
        where = f" at {redact_url(self.endpoint_url)}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.key_prefix}{where}"

    # -- keys -------------------------------------------------------------

    def entry_key(self, run_id: str, position: int) -> str:
        """Return the object key of one log entry."""
        return f"{self.key_prefix}runs/{run_id}/log/{position:0{POSITION_DIGITS}d}"

    def _log_prefix(self, run_id: str) -> str:
        return f"{self.key_prefix}runs/{run_id}/log/"

    def _inbox_prefix(self, run_id: str) -> str:
        return f"{self.key_prefix}runs/{run_id}/inbox/"

    def _lease_key(self, run_id: str) -> str:
        return f"{self.key_prefix}runs/{run_id}/lease"

    def _pointer_key(self, run_id: str) -> str:
        return f"{self.key_prefix}runs/{run_id}/due"

    def _took(self) -> None:
        # Work arrived here: poll fast again.
        self._due.poll_interval = self.min_poll

    def _meta_key(self, run_id: str) -> str:
        return f"{self.key_prefix}meta/{run_id}"

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Create the entry's object with If-None-Match: *; a 412 means the position is taken.

        A position whose predecessor this client has not seen costs one HEAD
        first (the gap check); a worker extending a log it read costs none.
        """
        validate_id("run id", run_id)
        check_position(run_id, position)
        if position > self._log_ends.get(run_id, 0):
            _, etag = await self._objects.head_wid(self.entry_key(run_id, position - 1))
            if not etag:
                raise gap_error(run_id, position)
        if await self._objects.put_if(self.entry_key(run_id, position), bytes(entry)) is None:
            self._saw_log(run_id, position + 1)
            raise PositionTaken(run_id, position)
        self._saw_log(run_id, position + 1)

    def _saw_log(self, run_id: str, end: int) -> None:
        """Remember that positions below ``end`` hold entries (they are never removed)."""
        ends = self._log_ends
        if ends.get(run_id, 0) < end:
            ends[run_id] = end
        ends.move_to_end(run_id)
        if len(ends) > 10_000:
            ends.popitem(last=False)

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """List the run's log from ``start``, then fetch the entries in parallel.

        From a later position, one GET first: the common "anything new?"
        check costs a GET, not a LIST.
        """
        validate_id("run id", run_id)
        check_position(run_id, start, "log start")
        prefix = self._log_prefix(run_id)
        head: list[bytes] = []
        after = None
        if start > 0:
            first = await self._objects.get(self.entry_key(run_id, start))
            if first is None:
                return []
            head = [first.body]
            after = self.entry_key(run_id, start)
        expected = start + len(head)
        keys: list[str] = []
        for item in await self._objects.list_all(prefix, after):
            tail = item.key[len(prefix) :]
            if not tail.isdigit():
                continue
            position = int(tail)
            if position < expected:
                continue
            if position > expected:
                break  # a gap: the log ends before it
            keys.append(item.key)
            expected += 1
        bodies = await self._objects.map(self._objects.get, keys)
        out = head
        for obj in bodies:
            if obj is None:
                break
            out.append(obj.body)
        if out:
            self._saw_log(run_id, start + len(out))
        return out

    # -- the inbox --------------------------------------------------------

    async def _post(self, run_id: str, event: NewEvent) -> bool:
        """Create the event's object with If-None-Match: *, stamped with its arrival time."""
        stored = await self._objects.put_if(
            f"{self._inbox_prefix(run_id)}{event.event_id}",
            bytes(event.data),
            metadata={"posted-at": repr(_arrival_stamp())},
        )
        return stored is not None

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Delete the acknowledged events' objects while listing the inbox; fetch the rest.

        The deletes and the LIST run at once, so acknowledging costs no round
        trip of its own; the listing may still show a key being deleted, and
        those are left out. DELETE requests are free on AWS.
        """
        validate_id("run id", run_id)
        prefix = self._inbox_prefix(run_id)
        acked = set(ack_ids(ack))
        deletes = self._objects.map(self._objects.delete, [f"{prefix}{e}" for e in acked])
        _, items = await asyncio.gather(deletes, self._objects.list_all(prefix))
        items = [item for item in items if item.key[len(prefix) :] not in acked]
        objects = await self._objects.map(self._objects.get, [item.key for item in items])
        events: list[Event] = []
        for item, obj in zip(items, objects, strict=True):
            if obj is None:
                continue  # acknowledged since the listing
            try:
                posted_at = float(obj.metadata["posted-at"])
            except (KeyError, ValueError):
                posted_at = obj.last_modified
            events.append(Event(item.key[len(prefix) :], obj.body, posted_at))
        events.sort(key=lambda e: (e.posted_at, e.event_id))
        return events

    # -- the due index ----------------------------------------------------

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Create the event's object, if any; then move the run's due pointer (or remove it).

        No wake-up for the event itself: the due key wakes this process's
        workers once the run is due (a wake-up before would cost each a LIST
        for nothing).
        """
        at = check_due(run_id, at, event)
        stored = await self._post(run_id, event) if event is not None else False
        if at is None:
            await self._due.unschedule(run_id)
        else:
            await self._due.schedule(run_id, at)
        return stored

    async def unschedule_idle(self, run_id: str) -> bool:
        """Point the run's due pointer at no key unless its inbox lists an event (a CAS)."""
        validate_id("run id", run_id)
        prefix = self._inbox_prefix(run_id)

        async def waiting() -> bool:
            return bool((await self._objects.list_page(prefix, max_keys=1))[0])

        return await self._due.unschedule_idle(run_id, waiting)

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """List the due index up to ``now`` and keep the keys their run's pointer names."""
        return await self._due.due(now, limit)

    # -- leases -----------------------------------------------------------

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read the lease object, or compare-and-swap it on its ETag."""
        validate_id("run id", run_id)
        return await self._leases.op(run_id, owner, check_ttl(ttl), take_from)

    # -- run metadata -----------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Replace the run's metadata object; a PUT is atomic, readers see old or new."""
        validate_id("run id", info.run_id)
        await self._objects.put(self._meta_key(info.run_id), info.to_bytes())

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """List ``meta/`` in key (run id) order and read each run's metadata.

        Filters are applied after reading, so a selective filter reads more
        objects than it returns.
        """
        prefix = f"{self.key_prefix}meta/"

        async def fetch(cursor: str | None, n: int) -> Page:
            start_after = f"{prefix}{cursor}" if cursor is not None else None
            items, truncated, _ = await self._objects.list_page(
                prefix, start_after=start_after, max_keys=n
            )
            found = await self._objects.map(self._objects.get, [item.key for item in items])
            page = [
                (item.key[len(prefix) :], None if obj is None else obj.body)
                for item, obj in zip(items, found, strict=True)
            ]
            return page, truncated

        async def fetch_ids(wanted: list[str]) -> Page:
            found = await self._objects.map(self._objects.get, [f"{prefix}{r}" for r in wanted])
            pairs = zip(wanted, found, strict=True)
            return [(r, None if obj is None else obj.body) for r, obj in pairs], False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=1000 if status or workflow else max(1, min(1000, limit)),
            ids=ids,
            fetch_ids=fetch_ids,
        )

    # -- lifecycle and wake-ups ----------------------------------------------

    # -- retention --------------------------------------------------------

    async def delete(self, run_id: str) -> bool:
        """Leave the due index, delete log entry 0, then the run's other objects, metadata last.

        Without entry 0 the log reads as empty, so no reader ever sees a part
        of it; with the metadata kept to the end, a delete cut short still
        lists and is finished by the next. DELETE requests are free on AWS.
        """
        validate_id("run id", run_id)
        meta = self._meta_key(run_id)
        self._log_ends.pop(run_id, None)
        (_, etag), items, _ = await asyncio.gather(
            self._objects.head_wid(meta),
            self._objects.list_all(f"{self.key_prefix}runs/{run_id}/"),
            self._due.unschedule(run_id),
        )
        first = self.entry_key(run_id, 0)
        await self._objects.delete(first)
        await self._objects.map(self._objects.delete, [i.key for i in items if i.key != first])
        await self._objects.delete(meta)
        self._log_ends.pop(run_id, None)
        return bool(etag or items)

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until woken in-process or a poll finds new due work; False on timeout.

        The poll interval starts at ``min_poll`` when work arrives and doubles
        up to ``max_poll`` while nothing does. Each poll is one LIST request.
        """
        return await self._due.wait_for_work(timeout)

    async def close(self) -> None:
        """Close the HTTP client; the backend is unusable afterwards."""
        self._due.close()
        await self._objects.close()
