"""A Redis backend: one Redis (or Redis Cluster) shared by every worker.

Every key of one run carries the hash tag ``{<prefix>:<run id>}``, so all of
a run's keys live in one hash slot and each per-run operation is one atomic
Lua script, also on a cluster. The cross-run indexes (due times, run ids)
are sharded into :data:`SHARDS` sorted sets, each with its own hash tag, so
no single key takes every write. Waiting workers are woken through pub/sub,
with polling as the fallback. docs/PROTOCOL.md (the Redis section) describes
the key layout precisely.

Redis must not evict keys: run it with ``maxmemory-policy noeviction`` (the
default). Durability is Redis's: turn AOF on; ``appendfsync always`` keeps
every acknowledged write through any crash, ``everysec`` may lose the last
second or two of them if the server or its machine crashes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import zlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from substantial.backends import _hostile
from substantial.backends._redact import redact_text, redact_url
from substantial.backends.base import Backend, Event, Lease, RunInfo, validate_id
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    CorruptRecord,
    InvalidArgument,
    PositionTaken,
)

__all__ = ["SHARDS", "RedisBackend", "shard_of"]

log = logging.getLogger("substantial.redis")

#: Number of sorted sets each cross-run index is split into. Part of the
#: storage protocol: every client of one prefix must use the same value.
SHARDS = 16

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# How often an idle pub/sub connection is checked with PING, in seconds; a
# connection silent for three times as long is treated as dead.
_PING_EVERY = 5.0

# KEYS: log, last-append token. ARGV: position, entry, token.
# Returns 1 (stored, or this very call was already stored), 0 (taken), -1 (gap).
_APPEND = """
local n = redis.call('LLEN', KEYS[1])
local pos = tonumber(ARGV[1])
local mark = ARGV[1] .. ':' .. ARGV[3]
if n == pos then
  redis.call('RPUSH', KEYS[1], ARGV[2])
  redis.call('SET', KEYS[2], mark)
  return 1
end
if n > pos then
  if redis.call('GET', KEYS[2]) == mark then return 1 end
  return 0
end
return -1
"""

# KEYS: inbox stream, event-id hash. ARGV: event id, data. Returns 1 if stored now.
_POST = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 0 end
local sid = redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'data', ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], sid)
return 1
"""

# KEYS: inbox stream, event-id hash. ARGV: event ids.
_ACK = """
for _, id in ipairs(ARGV) do
  local sid = redis.call('HGET', KEYS[2], id)
  if sid then
    redis.call('XDEL', KEYS[1], sid)
    redis.call('HDEL', KEYS[2], id)
  end
end
if redis.call('XLEN', KEYS[1]) == 0 then redis.call('DEL', KEYS[1]) end
return 0
"""

# Reads the lease at KEYS[1]: nil if absent, false if unreadable (not a hash, no
# owner, an expiry that is not a finite number), else owner and expiry.
_LEASE = """
local function lease()
  local kind = redis.call('TYPE', KEYS[1])['ok']
  if kind == 'none' then return nil end
  if kind ~= 'hash' then return false end
  local cur = redis.call('HMGET', KEYS[1], 'owner', 'expires_at')
  local exp = tonumber(cur[2])
  if not cur[1] or cur[1] == '' or not exp or exp ~= exp or exp == math.huge
     or exp == -math.huge then
    return false
  end
  return cur[1], exp
end
"""

# KEYS: lease hash. ARGV: owner, ttl seconds[, steal_from]. Expiry is on the
# server's clock, so workers with skewed clocks agree on it. Returns 0 (held
# elsewhere), 1 (taken), 2 (taken over an unreadable lease, which is expired).
_ACQUIRE = (
    _LEASE
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local owner, exp = lease()
local took = 1
if owner == false then
  took = 2
  redis.call('DEL', KEYS[1])
elseif owner and exp > now and owner ~= ARGV[1] and owner ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[1], 'owner', ARGV[1],
           'expires_at', string.format('%.6f', now + tonumber(ARGV[2])))
return took
"""
)

# KEYS: lease hash. ARGV: owner. Removes an unreadable lease whoever asks (returns 2).
_RELEASE = (
    _LEASE
    + """
local owner = lease()
if owner == false then
  redis.call('DEL', KEYS[1])
  return 2
end
if owner == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)

# Single server only (the keys are in different slots): the due shards' heads
# in one round trip; a cluster gets one command per shard in a pipeline.
# KEYS: due shards. ARGV: now, limit. Returns member, score, member, score, ...
_DUE = """
local out = {}
for _, key in ipairs(KEYS) do
  local items = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'WITHSCORES', 'LIMIT', 0, ARGV[2])
  for i = 1, #items do out[#out + 1] = items[i] end
end
return out
"""

# Single server only, as _DUE. KEYS: due shards. Returns the member and the
# smallest score as Redis formatted it (exact), or an empty list.
_HEAD = """
local best, out = nil, {}
for _, key in ipairs(KEYS) do
  local head = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if head[2] and (best == nil or tonumber(head[2]) < best) then
    best, out = tonumber(head[2]), head
  end
end
return out
"""

_SCRIPTS = {
    "append": _APPEND,
    "post": _POST,
    "ack": _ACK,
    "acquire": _ACQUIRE,
    "release": _RELEASE,
    "due": _DUE,
    "head": _HEAD,
}

# Errors that mean "not reachable right now": the call did not happen, or
# can be retried as it is. Authentication errors subclass ConnectionError
# but are not transient, so they are caught before these.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.ReadOnlyError,
    rx.ClusterError,
    rx.SlotNotCoveredError,
    OSError,
    TimeoutError,
)
_DENIED = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)

Client = Redis | RedisCluster


def shard_of(run_id: str) -> int:
    """Return the index shard of a run: CRC-32 (zlib/IEEE) of its UTF-8 id, mod SHARDS."""
    return zlib.crc32(run_id.encode()) % SHARDS


class RedisBackend(Backend):
    """Store runs in Redis; works on a single server and on Redis Cluster."""

    name = "redis"

    def __init__(
        self,
        client_or_url: str | Client = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = "substantial",
        cluster: bool = False,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        retries: int = 3,
        max_connections: int = 50,
    ) -> None:
        """Open a backend on a URL, or on a client the caller owns and closes.

        With a URL, commands time out after ``socket_timeout`` seconds and are
        retried ``retries`` times with exponential backoff (0.1 s doubling, at
        most 1 s), then raise :class:`BackendUnavailable`. ``prefix`` names
        the application's namespace: backends with different prefixes never
        see each other's runs. ``cluster`` opens a Redis Cluster client.
        """
        super().__init__()
        if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
            raise InvalidArgument(
                f"invalid Redis key prefix {prefix!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
            )
        self.prefix = prefix
        self._client: Client
        if isinstance(client_or_url, str):
            options: dict[str, Any] = {
                "socket_timeout": socket_timeout,
                "socket_connect_timeout": connect_timeout,
                "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
            }
            try:
                if cluster:
                    self._client = RedisCluster.from_url(client_or_url, **options)
                else:
                    # A blocking pool makes a burst of calls queue for a
                    # connection instead of failing with "too many connections".
                    pool = BlockingConnectionPool.from_url(
                        client_or_url,
                        max_connections=max_connections,
                        timeout=socket_timeout,
                        **options,
                    )
                    self._client = Redis.from_pool(pool)
            except ValueError as exc:
                raise InvalidArgument(
                    f"invalid Redis URL {redact_url(client_or_url)!r}: "
                    f"{redact_text(str(exc), client_or_url)}"
                ) from None
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self._cluster = isinstance(self._client, RedisCluster)
        self._scripts = {
            name: self._client.register_script(text) for name, text in _SCRIPTS.items()
        }
        self._channel = f"{{{prefix}:wake}}"
        self._due_keys = [f"{{{prefix}:due:{k}}}" for k in range(SHARDS)]
        self._runs_keys = [f"{{{prefix}:runs:{k}}}" for k in range(SHARDS)]
        self._where = _describe_client(self._client)
        # A cluster client must learn the topology once before concurrent
        # use: redis-py 8 breaks connections when many first calls race.
        self._initialized = not self._cluster
        self._init_lock = asyncio.Lock()
        self._down_since: float | None = None
        self._closed = False
        # Wake-ups: the listener notifies self.waker, which keeps a signal that
        # arrives between a poll and the next wait.
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisBackend:
        """Open ``redis://[user:pass@]host:port/db?prefix=app`` (also ``rediss://``, ``unix://``).

        ``prefix`` and ``cluster=yes`` are read here; every other query
        parameter goes to redis-py (``socket_timeout=...``, ``ssl_ca_certs=...``).
        """
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise InvalidArgument(f"malformed Redis URL {redact_url(url)!r}: {exc}") from None
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise InvalidArgument(
                f"{redact_url(url)!r} is not a redis://, rediss:// or unix:// URL"
            )
        rest: list[tuple[str, str]] = []
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "prefix":
                kwargs["prefix"] = value
            elif key == "cluster":
                kwargs["cluster"] = value.lower() in ("1", "yes", "true", "on")
            else:
                rest.append((key, value))
        return cls(urlunsplit(parts._replace(query=urlencode(rest))), **kwargs)

    def describe(self) -> str:
        """Return the server address and prefix, without credentials."""
        return f"redis {redact_url(self._where)} prefix={self.prefix}"

    # -- keys -------------------------------------------------------------

    def _key(self, run_id: str, kind: str) -> str:
        validate_id("run id", run_id)
        return f"{{{self.prefix}:{run_id}}}:{kind}"

    # -- errors -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _io(self, what: str) -> AsyncIterator[None]:
        """Translate driver errors into the Substantial tree (the one place that does).

        Also re-raise a cancellation that the driver swallowed: on Python
        3.11, ``asyncio.wait_for`` inside redis-py drops a ``cancel()`` that
        lands as the awaited I/O completes, which would leave a cancelled
        worker running. The task's cancel count still shows it.
        """
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            if not self._initialized:
                await self._initialize()
            yield
        except _DENIED as exc:
            raise BackendError(
                f"Redis at {self._where} refused {what}: {exc}. Check the user and password "
                "in the URL and that the ACL allows this key prefix"
            ) from exc
        except rx.OutOfMemoryError as exc:
            raise BackendError(
                f"Redis at {self._where} is out of memory ({what}): raise maxmemory; "
                "keep maxmemory-policy noeviction, evicting keys would lose runs"
            ) from exc
        except _UNAVAILABLE as exc:
            self._note_down(exc)
            raise BackendUnavailable(
                f"Redis at {self._where} is unavailable ({what}): {type(exc).__name__}: {exc}. "
                "Nothing was written, or the call can be retried as it is"
            ) from exc
        except (rx.RedisError, rx.RedisClusterException) as exc:
            raise BackendError(f"Redis at {self._where} rejected {what}: {exc}") from exc
        if self._down_since is not None:
            self._note_up()
        if task is not None and task.cancelling() > cancels:
            raise asyncio.CancelledError

    async def _initialize(self) -> None:
        async with self._init_lock:
            if not self._initialized and isinstance(self._client, RedisCluster):
                await self._client.initialize()
            self._initialized = True

    def _note_down(self, exc: BaseException) -> None:
        # One line per outage, however many calls fail during it.
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "Redis at %s is unreachable (%s: %s); reconnecting with backoff, "
                "calls fail with BackendUnavailable until it is back",
                self._where,
                type(exc).__name__,
                exc,
            )

    def _note_up(self) -> None:
        if self._down_since is not None:
            log.info(
                "Redis at %s is reachable again after %.1f s",
                self._where,
                time.monotonic() - self._down_since,
            )
            self._down_since = None

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return await self._scripts[name](keys=keys, args=args)

    async def _in_order(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run commands in this order, in one round trip where the connection keeps order.

        A single server runs a pipeline's commands in the order sent; a
        cluster pipeline fans out to several nodes, so there they are sent
        one after the other.
        """
        if self._cluster:
            return [await self._client.execute_command(*c) for c in commands]
        pipe = self._client.pipeline(transaction=False)
        for c in commands:
            pipe.execute_command(*c)
        return await pipe.execute()

    def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        # EVAL with the source, not EVALSHA: in a pipeline, a NOSCRIPT (script cache
        # flushed, server restarted) fails only its own command, and the ZADD and
        # PUBLISH after it would run before the event is stored. A worker that took
        # that wake-up and found no event would then see the retry's ZADD repeat the
        # same score, and not look again until the run was evicted.
        return ("EVAL", self._scripts[name].script, len(keys), *keys, *args)

    def _publish(self, at: float) -> tuple[Any, ...]:
        return ("PUBLISH", self._channel, repr(at))

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Push the entry if the log holds exactly ``position`` entries (Lua, atomic)."""
        keys = [self._key(run_id, "log"), self._key(run_id, "append")]
        if position < 0:
            raise InvalidArgument(f"log position {position} of run {run_id!r} is negative")
        # A call retried by the driver after its reply was lost must not fail
        # against its own write: the token tells the script it was ours.
        token = os.urandom(8).hex()
        async with self._io("append"):
            result = await self._script("append", keys, [position, bytes(entry), token])
        if result == 0:
            raise PositionTaken(run_id, position)
        if result == -1:
            raise InvalidArgument(
                f"position {position} leaves a gap in the log of run {run_id!r}: "
                "append at the first free position"
            )

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Return the entries from ``start`` (one LRANGE)."""
        key = self._key(run_id, "log")
        if start < 0:
            raise InvalidArgument(f"log position {start} of run {run_id!r} is negative")
        async with self._io("read_log"):
            entries = await self._client.lrange(key, start, -1)
        return cast(list[bytes], entries)

    # -- the inbox --------------------------------------------------------

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add the event to the run's inbox stream unless its id is there, then signal."""
        keys = self._inbox_keys(run_id)
        validate_id("event id", event_id)
        async with self._io("post_event"):
            stored, _ = await self._in_order(
                self._eval("post", keys, [event_id, bytes(data)]), self._publish(time.time())
            )
        return bool(stored)

    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Post the event, make the run due now and signal, in one round trip."""
        keys = self._inbox_keys(run_id)
        validate_id("event id", event_id)
        now = time.time()
        async with self._io("send_event"):
            stored, _, _ = await self._in_order(
                self._eval("post", keys, [event_id, bytes(data)]),
                ("ZADD", self._due_keys[shard_of(run_id)], repr(now), run_id),
                self._publish(now),
            )
        return bool(stored)

    async def read_inbox(self, run_id: str) -> list[Event]:
        """Return pending events in stream (arrival) order."""
        key = self._key(run_id, "inbox")
        async with self._io("read_inbox"):
            items = cast(list[tuple[bytes, dict[bytes, bytes]]], await self._client.xrange(key))
        # A stream id is "<server ms>-<seq>": its time is the arrival time.
        return [
            Event(fields[b"id"].decode(), fields[b"data"], int(sid.split(b"-")[0]) / 1000)
            for sid, fields in items
        ]

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Delete consumed events from the stream and the id index (Lua, atomic)."""
        keys = self._inbox_keys(run_id)
        if not event_ids:
            return
        async with self._io("ack_events"):
            await self._script("ack", keys, list(event_ids))

    def _inbox_keys(self, run_id: str) -> list[str]:
        return [self._key(run_id, "inbox"), self._key(run_id, "events")]

    # -- the due index ----------------------------------------------------

    async def schedule(self, run_id: str, at: float) -> None:
        """Set the run's score in its due shard, then publish the time on the wake channel."""
        validate_id("run id", run_id)
        async with self._io("schedule"):
            await self._in_order(
                ("ZADD", self._due_keys[shard_of(run_id)], repr(float(at)), run_id),
                self._publish(at),
            )

    async def unschedule(self, run_id: str) -> None:
        """Remove the run from its due shard."""
        validate_id("run id", run_id)
        async with self._io("unschedule"):
            await self._client.zrem(self._due_keys[shard_of(run_id)], run_id)

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Merge the heads of every due shard: ZRANGEBYSCORE -inf..now LIMIT ``limit``, each."""
        self._start_listener()
        self.waker.clear()  # this read covers every signal sent so far
        if limit <= 0:
            return []
        high = repr(float(now))
        async with self._io("due"):
            if self._cluster:
                pipe = self._client.pipeline(transaction=False)
                for key in self._due_keys:
                    pipe.zrangebyscore(key, "-inf", high, start=0, num=limit, withscores=True)
                shards: list[list[tuple[bytes, float]]] = await pipe.execute()
                found = [(at, run_id) for shard in shards for run_id, at in shard]
            else:
                flat = await self._script("due", self._due_keys, [high, limit])
                found = [(float(flat[i + 1]), flat[i]) for i in range(0, len(flat), 2)]
        found.sort()
        out: list[tuple[str, float]] = []
        bad: list[tuple[bytes, float]] = []
        for at, member in found[:limit]:
            run_id = _member_id(member)
            if run_id is None or not _hostile.valid_time(at):
                bad.append((member, at))
            else:
                out.append((run_id, at))
        await self._drop_bad_due(bad)
        return out

    async def next_due_at(self) -> float | None:
        """Return the smallest head score over the due shards, dropping bad heads on the way."""
        heads: list[tuple[float, bytes]] = []
        good: list[float] = []
        for _ in range(16):
            async with self._io("next_due_at"):
                if not self._cluster:
                    head = await self._script("head", self._due_keys, [])
                    heads = [(float(head[1]), head[0])] if head else []
                else:
                    pipe = self._client.pipeline(transaction=False)
                    for key in self._due_keys:
                        pipe.zrange(key, 0, 0, withscores=True)
                    shards: list[list[tuple[bytes, float]]] = await pipe.execute()
                    heads = [(at, member) for shard in shards for member, at in shard]
            good = [at for at, m in heads if _member_id(m) and _hostile.valid_time(at)]
            if len(good) == len(heads):
                break
            # Another shard's second entry may come before the next good head: read again.
            await self._drop_bad_due(
                [(m, at) for at, m in heads if not (_member_id(m) and _hostile.valid_time(at))]
            )
        return min(good, default=None)

    async def _drop_bad_due(self, bad: Sequence[tuple[bytes, float]]) -> None:
        """Remove due entries no worker can act on; a good run id with a bad time is due now."""
        if not bad:
            return
        try:
            async with self._io("drop bad due entries"):
                pipe = self._client.pipeline(transaction=False)
                for member, at in bad:
                    run_id = _member_id(member)
                    action = "scheduling it now" if run_id else "removing it from the due index"
                    _hostile.warn_once(self, "due entry", member, f"due at {at!r}", action)
                    # Wherever it was written: not necessarily in the shard its id hashes to.
                    for key in self._due_keys:
                        pipe.zrem(key, member)
                    if run_id is not None:
                        pipe.zadd(self._due_keys[shard_of(run_id)], {run_id: time.time()})
                await pipe.execute()
        except BackendError as exc:
            log.warning("could not drop bad due entries: %s", exc)

    # -- leases -----------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Take or renew the lease in one Lua script, timed by the server's clock."""
        key = self._key(run_id, "lease")
        args: list[Any] = [owner, repr(float(ttl))]
        if steal_from is not None:
            args.append(steal_from)
        async with self._io("acquire_lease"):
            took = await self._script("acquire", [key], args)
        if took == 2:
            self._unreadable_lease(run_id, "replaced it")
        return bool(took)

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Delete the lease if ``owner`` holds it, or if it is unreadable (Lua, atomic)."""
        key = self._key(run_id, "lease")
        async with self._io("release_lease"):
            if await self._script("release", [key], [owner]) == 2:
                self._unreadable_lease(run_id, "removed it")

    async def get_lease(self, run_id: str) -> Lease | None:
        """Read the lease hash; an unreadable one reads as expired, owner ``?``."""
        key = self._key(run_id, "lease")
        fields: list[bytes | None] | None
        async with self._io("get_lease"):
            try:
                fields = cast(
                    list[bytes | None], await self._client.hmget(key, ["owner", "expires_at"])
                )
            except rx.ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                fields = None  # not a hash
        if fields == [None, None]:
            return None
        lease = None
        if fields is not None:
            owner, expires_at = fields
            lease = _hostile.lease_or_none(
                run_id, owner and owner.decode(errors="replace"), _number(expires_at)
            )
        if lease is None:
            self._unreadable_lease(run_id, "reading it as expired")
            return _hostile.unreadable_lease(run_id)
        return lease

    def _unreadable_lease(self, run_id: str, action: str) -> None:
        _hostile.warn_once(self, "lease", run_id, "not an owner and a finite expiry", action)

    # -- run metadata -----------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Add the run to its runs shard, then SET its metadata.

        The index entry goes first: an entry whose metadata is missing is
        skipped by :meth:`list_runs`, so a crash between the two is harmless.
        """
        key = self._key(info.run_id, "meta")
        async with self._io("put_run"):
            await self._in_order(
                ("ZADD", self._runs_keys[shard_of(info.run_id)], "0", info.run_id),
                ("SET", key, info.to_bytes()),
            )

    async def get_run(self, run_id: str) -> RunInfo | None:
        """GET the run's metadata."""
        key = self._key(run_id, "meta")
        async with self._io("get_run"):
            try:
                data = cast(bytes | None, await self._client.get(key))
            except rx.ResponseError as exc:
                if not str(exc).startswith("WRONGTYPE"):
                    raise
                raise CorruptRecord(run_id, "meta", "the key is not a string") from None
        return None if data is None else RunInfo.from_bytes(run_id, data)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """Page through the runs shards in id order (ZRANGE BYLEX), filtering on metadata."""
        out: list[RunInfo] = []
        cursor = after
        page = max(limit, 100) if status or workflow else limit
        while len(out) < limit:
            ids = await self._next_run_ids(cursor, page)
            if not ids:
                break
            cursor = ids[-1]
            async with self._io("list_runs"):
                pipe = self._client.pipeline(transaction=False)
                for run_id in ids:
                    pipe.get(self._key(run_id, "meta"))
                # A key of another type fails alone, not the listing.
                metas: list[Any] = await pipe.execute(raise_on_error=False)
            for run_id, data in zip(ids, metas, strict=True):
                if data is None:
                    continue  # indexed by a put_run that crashed before its SET
                if isinstance(data, rx.ResponseError):
                    info = RunInfo.unreadable(run_id, f"metadata cannot be read: {data}")
                else:
                    info = _hostile.read_listed(self, run_id, data)
                if _hostile.listed(info, status, workflow):
                    out.append(info)
                    if len(out) >= limit:
                        break
            if len(ids) < page:
                break
        return out

    async def _next_run_ids(self, after: str | None, count: int) -> list[str]:
        """Return the ``count`` smallest run ids above ``after`` over all shards.

        Each shard's first ``count`` ids above ``after`` contain every id of
        the merged first ``count``, so one read per shard is enough.
        """
        low = b"-" if after is None else b"(" + after.encode()
        async with self._io("list_runs"):
            pipe = self._client.pipeline(transaction=False)
            for key in self._runs_keys:
                pipe.zrangebylex(key, low, b"+", start=0, num=count)
            shards: list[list[bytes]] = await pipe.execute()
        return sorted(run_id.decode() for shard in shards for run_id in shard)[:count]

    # -- wake-ups ---------------------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a wake-up arrives on the channel, a published timer falls due, or timeout.

        A signal that arrived since the last :meth:`due` counts at once.
        """
        self._start_listener()
        # The waker keeps a signal that arrived while nobody waited, so it counts at once.
        return await self.waker.wait(timeout)

    def _start_listener(self) -> None:
        if self._listener is None and not self._closed:
            self._listener = asyncio.get_running_loop().create_task(
                self._listen(), name=f"substantial.redis listener {self._where}"
            )

    def _wake(self) -> None:
        self.waker.notify()

    def _on_signal(self, data: bytes) -> None:
        try:
            at = float(data)
        except ValueError:
            at = 0.0
        delay = at - time.time()
        if delay <= 0:
            self._wake()
            return
        # A timer set by another process: wake when it falls due. Only the
        # earliest is kept; a later one is found by the poll after that wake.
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    async def _pubsub_client(self) -> Redis:
        """Return a client for the subscription whose errors reach us at once.

        Its own reconnection loop (below) backs off, logs and wakes waiters
        after a reconnect; the driver's silent retries would hide the gap in
        which messages were lost. On a cluster, PUBLISH reaches every node,
        so subscribing on any one node is enough.
        """
        connection_class: type[AbstractConnection]
        if isinstance(self._client, RedisCluster):
            await self._initialize()
            node = self._client.get_random_node()
            kwargs = dict(node.connection_kwargs)
            kwargs.update(host=node.host, port=node.port)
            connection_class = node.connection_class
        else:
            kwargs = dict(self._client.connection_pool.connection_kwargs)
            connection_class = self._client.connection_pool.connection_class
        kwargs["retry"] = Retry(NoBackoff(), 0)
        pool = ConnectionPool(connection_class=connection_class, **kwargs)
        return Redis.from_pool(pool)

    async def _listen(self) -> None:
        failures = 0
        while not self._closed:
            if failures:
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
            try:
                client = await self._pubsub_client()
            except (rx.RedisError, OSError, TimeoutError) as exc:
                self._note_down(exc)
                failures += 1
                continue
            pubsub = client.pubsub()
            try:
                await self._subscribe(pubsub, resubscribed=failures > 0)
                failures = 0
                await self._receive(pubsub)
            except (rx.RedisError, OSError, TimeoutError) as exc:
                self._subscribed.clear()
                self._note_down(exc)
                failures += 1
            except Exception:
                # Never let wake-ups die: log the surprise and start over.
                self._subscribed.clear()
                log.exception("Redis wake-up listener of %s failed; restarting it", self._where)
                failures += 1
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def _subscribe(self, pubsub: PubSub, *, resubscribed: bool) -> None:
        await pubsub.subscribe(self._channel)
        while not self._closed and await pubsub.get_message(timeout=_PING_EVERY) is None:
            pass  # the subscribe confirmation
        self._subscribed.set()
        self._note_up()
        if resubscribed:
            # Signals sent while we were away are lost: make waiters poll.
            self._wake()

    async def _receive(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while not self._closed:
            message = await pubsub.get_message(timeout=_PING_EVERY)
            if message is not None:
                heard = loop.time()
                pinged = False
                if message["type"] == "message":
                    self._on_signal(message["data"])
                continue
            if loop.time() - heard > 3 * _PING_EVERY:
                raise rx.ConnectionError("no answer to PING on the pub/sub connection")
            if not pinged:
                await pubsub.ping()
                pinged = True

    # -- lifecycle --------------------------------------------------------

    async def close(self) -> None:
        """Stop the listener and close the connections this backend opened."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        listener, self._listener = self._listener, None
        # Repeated: redis-py can swallow a cancel that lands mid-call (see _io).
        while listener is not None and not listener.done():
            listener.cancel()
            await asyncio.wait({listener}, timeout=0.1)
        if self._owns_client:
            await self._client.aclose()


def _member_id(member: bytes) -> str | None:
    """Return the run id a due-index member names, or None if it is not a valid one."""
    try:
        run_id = member.decode()
    except UnicodeDecodeError:
        return None
    return run_id if _hostile.is_valid_id(run_id) else None


def _number(raw: bytes | None) -> float | None:
    try:
        return None if raw is None else float(raw)
    except ValueError:
        return None


def _describe_client(client: Client) -> str:
    if isinstance(client, RedisCluster):
        return "cluster " + ",".join(client.nodes_manager.startup_nodes)
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
