"""S3-compatible object storage: durable execution with nothing but a bucket.

Works on AWS S3 and on any server with S3's conditional writes (PutObject
with ``If-None-Match: *`` and ``If-Match: <etag>``): Cloudflare R2, MinIO,
SeaweedFS, GCS's S3 API. Workers coordinate through the bucket alone.

Layout under the key prefix ``p`` (see docs/PROTOCOL.md, "S3 layout")::

    p/runs/<run>/log/<position, 10 digits>   one entry; PUT If-None-Match: *
    p/runs/<run>/inbox/<event id>            one event; PUT If-None-Match: *
    p/runs/<run>/lease                       {"owner", "expires_at", "wid"}; If-Match CAS
    p/runs/<run>/due                         {"key", "at"}: names the run's live due key; CAS
    p/due/<µs, 17 digits>!<run>!<wid>        empty; the time-ordered due index
    p/meta/<run>                             RunInfo JSON; plain PUT

Rules that make it correct on a store with no transactions:

* Every conditional write carries a fresh write id (``wid``) in its metadata,
  and objects replaced by compare-and-swap carry one in their body too, so
  equal content never yields an equal ETag and a stale compare-and-swap
  cannot succeed after A→B→A.
* A lost race (412, 409 ``ConditionalRequestConflict``, 404 on If-Match) is a
  lost race: :class:`PositionTaken` or ``False``, never a retry that
  overwrites. Since HTTP clients resend a PUT whose reply was lost, a 412 is
  first checked against the stored write id: it may be our own write.
* Every PUT carries Content-MD5, so a body cut short never lands.
* The due index is one key per schedule call, named by time, so listing
  ``p/due/`` up to now finds due runs without touching any other run. A
  per-run pointer object names the live key; keys it does not name are
  leftovers of a crash or a concurrent reschedule and are skipped, then
  deleted once old.
* No object is rewritten by every worker: the hot path has no shared hot key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import secrets
import threading
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import orjson

from substantial.backends import _hostile
from substantial.backends._redact import redact_url
from substantial.backends.base import Backend, Event, Lease, RunInfo, validate_id
from substantial.errors import BackendError, BackendUnavailable, InvalidArgument, PositionTaken

try:
    import aiohttp
    from aiobotocore.config import AioConfig
    from aiobotocore.session import AioSession
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        IncompleteReadError,
        NoCredentialsError,
        NoRegionError,
        ProfileNotFound,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError as BotoHTTPClientError
except ImportError as _exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the s3 backend needs aiobotocore: pip install 'substantial[s3]'") from _exc

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["S3Backend"]

T = TypeVar("T")

#: Log positions are zero-padded so that key order is position order.
POSITION_DIGITS = 10
#: Due times are integer microseconds since the epoch, zero-padded (good until year 5138).
TIME_DIGITS = 17
#: Sorts below every character allowed in ids, so key order is (time, run id) order
#: on every server: '/' would not be, as servers differ in how they order it.
SEP = "!"
#: A due key that its run's pointer does not name, older than this (server clock), is
#: deleted. Younger ones may belong to a schedule call that has not written its pointer yet.
ORPHAN_GRACE = 60.0
#: How long a due key checked against its pointer is trusted before it is checked again.
VALID_TTL = 30.0
#: How far before the last due() call a poll looks for keys that landed late.
PEEK_LOOKBACK = 60.0
#: How long next_due_at() may answer from the listing of the last due() call.
HEAD_TTL = 1.0

_CONFLICT_STATUSES = frozenset({404, 409, 412})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        # The body was damaged or cut short on the way: nothing was stored.
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "ServiceUnavailable",
        "BadGateway",
        "GatewayTimeout",
    }
)
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
    }
)
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BotoConnectionError,
    BotoHTTPClientError,
    IncompleteReadError,
    # A response body cut short surfaces from aiohttp itself, not wrapped by botocore.
    aiohttp.ClientError,
    TimeoutError,
    OSError,
)

# Per-sender arrival stamps must increase even when two posts share a clock tick.
_stamp_lock = threading.Lock()
_last_stamp = 0.0

# Backends of this process by store, so a client that makes work due wakes a worker
# sharing its process at once instead of at its next poll.
_LOCAL: dict[str, weakref.WeakSet[S3Backend]] = {}

# Endpoints and buckets whose conditional writes this process has seen refuse to overwrite.
_VERIFIED: set[str] = set()

# A botocore session loads the S3 model (~60 ms); share one per event loop and profile.
# Not across loops: refreshable credentials hold asyncio locks.
_SESSIONS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str | None, AioSession]] = (
    weakref.WeakKeyDictionary()
)


def _session(profile: str | None) -> AioSession:
    sessions = _SESSIONS.setdefault(asyncio.get_running_loop(), {})
    session = sessions.get(profile)
    if session is None:
        session = sessions[profile] = AioSession(profile=profile)
    return session


def _arrival_stamp() -> float:
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time(), _last_stamp + 1e-6)
        return _last_stamp


def _wid() -> str:
    return secrets.token_hex(8)


def _content_md5(body: bytes) -> str:
    # Sent with every PUT so the server refuses a body that did not arrive whole. Without
    # it, SeaweedFS 4.x stores an *empty* object when a client that sent
    # "Expect: 100-continue" dies before its body, and that object passes If-None-Match.
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


def _us(at: float) -> int:
    return max(0, int(at * 1_000_000))


class _Rejected(Exception):
    """A request the server refused on purpose: a precondition or a missing key."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code


@dataclass(frozen=True, slots=True)
class _Object:
    body: bytes
    etag: str
    metadata: dict[str, str]
    last_modified: float


@dataclass(frozen=True, slots=True)
class _Listed:
    key: str
    last_modified: float


@dataclass(frozen=True, slots=True)
class _DueKey:
    key: str
    name: str
    at_us: int
    run_id: str
    last_modified: float


@dataclass(frozen=True, slots=True)
class _LeaseState:
    etag: str
    owner: str | None
    expires_at: float
    #: The stored object could not be read: it counts as expired, release removes it.
    unreadable: bool = False


@dataclass(frozen=True, slots=True)
class _Pointer:
    etag: str
    name: str | None
    at: float


def _takable(state: _LeaseState, owner: str, steal_from: str | None, now: float) -> bool:
    return (
        state.owner is None
        or state.expires_at <= now
        or state.owner == owner
        or (steal_from is not None and state.owner == steal_from)
    )


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
        self.bucket = bucket
        stripped = prefix.strip("/")
        #: Every key this backend writes starts with this (empty, or ending in '/').
        self.key_prefix = f"{stripped}/" if stripped else ""
        self.endpoint_url = endpoint_url
        self.min_poll = min_poll
        self.max_poll = max_poll
        #: Requests sent, by S3 operation, as botocore sends them (each of our retries
        #: counts): the bill, in requests.
        self.requests: Counter[str] = Counter()
        self._region = region
        self._credentials = (access_key_id, secret_access_key, session_token)
        self._profile = profile
        configured = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        self._path_style = path_style if path_style is not None else bool(configured)
        self._server_id = f"{configured or 'aws'}|{bucket}"
        self._store_id = f"{self._server_id}|{self.key_prefix}"
        self._timeouts = (connect_timeout, read_timeout)
        self._attempts = max_attempts
        self._limit = max_concurrency
        self._client: S3Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock: asyncio.Lock | None = None
        self._sem: asyncio.Semaphore | None = None
        self._closed = False
        self._leases: OrderedDict[str, _LeaseState] = OrderedDict()
        # Due keys that cannot be parsed, to delete at the next due() or next_due_at().
        self._junk: set[str] = set()
        # Due keys checked against their run's pointer: key -> (exact time, checked at).
        self._valid: dict[str, tuple[float, float]] = {}
        # Due keys the last due() call returned, and when it ran: what a poll need not report.
        self._returned: set[str] = set()
        # (now in µs, server time) of the last due() call; a poll reports only what is newer.
        self._checked: tuple[int, float] = (0, 0.0)
        self._poll_interval = min_poll
        self._due_hint: float | None = None
        # What the last due() listing showed of the index's head, for next_due_at():
        # (taken at, server time, earliest valid time, first future key, saw the end).
        self._head: tuple[float, float, float | None, _DueKey | None, bool] | None = None
        _LOCAL.setdefault(self._store_id, weakref.WeakSet()).add(self)

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

    def _meta_key(self, run_id: str) -> str:
        return f"{self.key_prefix}meta/{run_id}"

    @property
    def _due_prefix(self) -> str:
        return f"{self.key_prefix}due/"

    def _parse_due(self, item: _Listed) -> _DueKey | None:
        name = item.key[len(self._due_prefix) :]
        parts = name.split(SEP)
        if (
            len(parts) != 3
            or not (parts[0].isascii() and parts[0].isdigit())
            or not _hostile.is_valid_id(parts[1])
        ):
            # Not a key any worker can act on: skip it rather than fail every worker,
            # and have the next due() or next_due_at() delete it.
            self._junk.add(item.key)
            return None
        return _DueKey(item.key, name, int(parts[0]), parts[1], item.last_modified)

    async def _drop_junk(self) -> None:
        """Delete the due keys _parse_due could not read; a run whose live key it was is due now."""
        junk, self._junk = self._junk, set()
        for key in junk:
            name = key[len(self._due_prefix) :]
            run_id = name.split(SEP)[1] if name.count(SEP) == 2 else ""
            live = False
            if _hostile.is_valid_id(run_id):
                pointer = await self._read_pointer(run_id)
                live = pointer is not None and pointer.name == name
            action = "scheduling its run now" if live else "removing it from the due index"
            _hostile.warn_once(self, "due entry", name, "not <time>!<run id>!<id>", action)
            await self._delete(key)
            if live:
                await self.schedule(run_id, time.time())

    # -- the client and the one place driver errors are translated ----------

    async def _open(self) -> S3Client:
        if self._client is not None:
            return self._client
        if self._closed:
            raise BackendError(f"{self.describe()} is closed: open a new backend")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._client is None:
                self._client = await self._create_client()
        return self._client

    async def _create_client(self) -> S3Client:
        try:
            session = _session(self._profile)
            region = (
                self._region
                or os.environ.get("AWS_REGION")
                or session.get_config_variable("region")
                # Local servers ignore the region, but SigV4 needs one.
                or "us-east-1"
            )
            config = AioConfig(
                region_name=region,
                connect_timeout=self._timeouts[0],
                read_timeout=self._timeouts[1],
                # Retries are ours (_call): bounded, and aware that a retried
                # conditional write may have landed the first time.
                retries={"total_max_attempts": 1},
                max_pool_connections=max(64, 2 * self._limit),
                s3={"addressing_style": "path" if self._path_style else "auto"},
                # Third-party servers choke on the newer default checksum trailers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            key, secret, token = self._credentials
            stack = contextlib.AsyncExitStack()
            client: S3Client = await stack.enter_async_context(
                session.create_client(
                    "s3",
                    endpoint_url=self.endpoint_url,
                    aws_access_key_id=key,
                    aws_secret_access_key=secret,
                    aws_session_token=token,
                    config=config,
                )
            )
        except (ProfileNotFound, NoRegionError, ValueError) as exc:
            raise BackendError(
                f"cannot configure the S3 client for {self.describe()}: {exc}"
            ) from exc
        client.meta.events.register("before-send.s3", self._count_request)
        self._stack = stack
        return client

    def _count_request(self, event_name: str, **_: Any) -> None:
        self.requests[event_name.rsplit(".", 1)[-1]] += 1

    async def _call(self, op: str, key: str, fn: Callable[[S3Client], Awaitable[T]]) -> T:
        """Run one S3 request with bounded retries, translating every driver error.

        Raises :class:`_Rejected` for 404/409/412 (the caller decides what a
        missing key or a failed precondition means), :class:`BackendUnavailable`
        when the store cannot be reached, and :class:`BackendError` otherwise.
        """
        client = await self._open()
        where = f"s3://{self.bucket}/{key}"
        delay = 0.05
        for attempt in range(1, self._attempts + 1):
            try:
                return await fn(client)
            except ClientError as exc:
                error = exc.response.get("Error", {})
                code = str(error.get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code == "NoSuchBucket":
                    raise BackendError(
                        f"bucket {self.bucket!r} does not exist"
                        f"{' at ' + self.endpoint_url if self.endpoint_url else ''}: create it, "
                        "or fix the bucket name in the URL"
                    ) from exc
                if status in _CONFLICT_STATUSES:
                    raise _Rejected(status, code) from exc
                if code == "RequestTimeTooSkewed":
                    raise BackendError(
                        f"{op} on {where} was refused: this machine's clock is off by more than "
                        "15 minutes from the server's; fix the clock (NTP)"
                    ) from exc
                if status == 403 or code in _AUTH_CODES:
                    raise BackendError(
                        f"{op} on {where} was denied ({code or status}): check the credentials "
                        "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) and the bucket policy"
                    ) from exc
                if status == 501 or code == "NotImplemented":
                    raise BackendError(
                        f"the server at {self.endpoint_url or 'AWS'} does not implement {op} as "
                        f"used here ({error.get('Message', code)}); substantial needs conditional "
                        "writes (PutObject with If-None-Match and If-Match)"
                    ) from exc
                transient = status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
                if not transient:
                    raise BackendError(
                        f"{op} on {where} failed: {code or status}: {error.get('Message', '')}"
                    ) from exc
                last: BaseException = exc
            except NoCredentialsError as exc:
                raise BackendError(
                    f"no AWS credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or put key:secret@ in the URL"
                ) from exc
            except _TRANSIENT_ERRORS as exc:
                last = exc
            except BotoCoreError as exc:
                raise BackendError(f"{op} on {where} failed: {exc}") from exc
            if attempt < self._attempts:
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay *= 4
        raise BackendUnavailable(
            f"S3 at {self.endpoint_url or 'AWS'} did not complete {op} on {where} after "
            f"{self._attempts} attempts ({type(last).__name__}: {last}); check that the server "
            "is up and reachable. The operation can be retried as it is."
        ) from last

    async def _gather(self, items: Iterable[Awaitable[T]]) -> list[T]:
        # Bounded, so a long log or a big due page does not open hundreds of connections.
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._limit)
        sem = self._sem

        async def one(aw: Awaitable[T]) -> T:
            async with sem:
                return await aw

        return list(await asyncio.gather(*(one(aw) for aw in items)))

    # -- object primitives -------------------------------------------------

    async def _get(self, key: str) -> _Object | None:
        async def fn(client: S3Client) -> _Object:
            resp = await client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return _Object(
                data, resp["ETag"], dict(resp.get("Metadata", {})), resp["LastModified"].timestamp()
            )

        try:
            return await self._call("GetObject", key, fn)
        except _Rejected as rej:
            if rej.status == 404:
                return None
            raise BackendError(f"GetObject on {key} was refused: {rej}") from rej

    async def _head_wid(self, key: str) -> tuple[str | None, str]:
        """Return the write id and ETag of the object now at ``key``."""

        async def fn(client: S3Client) -> tuple[str | None, str]:
            resp = await client.head_object(Bucket=self.bucket, Key=key)
            return resp.get("Metadata", {}).get("wid"), resp["ETag"]

        try:
            return await self._call("HeadObject", key, fn)
        except _Rejected:
            return None, ""

    async def _put(self, key: str, body: bytes) -> str:
        async def fn(client: S3Client) -> str:
            resp = await client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentMD5=_content_md5(body)
            )
            return resp["ETag"]

        try:
            return await self._call("PutObject", key, fn)
        except _Rejected as rej:
            raise BackendError(f"PutObject on {key} was refused: {rej}") from rej

    async def _put_if(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str | None = None,
        metadata: dict[str, str] | None = None,
        wid: str | None = None,
    ) -> str | None:
        """Write conditionally; return the new ETag if this write won, None if it lost.

        Without ``if_match`` the write is create-if-absent (If-None-Match: *).
        ``wid`` goes into the object's metadata: it tells a retry whose first
        attempt landed from a write by someone else.
        """
        if self._server_id not in _VERIFIED:
            await self._verify_conditional_writes()
        wid = wid or _wid()
        meta = {**(metadata or {}), "wid": wid}
        md5 = _content_md5(body)

        async def fn(client: S3Client) -> str:
            if if_match is None:
                resp = await client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentMD5=md5,
                    Metadata=meta,
                    IfNoneMatch="*",
                )
            else:
                resp = await client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentMD5=md5,
                    Metadata=meta,
                    IfMatch=if_match,
                )
            return resp["ETag"]

        for conflict in range(3):
            try:
                return await self._call("PutObject", key, fn)
            except _Rejected as rej:
                if rej.status == 404:
                    return None  # If-Match on a missing key
                # A 412 may answer a resend of our own write whose reply was lost: ours
                # (after a timeout) or the HTTP client's (aiohttp silently resends a PUT
                # when a kept-alive connection drops). Only the write id can tell.
                stored_wid, etag = await self._head_wid(key)
                if stored_wid == wid:
                    return etag
                if rej.status == 409 and if_match is None and stored_wid is None and conflict < 2:
                    # A concurrent write to the key was in flight and the key is still
                    # free: a create-if-absent cannot overwrite, so ask again.
                    await asyncio.sleep(0.02 * (conflict + 1))
                    continue
                return None
        return None  # pragma: no cover - the loop always returns

    async def _verify_conditional_writes(self) -> None:
        """Refuse a server that ignores If-None-Match or If-Match instead of enforcing them.

        Such a server would let two workers both "win" a log position. Checked
        once per process, endpoint and bucket, before the first conditional
        write (read-only clients never write the probe).
        """
        key = f"{self.key_prefix}.probe/{_wid()}"
        body = b"probe"
        md5 = _content_md5(body)

        async def create(client: S3Client) -> None:
            await client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5, IfNoneMatch="*"
            )

        async def replace(client: S3Client) -> None:
            await client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentMD5=md5, IfMatch='"0"'
            )

        where = self.endpoint_url or "AWS"
        try:
            await self._call("PutObject", key, create)
            for kind, attempt in (("If-None-Match: *", create), ("If-Match", replace)):
                try:
                    await self._call("PutObject", key, attempt)
                except _Rejected:
                    continue
                raise BackendError(
                    f"the S3 server at {where} ignores {kind} on PutObject: it overwrote an "
                    "object that the condition protects. substantial needs conditional "
                    "writes to keep two workers from extending one run; use a server that "
                    "enforces them (AWS S3, R2, MinIO, SeaweedFS)"
                )
        except _Rejected as rej:
            raise BackendError(f"could not check conditional writes at {where}: {rej}") from rej
        finally:
            await self._delete(key)
        _VERIFIED.add(self._server_id)

    async def _delete(self, key: str) -> None:
        async def fn(client: S3Client) -> None:
            await client.delete_object(Bucket=self.bucket, Key=key)

        with contextlib.suppress(_Rejected):
            await self._call("DeleteObject", key, fn)

    async def _list_page(
        self, prefix: str, *, start_after: str | None = None, max_keys: int = 1000
    ) -> tuple[list[_Listed], bool, float]:
        """List one page of keys in key order: (items, truncated, server time)."""

        async def fn(client: S3Client) -> tuple[list[_Listed], bool, float]:
            if start_after is None:
                resp = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, MaxKeys=max_keys
                )
            else:
                resp = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, MaxKeys=max_keys, StartAfter=start_after
                )
            items = [
                _Listed(o["Key"], o["LastModified"].timestamp())
                for o in resp.get("Contents", [])
                if not o["Key"].endswith("/")  # directory markers some servers list
            ]
            date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
            try:
                server_now = parsedate_to_datetime(date).timestamp() if date else time.time()
            except (TypeError, ValueError):
                server_now = time.time()
            return items, bool(resp.get("IsTruncated")), server_now

        try:
            return await self._call("ListObjectsV2", prefix, fn)
        except _Rejected as rej:
            raise BackendError(f"ListObjectsV2 on {prefix} was refused: {rej}") from rej

    async def _list_all(self, prefix: str, start_after: str | None = None) -> list[_Listed]:
        out: list[_Listed] = []
        while True:
            items, truncated, _ = await self._list_page(prefix, start_after=start_after)
            out.extend(items)
            if not truncated or not items:
                return out
            start_after = items[-1].key

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Create the entry's object with If-None-Match: *; a 412 means the position is taken."""
        validate_id("run id", run_id)
        if position < 0:
            raise InvalidArgument(f"position {position} of run {run_id!r} is negative")
        if await self._put_if(self.entry_key(run_id, position), bytes(entry)) is None:
            raise PositionTaken(run_id, position)

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """List the run's log from ``start``, then fetch the entries in parallel.

        From a later position, one GET first: the common "anything new?"
        check costs a GET, not a LIST.
        """
        validate_id("run id", run_id)
        start = max(0, start)
        prefix = self._log_prefix(run_id)
        head: list[bytes] = []
        after = None
        if start > 0:
            first = await self._get(self.entry_key(run_id, start))
            if first is None:
                return []
            head = [first.body]
            after = self.entry_key(run_id, start)
        expected = start + len(head)
        keys: list[str] = []
        for item in await self._list_all(prefix, after):
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
        bodies = await self._gather(self._get(k) for k in keys)
        out = head
        for obj in bodies:
            if obj is None:
                break
            out.append(obj.body)
        return out

    # -- the inbox --------------------------------------------------------

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Create the event's object with If-None-Match: *, stamped with its arrival time."""
        validate_id("run id", run_id)
        validate_id("event id", event_id)
        stamp = _arrival_stamp()
        stored = await self._put_if(
            f"{self._inbox_prefix(run_id)}{event_id}",
            bytes(data),
            metadata={"posted-at": repr(stamp)},
        )
        # No wake-up here: send_event() schedules the run next, and that wakes workers
        # once the run is due (waking them now would cost each a LIST for nothing).
        return stored is not None

    async def read_inbox(self, run_id: str) -> list[Event]:
        """List the run's inbox, fetch the events and order them by arrival stamp."""
        validate_id("run id", run_id)
        prefix = self._inbox_prefix(run_id)
        items = await self._list_all(prefix)
        objects = await self._gather(self._get(item.key) for item in items)
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

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Delete the events' objects (DELETE requests are free on AWS)."""
        validate_id("run id", run_id)
        prefix = self._inbox_prefix(run_id)
        ids = [e for e in dict.fromkeys(event_ids) if isinstance(e, str) and _is_valid_id(e)]
        await self._gather(self._delete(f"{prefix}{e}") for e in ids)

    # -- the due index ----------------------------------------------------

    async def _read_pointer(self, run_id: str) -> _Pointer | None:
        obj = await self._get(self._pointer_key(run_id))
        if obj is None:
            return None
        try:
            data = orjson.loads(obj.body)
            name = data.get("key")
            return _Pointer(obj.etag, name if isinstance(name, str) else None, float(data["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            # Written only by us; if damaged, the next schedule replaces it.
            return _Pointer(obj.etag, None, 0.0)

    async def schedule(self, run_id: str, at: float) -> None:
        """Put a new due key, move the run's pointer to it (CAS), then delete the old key.

        Each move of the pointer is one successful compare-and-swap, and the
        writer that made it deletes the key it replaced, so concurrent
        schedules leave exactly one key. A schedule that loses the CAS was
        overlapped by one that won: it takes effect just before the winner
        (which replaces it), deletes its own key, and returns. A crash in
        between leaves an extra key that no pointer names: due() skips it and
        deletes it once it is older than ORPHAN_GRACE.
        """
        validate_id("run id", run_id)
        name = f"{_us(at):0{TIME_DIGITS}d}{SEP}{run_id}{SEP}{_wid()}"
        key = f"{self._due_prefix}{name}"
        # The key name holds a fresh write id, so the pointer's body (and ETag) is unique.
        body = orjson.dumps({"key": name, "at": at})
        started = time.monotonic()
        old, _ = await asyncio.gather(self._read_pointer(run_id), self._put(key, b""))
        won = await self._put_if(
            self._pointer_key(run_id), body, if_match=old.etag if old else None
        )
        if won is None:
            await self._delete(key)
            return
        if time.monotonic() - started > ORPHAN_GRACE / 2:
            # So slow that another worker may have collected our key as an orphan: put it back.
            await self._put(key, b"")
        old_key = f"{self._due_prefix}{old.name}" if old and old.name else None
        checked = time.monotonic()
        for backend in self._local_peers():
            # Known valid here and now: spare every worker of this process a GET.
            backend._valid[key] = (at, checked)
            if old_key is not None:
                backend._valid.pop(old_key, None)
        if old_key is not None and old_key != key:
            await self._delete(old_key)
        self._note_local_schedule(at)

    async def unschedule(self, run_id: str) -> None:
        """Delete the run's pointer and the due key it names."""
        validate_id("run id", run_id)
        self._forget_heads()
        old = await self._read_pointer(run_id)
        if old is None:
            return
        deletes = [self._delete(self._pointer_key(run_id))]
        if old.name is not None:
            old_key = f"{self._due_prefix}{old.name}"
            for backend in self._local_peers():
                backend._valid.pop(old_key, None)
            deletes.append(self._delete(old_key))
        await asyncio.gather(*deletes)

    async def _validate(self, candidates: list[_DueKey], server_now: float) -> dict[str, float]:
        """Return {key: exact time} of the candidates their run's pointer names.

        Keys checked recently are trusted without a request; the others cost
        one GET of their run's pointer. Orphans past the grace time are deleted.
        """
        now_mono = time.monotonic()
        valid: dict[str, float] = {}
        unknown: list[_DueKey] = []
        for c in candidates:
            cached = self._valid.get(c.key)
            if cached is not None and now_mono - cached[1] < VALID_TTL:
                valid[c.key] = cached[0]
            else:
                unknown.append(c)
        if unknown:
            run_ids = list(dict.fromkeys(c.run_id for c in unknown))
            pointers = dict(
                zip(
                    run_ids, await self._gather(self._read_pointer(r) for r in run_ids), strict=True
                )
            )
            orphans: list[str] = []
            for c in unknown:
                pointer = pointers[c.run_id]
                if pointer is not None and pointer.name == c.name:
                    valid[c.key] = pointer.at
                    self._valid[c.key] = (pointer.at, now_mono)
                else:
                    self._valid.pop(c.key, None)
                    if server_now - c.last_modified > ORPHAN_GRACE:
                        orphans.append(c.key)
            if orphans:
                await self._gather(self._delete(k) for k in orphans)
        if len(self._valid) > 100_000:
            self._valid = {k: v for k, v in self._valid.items() if now_mono - v[1] < VALID_TTL}
        return valid

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """List the due index up to ``now`` and keep the keys their run's pointer names."""
        now_us = _us(now)
        out: list[tuple[str, float]] = []
        returned: set[str] = set()
        start_after: str | None = None
        first_page = True
        self._head = None
        while len(out) < limit:
            items, truncated, server_now = await self._list_page(
                self._due_prefix, start_after=start_after, max_keys=min(1000, limit + 16)
            )
            if first_page:
                # What a later poll compares against to tell new due keys from known ones.
                self._checked = (now_us, server_now)
                first_page = False
            keys = [k for k in map(self._parse_due, items) if k is not None]
            ready = [k for k in keys if k.at_us <= now_us]
            valid = await self._validate(ready, server_now) if ready else {}
            for k in ready:
                at = valid.get(k.key)
                if at is not None and at <= now and len(out) < limit:
                    out.append((k.run_id, at))
                    returned.add(k.key)
            if len(ready) < len(keys):
                future = keys[len(ready)]
                self._due_hint = future.at_us / 1_000_000
                self._remember_head(out, future, server_now, seen_end=True)
                break
            if not truncated or not items:
                self._remember_head(out, None, server_now, seen_end=not truncated)
                break
            start_after = items[-1].key
        self._returned = returned
        if self._junk:
            await self._drop_junk()
        return out

    def _remember_head(
        self,
        out: list[tuple[str, float]],
        future: _DueKey | None,
        server_now: float,
        *,
        seen_end: bool,
    ) -> None:
        first = out[0][1] if out else None
        self._head = (time.monotonic(), server_now, first, future, seen_end)

    async def next_due_at(self) -> float | None:
        """Return the time of the first due key its run's pointer names."""
        found = await self._next_due_at()
        if self._junk:
            await self._drop_junk()
        return found

    async def _next_due_at(self) -> float | None:
        """Return the time of the first due key its run's pointer names.

        Right after due() (within HEAD_TTL, with no schedule change made in
        this process since), that call's listing answers: a worker asks both
        in a row, and a LIST costs as much as a PUT.
        """
        head, self._head = self._head, None
        if head is not None and time.monotonic() - head[0] < HEAD_TTL:
            _, server_now, first_valid, future, seen_end = head
            if first_valid is not None:
                return first_valid
            if future is None and seen_end:
                return None
            if future is not None:
                valid = await self._validate([future], server_now)
                if future.key in valid:
                    return valid[future.key]
        start_after: str | None = None
        while True:
            items, truncated, server_now = await self._list_page(
                self._due_prefix, start_after=start_after, max_keys=64
            )
            keys = [k for k in map(self._parse_due, items) if k is not None]
            for i in range(0, len(keys), 8):
                chunk = keys[i : i + 8]
                valid = await self._validate(chunk, server_now)
                for k in chunk:
                    if k.key in valid:
                        return valid[k.key]
            if not truncated or not items:
                return None
            start_after = items[-1].key

    # -- leases -----------------------------------------------------------

    def _remember_lease(self, run_id: str, state: _LeaseState | None) -> None:
        if state is None:
            self._leases.pop(run_id, None)
            return
        self._leases[run_id] = state
        self._leases.move_to_end(run_id)
        if len(self._leases) > 10_000:
            self._leases.popitem(last=False)

    async def _read_lease(self, run_id: str) -> _LeaseState | None:
        obj = await self._get(self._lease_key(run_id))
        if obj is None:
            self._remember_lease(run_id, None)
            return None
        try:
            data = orjson.loads(obj.body)
            owner, expires_at = data.get("owner"), data.get("expires_at")
        except (orjson.JSONDecodeError, AttributeError):
            owner = expires_at = None
        if owner is None and expires_at == 0.0:
            state = _LeaseState(obj.etag, None, 0.0)  # released
        elif _hostile.lease_or_none(run_id, owner, expires_at) is not None:
            state = _LeaseState(obj.etag, owner, float(expires_at))
        else:
            # Unreadable: free to take, by CAS over it like any other lease.
            _hostile.warn_once(self, "lease", run_id, f"{obj.body[:80]!r}", "reading it as expired")
            state = _LeaseState(obj.etag, None, 0.0, unreadable=True)
        self._remember_lease(run_id, state)
        return state

    async def _write_lease(
        self, run_id: str, owner: str | None, expires_at: float, if_match: str | None
    ) -> bool:
        wid = _wid()
        body = orjson.dumps({"owner": owner, "expires_at": expires_at, "wid": wid})
        etag = await self._put_if(self._lease_key(run_id), body, if_match=if_match, wid=wid)
        if etag is None:
            self._remember_lease(run_id, None)
            return False
        self._remember_lease(run_id, _LeaseState(etag, owner, expires_at))
        return True

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take the lease by CAS on the lease object's ETag.

        A renewal by the holder costs one PUT (the ETag is remembered); a take
        costs a GET and a PUT.
        """
        validate_id("run id", run_id)
        now = time.time()
        known = self._leases.get(run_id)
        if (
            known is not None
            and _takable(known, owner, steal_from, now)
            and await self._write_lease(run_id, owner, now + ttl, known.etag)
        ):
            self._took(known.owner, owner)
            return True
        current = await self._read_lease(run_id)
        if current is not None and not _takable(current, owner, steal_from, time.time()):
            return False
        etag = current.etag if current is not None else None
        if await self._write_lease(run_id, owner, now + ttl, etag):
            self._took(current.owner if current else None, owner)
            return True
        return False

    def _took(self, previous: str | None, owner: str) -> None:
        if previous != owner:
            # Work arrived here: poll fast again.
            self._poll_interval = self.min_poll

    async def release_lease(self, run_id: str, owner: str) -> None:
        """CAS the lease to a released state if ``owner`` holds it."""
        validate_id("run id", run_id)
        known = self._leases.get(run_id)
        if (
            known is not None
            and known.owner == owner
            and await self._write_lease(run_id, None, 0.0, known.etag)
        ):
            return
        current = await self._read_lease(run_id)
        if current is not None and (current.owner == owner or current.unreadable):
            await self._write_lease(run_id, None, 0.0, current.etag)

    async def get_lease(self, run_id: str) -> Lease | None:
        """Read the lease object; a released one reads as None."""
        validate_id("run id", run_id)
        state = await self._read_lease(run_id)
        if state is not None and state.unreadable:
            return _hostile.unreadable_lease(run_id)
        if state is None or state.owner is None:
            return None
        return Lease(run_id, state.owner, state.expires_at)

    # -- run metadata -----------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Replace the run's metadata object; a PUT is atomic, readers see old or new."""
        validate_id("run id", info.run_id)
        await self._put(self._meta_key(info.run_id), info.to_bytes())

    async def get_run(self, run_id: str) -> RunInfo | None:
        """Read the run's metadata object."""
        validate_id("run id", run_id)
        obj = await self._get(self._meta_key(run_id))
        return None if obj is None else RunInfo.from_bytes(run_id, obj.body)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """List ``meta/`` in key (run id) order and read each run's metadata.

        Filters are applied after reading, so a selective filter reads more
        objects than it returns.
        """
        prefix = f"{self.key_prefix}meta/"
        start_after = f"{prefix}{after}" if after is not None else None
        out: list[RunInfo] = []
        page = max(1, min(1000, limit))
        while len(out) < limit:
            items, truncated, _ = await self._list_page(
                prefix, start_after=start_after, max_keys=page
            )
            objects = await self._gather(self._get(item.key) for item in items)
            for item, obj in zip(items, objects, strict=True):
                if obj is None:
                    continue
                info = _hostile.read_listed(self, item.key[len(prefix) :], obj.body)
                if _hostile.listed(info, status, workflow):
                    out.append(info)
                    if len(out) >= limit:
                        break
            if not truncated or not items:
                break
            start_after = items[-1].key
            page = 1000 if status or workflow else page
        return out

    # -- shared helpers, specialised ----------------------------------------

    async def create_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool:
        """Write the first entry (the fence), then metadata and schedule in parallel."""
        validate_id("run id", info.run_id)
        try:
            await self.append(info.run_id, 0, entry)
        except PositionTaken:
            if await self.get_run(info.run_id) is None:
                await asyncio.gather(self.put_run(info), self.schedule(info.run_id, due_at))
            return False
        await asyncio.gather(self.put_run(info), self.schedule(info.run_id, due_at))
        return True

    # -- wake-ups ---------------------------------------------------------

    def _local_peers(self) -> list[S3Backend]:
        return list(_LOCAL.get(self._store_id, ()))

    def _notify_local(self) -> None:
        for backend in self._local_peers():
            backend.waker.notify()

    def _forget_heads(self) -> None:
        for backend in self._local_peers():
            backend._head = None

    def _note_local_schedule(self, at: float) -> None:
        self._forget_heads()
        if at <= time.time():
            self._notify_local()
            return
        for backend in self._local_peers():
            if backend._due_hint is None or at < backend._due_hint:
                backend._due_hint = at

    async def _peek(self) -> bool:
        """Poll once and tell whether there is due work the last due() call did not see.

        News is a valid due key that was still in the future at the last
        due() call, or that was written after it. Due keys that were already
        there (runs held by other workers, a backlog beyond due()'s limit)
        are not news, so they cannot make the worker spin. One LIST, plus a
        GET per new candidate; the first future key becomes a timer.
        """
        now_us = _us(time.time())
        checked_us, checked_server = self._checked
        # Keys scheduled "now" elsewhere land a little after their time: look back a minute.
        floor_us = max(0, checked_us - int(PEEK_LOOKBACK * 1_000_000))
        items, _, server_now = await self._list_page(
            self._due_prefix,
            start_after=f"{self._due_prefix}{floor_us:0{TIME_DIGITS}d}",
            max_keys=256,
        )
        fresh: list[_DueKey] = []
        self._due_hint = None
        for k in map(self._parse_due, items):
            if k is None:
                continue
            if k.at_us > now_us:
                self._due_hint = k.at_us / 1_000_000
                break
            # LastModified has one-second resolution: a key from the second before counts.
            if k.key not in self._returned and (
                k.at_us > checked_us or k.last_modified >= checked_server - 1.0
            ):
                fresh.append(k)
        return bool(fresh) and bool(await self._validate(fresh, server_now))

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until woken in-process or a poll finds new due work; False on timeout.

        The poll interval starts at ``min_poll`` when work arrives and doubles
        up to ``max_poll`` while nothing does. Each poll is one LIST request.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pause = min(self._poll_interval, remaining)
            hint = self._due_hint
            if hint is not None:
                pause = min(pause, max(0.001, hint - time.time() + 0.001))
            woken = await self.waker.wait(pause)
            _raise_if_cancel_was_lost()
            if woken:
                # Work made due in this process says nothing about other processes:
                # keep the poll interval.
                return True
            if time.monotonic() >= deadline:
                return False
            try:
                # A poll is a read: cut short at the deadline, it harms nothing.
                # (asyncio.timeout, not wait_for: on 3.11 wait_for can eat a cancel.)
                async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                    found = await self._peek()
            except (BackendUnavailable, TimeoutError):
                # Waiting is what the caller wants; its next due() reports an outage.
                found = False
            _raise_if_cancel_was_lost()
            if found:
                self._poll_interval = self.min_poll
                return True
            self._poll_interval = min(self._poll_interval * 2, self.max_poll)

    async def close(self) -> None:
        """Close the HTTP client; the backend is unusable afterwards."""
        self._closed = True
        peers = _LOCAL.get(self._store_id)
        if peers is not None:
            peers.discard(self)
            if not peers:
                _LOCAL.pop(self._store_id, None)
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


def _raise_if_cancel_was_lost() -> None:
    # On Python 3.11, asyncio.wait_for (which Waker.wait uses) returns normally when
    # the awaited future completes in the same loop iteration as a cancel() of the
    # caller, and the cancellation is lost: a worker told to stop would poll forever.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _is_valid_id(value: str) -> bool:
    try:
        validate_id("event id", value)
    except InvalidArgument:
        return False
    return True
