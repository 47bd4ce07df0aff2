"""Object I/O for the s3 backend: one client, bounded retries, conditional writes.

Every request goes through :meth:`ObjectStore.call`, the one place driver
errors are translated. A lost race (412, 409 ``ConditionalRequestConflict``,
404 on If-Match) is reported as a lost race, never retried into an
overwrite; since HTTP clients resend a PUT whose reply was lost, a 412 is
first checked against the stored write id: it may be our own write.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import secrets
import time
import weakref
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    NoRegionError,
    ProfileNotFound,
)

from substantial.backends._common import release_with_loop
from substantial.backends._redact import redact_url
from substantial.backends.s3._errors import TRANSIENT_ERRORS, Rejected, client_error
from substantial.errors import BackendError, BackendUnavailable

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

__all__ = ["Listed", "Object", "ObjectStore", "Rejected", "new_wid"]


T = TypeVar("T")
X = TypeVar("X")

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


def new_wid() -> str:
    return secrets.token_hex(8)


def _content_md5(body: bytes) -> str:
    # Sent with every PUT so the server refuses a body that did not arrive whole. Without
    # it, SeaweedFS 4.x stores an *empty* object when a client that sent
    # "Expect: 100-continue" dies before its body, and that object passes If-None-Match.
    return base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode()


@dataclass(frozen=True, slots=True)
class Object:
    body: bytes
    etag: str
    metadata: dict[str, str]
    last_modified: float


@dataclass(frozen=True, slots=True)
class Listed:
    key: str
    last_modified: float


class ObjectStore:
    """Requests on one bucket, through one lazily opened client."""

    def __init__(
        self,
        bucket: str,
        key_prefix: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        credentials: tuple[str | None, str | None, str | None],
        profile: str | None,
        path_style: bool | None,
        connect_timeout: float,
        read_timeout: float,
        max_attempts: int,
        max_concurrency: int,
    ) -> None:
        self.bucket = bucket
        self.key_prefix = key_prefix
        self.endpoint_url = endpoint_url
        #: Requests sent, by S3 operation, as botocore sends them (each of our retries
        #: counts): the bill, in requests.
        self.requests: Counter[str] = Counter()
        self.region = region
        self.credentials = credentials
        self.profile = profile
        configured = (
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
        )
        self.path_style = path_style if path_style is not None else bool(configured)
        self.server_id = f"{configured or 'aws'}|{bucket}"
        self._timeouts = (connect_timeout, read_timeout)
        self._attempts = max_attempts
        self._limit = max_concurrency
        self._client: S3Client | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._open_lock: asyncio.Lock | None = None
        self._sem: asyncio.Semaphore | None = None
        self._guard: AsyncGenerator[None, None] | None = None
        self.closed = False

    def describe(self) -> str:
        """Return ``s3://bucket/prefix`` and the endpoint, if not AWS."""
        where = f" at {redact_url(self.endpoint_url)}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.key_prefix}{where}"

    async def open(self) -> S3Client:
        if self._client is not None:
            return self._client
        if self.closed:
            raise BackendError(f"{self.describe()} is closed: open a new backend")
        if self._open_lock is None:
            self._open_lock = asyncio.Lock()
        async with self._open_lock:
            if self._client is None:
                self._client = await self._create_client()
                # Released when this loop shuts down if nobody closes the backend first.
                self._guard = await release_with_loop(self._release)
        return self._client

    async def _create_client(self) -> S3Client:
        try:
            session = _session(self.profile)
            region = (
                self.region
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
                s3={"addressing_style": "path" if self.path_style else "auto"},
                # Third-party servers choke on the newer default checksum trailers.
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                # Our calls' parameters are built here, never by users: checking them against
                # the API model on every request cost a fifth of the client's CPU per request.
                parameter_validation=False,
            )
            key, secret, token = self.credentials
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

    async def call(self, op: str, key: str, fn: Callable[[S3Client], Awaitable[T]]) -> T:
        """Run one S3 request with bounded retries, translating every driver error.

        Raises :class:`Rejected` for 404/409/412 (the caller decides what a
        missing key or a failed precondition means), :class:`BackendUnavailable`
        when the store cannot be reached, and :class:`BackendError` otherwise.
        """
        client = await self.open()
        where = f"s3://{self.bucket}/{key}"
        delay = 0.05
        for attempt in range(1, self._attempts + 1):
            try:
                return await fn(client)
            except ClientError as exc:
                fatal = client_error(exc, op, where, self.bucket, self.endpoint_url)
                if fatal is not None:
                    raise fatal from exc
                last: BaseException = exc
            except NoCredentialsError as exc:
                raise BackendError(
                    f"no AWS credentials for {self.describe()}: set AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or put key:secret@ in the URL"
                ) from exc
            except TRANSIENT_ERRORS as exc:
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

    async def map(self, fn: Callable[[X], Awaitable[T]], items: Iterable[X]) -> list[T]:
        """Return ``[await fn(item) ...]``, running at most ``max_concurrency`` at once.

        Bounded, so a long log or a big due page does not open hundreds of
        connections. Each call is made only when its turn comes: a cancel
        leaves no coroutine that was made and never awaited.
        """
        if self._sem is None:
            self._sem = asyncio.Semaphore(self._limit)
        sem = self._sem

        async def one(item: X) -> T:
            async with sem:
                return await fn(item)

        return list(await asyncio.gather(*(one(item) for item in items)))

    # -- object primitives -------------------------------------------------

    async def get(self, key: str) -> Object | None:
        async def fn(client: S3Client) -> Object:
            resp = await client.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            return Object(
                data, resp["ETag"], dict(resp.get("Metadata", {})), resp["LastModified"].timestamp()
            )

        try:
            return await self.call("GetObject", key, fn)
        except Rejected as rej:
            if rej.status == 404:
                return None
            raise BackendError(f"GetObject on {key} was refused: {rej}") from rej

    async def head_wid(self, key: str) -> tuple[str | None, str]:
        """Return the write id and ETag of the object now at ``key``."""

        async def fn(client: S3Client) -> tuple[str | None, str]:
            resp = await client.head_object(Bucket=self.bucket, Key=key)
            return resp.get("Metadata", {}).get("wid"), resp["ETag"]

        try:
            return await self.call("HeadObject", key, fn)
        except Rejected:
            return None, ""

    async def put(self, key: str, body: bytes) -> str:
        async def fn(client: S3Client) -> str:
            resp = await client.put_object(
                Bucket=self.bucket, Key=key, Body=body, ContentMD5=_content_md5(body)
            )
            return resp["ETag"]

        try:
            return await self.call("PutObject", key, fn)
        except Rejected as rej:
            raise BackendError(f"PutObject on {key} was refused: {rej}") from rej

    async def put_if(
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
        if self.server_id not in _VERIFIED:
            await self.verify_conditional_writes()
        wid = wid or new_wid()
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
                return await self.call("PutObject", key, fn)
            except Rejected as rej:
                if rej.status == 404:
                    return None  # If-Match on a missing key
                # A 412 may answer a resend of our own write whose reply was lost: ours
                # (after a timeout) or the HTTP client's (aiohttp silently resends a PUT
                # when a kept-alive connection drops). Only the write id can tell.
                stored_wid, etag = await self.head_wid(key)
                if stored_wid == wid:
                    return etag
                if rej.status == 409 and if_match is None and stored_wid is None and conflict < 2:
                    # A concurrent write to the key was in flight and the key is still
                    # free: a create-if-absent cannot overwrite, so ask again.
                    await asyncio.sleep(0.02 * (conflict + 1))
                    continue
                return None
        return None  # pragma: no cover - the loop always returns

    async def verify_conditional_writes(self) -> None:
        """Refuse a server that ignores If-None-Match or If-Match instead of enforcing them.

        Such a server would let two workers both "win" a log position. Checked
        once per process, endpoint and bucket, before the first conditional
        write (read-only clients never write the probe).
        """
        key = f"{self.key_prefix}.probe/{new_wid()}"
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
            await self.call("PutObject", key, create)
            for kind, attempt in (("If-None-Match: *", create), ("If-Match", replace)):
                try:
                    await self.call("PutObject", key, attempt)
                except Rejected:
                    continue
                raise BackendError(
                    f"the S3 server at {where} ignores {kind} on PutObject: it overwrote an "
                    "object that the condition protects. substantial needs conditional "
                    "writes to keep two workers from extending one run; use a server that "
                    "enforces them (AWS S3, R2, MinIO, SeaweedFS)"
                )
        except Rejected as rej:
            raise BackendError(f"could not check conditional writes at {where}: {rej}") from rej
        finally:
            await self.delete(key)
        _VERIFIED.add(self.server_id)

    async def delete(self, key: str) -> None:
        async def fn(client: S3Client) -> None:
            await client.delete_object(Bucket=self.bucket, Key=key)

        with contextlib.suppress(Rejected):
            await self.call("DeleteObject", key, fn)

    async def list_page(
        self, prefix: str, *, start_after: str | None = None, max_keys: int = 1000
    ) -> tuple[list[Listed], bool, float]:
        """List one page of keys in key order: (items, truncated, server time)."""

        async def fn(client: S3Client) -> tuple[list[Listed], bool, float]:
            if start_after is None:
                resp = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, MaxKeys=max_keys
                )
            else:
                resp = await client.list_objects_v2(
                    Bucket=self.bucket, Prefix=prefix, MaxKeys=max_keys, StartAfter=start_after
                )
            items = [
                Listed(o["Key"], o["LastModified"].timestamp())
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
            return await self.call("ListObjectsV2", prefix, fn)
        except Rejected as rej:
            raise BackendError(f"ListObjectsV2 on {prefix} was refused: {rej}") from rej

    async def list_all(self, prefix: str, start_after: str | None = None) -> list[Listed]:
        out: list[Listed] = []
        while True:
            items, truncated, _ = await self.list_page(prefix, start_after=start_after)
            out.extend(items)
            if not truncated or not items:
                return out
            start_after = items[-1].key

    async def _release(self) -> None:
        """Close the HTTP client; a later request (in another loop, say) opens a new one."""
        stack, self._stack, self._client = self._stack, None, None
        # Both belong to the loop the client was made in.
        self._open_lock = self._sem = None
        if stack is not None:
            await stack.aclose()

    async def close(self) -> None:
        """Close the HTTP client; the store is unusable afterwards."""
        self.closed = True
        guard, self._guard = self._guard, None
        if guard is not None:
            await guard.aclose()  # runs _release, once
        else:
            await self._release()
