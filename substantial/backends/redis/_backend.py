"""The redis backend: keys, commands and scripts on one server or a cluster."""

from __future__ import annotations

import dataclasses
import os
import re
import time
import zlib
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis import exceptions as rx
from redis.asyncio import RedisCluster

from substantial.backends import _hostile
from substantial.backends._common import (
    ack_ids,
    check_due,
    check_position,
    check_ttl,
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
from substantial.backends.redis._connect import describe_client, open_client
from substantial.backends.redis._errors import Client, Health, log
from substantial.backends.redis._listen import Listener
from substantial.backends.redis._listing import Listing, score
from substantial.backends.redis._pipe import Pipe
from substantial.backends.redis._scripts import SCRIPTS
from substantial.errors import BackendError, InvalidArgument, PositionTaken

__all__ = ["SHARDS", "RedisBackend", "shard_of"]

#: Number of sorted sets each cross-run index is split into. Part of the
#: storage protocol: every client of one prefix must use the same value.
SHARDS = 16

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def shard_of(run_id: str) -> int:
    """Return the index shard of a run: CRC-32 (zlib/IEEE) of its UTF-8 id, mod SHARDS."""
    return zlib.crc32(run_id.encode()) % SHARDS


class RedisBackend(Backend):
    """Store runs in Redis; works on a single server and on Redis Cluster."""

    name = "redis"
    capabilities = Capabilities(wake_ups=True, server_time=True, delete=True, list_recent=True)

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
        group_commit: bool = True,
    ) -> None:
        """Open a backend on a URL, or on a client the caller owns and closes.

        With a URL, commands time out after ``socket_timeout`` seconds and are
        retried ``retries`` times with exponential backoff (0.1 s doubling, at
        most 1 s), then raise :class:`BackendUnavailable`. ``prefix`` names
        the application's namespace: backends with different prefixes never
        see each other's runs. ``cluster`` opens a Redis Cluster client.
        ``group_commit`` sends the commands that the tasks of this process
        issue in one event-loop iteration as one pipeline (per node on a
        cluster): one round trip for many runs' appends, leases and writes.
        """
        super().__init__()
        if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
            raise InvalidArgument(
                f"invalid Redis key prefix {prefix!r}: use 1-64 characters from A-Z a-z 0-9 _ . -"
            )
        self.prefix = prefix
        self._client: Client
        if isinstance(client_or_url, str):
            self._client = open_client(
                client_or_url,
                cluster=cluster,
                socket_timeout=socket_timeout,
                connect_timeout=connect_timeout,
                retries=retries,
                max_connections=max_connections,
            )
            self._owns_client = True
        else:
            self._client = client_or_url
            self._owns_client = False
        self._cluster = isinstance(self._client, RedisCluster)
        self._scripts = {name: self._client.register_script(text) for name, text in SCRIPTS.items()}
        self._pipe = Pipe(self._client, enabled=group_commit)
        if group_commit:
            self.capabilities = dataclasses.replace(self.capabilities, group_commit=True)
        if not self._cluster:  # one script over the run's inbox and a due shard: one server
            self.capabilities = dataclasses.replace(self.capabilities, unschedule_idle=True)
        self._channel = f"{{{prefix}:wake}}"
        self._due_keys = [f"{{{prefix}:due:{k}}}" for k in range(SHARDS)]
        self._runs_keys = [f"{{{prefix}:runs:{k}}}" for k in range(SHARDS)]
        self._where = describe_client(self._client)
        self._health = Health(self._client, self._where, self._release)
        self._listing = Listing(
            self,
            self._client,
            self._pipe,
            self._health,
            lambda run_id: self._key(run_id, "meta"),
            self._runs_keys,
            self._reindex,
        )
        self._closed = False
        # Wake-ups: the listener notifies self.waker, which keeps a signal that
        # arrives between a poll and the next wait.
        self._listener = Listener(self._client, self._channel, self.waker, self._health)
        self._subscribed = self._listener.subscribed

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> RedisBackend:
        """Open ``redis://[user:pass@]host:port/db?prefix=app`` (also ``rediss://``, ``unix://``).

        ``prefix``, ``cluster=yes`` and ``group_commit=no`` are read here; every
        other query parameter goes to redis-py (``socket_timeout=...``, ...).
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
            elif key in ("cluster", "group_commit"):
                kwargs[key] = value.lower() in ("1", "yes", "true", "on")
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

    async def _script(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a script by digest in this iteration's pipeline (loaded if the server lost it)."""
        script = self._scripts[name]
        try:
            return await self._pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except rx.NoScriptError:
            # Not run: the server was restarted or its script cache flushed.
            await self._pipe.load_script(script.sha, script.script)
            return await self._pipe.call("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _in_order(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Run commands in this order, in one round trip where the connection keeps order.

        A single server runs a pipeline's commands in the order sent; a
        cluster pipeline fans out to several nodes, so there they are sent
        one after the other (each in the pipeline of its iteration).
        """
        if self._cluster:
            return [await self._pipe.call(*c) for c in commands]
        return await self._pipe.group(commands)

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
        check_position(run_id, position)
        # A call retried by the driver after its reply was lost must not fail
        # against its own write: the token tells the script it was ours.
        token = os.urandom(8).hex()
        entry, resends = bytes(entry), self._pipe.resends
        async with self._health.io("append"):
            result = await self._script("append", keys, [position, entry, token])
            # Sent again meanwhile, after later appends of the run replaced the mark: its
            # "taken" may answer its own first send. Its bytes there say it was.
            if result == 0 and self._pipe.resends != resends:
                result = int(await self._pipe.call("LINDEX", keys[0], position) == entry)
        if result == 0:
            raise PositionTaken(run_id, position)
        if result == -1:
            raise gap_error(run_id, position)

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Return the entries from ``start`` (one LRANGE)."""
        key = self._key(run_id, "log")
        check_position(run_id, start, "log start")
        async with self._health.io("read_log"):
            entries = await self._pipe.call("LRANGE", key, start, -1)
        return cast(list[bytes], entries)

    # -- the inbox --------------------------------------------------------

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Delete the acknowledged events (Lua, atomic), then return the rest in stream order."""
        keys = self._inbox_keys(run_id)
        ids = ack_ids(ack)
        async with self._health.io("read_inbox"):
            if ids:
                found = await self._script("ack_read", keys, ids)
                items = [(sid, dict(zip(f[::2], f[1::2], strict=True))) for sid, f in found]
            else:
                items = cast(
                    list[tuple[bytes, dict[bytes, bytes]]],
                    await self._pipe.call("XRANGE", keys[0], "-", "+"),
                )
        # A stream id is "<server ms>-<seq>": its time is the arrival time.
        return [
            Event(fields[b"id"].decode(), fields[b"data"], int(sid.split(b"-")[0]) / 1000)
            for sid, fields in items
        ]

    def _inbox_keys(self, run_id: str) -> list[str]:
        return [self._key(run_id, "inbox"), self._key(run_id, "events")]

    # -- the due index ----------------------------------------------------

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Post the event, set (or remove) the run's score and signal, in one round trip."""
        at = check_due(run_id, at, event)
        commands: list[tuple[Any, ...]] = []
        if event is not None:
            args = [event.event_id, bytes(event.data)]
            commands.append(self._eval("post", self._inbox_keys(run_id), args))
        shard = self._due_keys[shard_of(run_id)]
        if at is None:
            commands.append(("ZREM", shard, run_id))
        else:
            commands += [("ZADD", shard, repr(at), run_id), self._publish(at)]
        async with self._health.io("set_due"):
            replies = await self._in_order(*commands)
        return event is not None and bool(replies[0])

    async def unschedule_idle(self, run_id: str) -> bool:
        """Remove the run's due entry unless its inbox stream holds an event: one script."""
        validate_id("run id", run_id)
        if self._cluster:
            return await super().unschedule_idle(run_id)  # Unsupported: keys on two nodes
        keys = [self._inbox_keys(run_id)[0], self._due_keys[shard_of(run_id)]]
        async with self._health.io("unschedule_idle"):
            return bool(await self._script("unschedule_idle", keys, [run_id]))

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """Merge the heads of every due shard: ZRANGEBYSCORE -inf..now LIMIT ``limit``, each."""
        self._listener.start()
        self.waker.clear()  # this read covers every signal sent so far
        limit = max(0, limit)
        high = repr(float(now))
        async with self._health.io("due"):
            if self._cluster:
                found, following = await self._due_on_cluster(high, limit)
            else:
                due, after = await self._script("due", self._due_keys, [high, limit])
                found = [(float(due[i + 1]), due[i]) for i in range(0, len(due), 2)]
                following = [(float(after[i + 1]), after[i]) for i in range(0, len(after), 2)]
        found.sort()
        runs: list[tuple[str, float]] = []
        bad: list[tuple[bytes, float]] = []
        for at, member in found[:limit]:
            run_id = _member_id(member)
            if run_id is None or not _hostile.valid_time(at):
                bad.append((member, at))
            else:
                runs.append((run_id, at))
        later = [(at, m) for at, m in [*found[limit:], *following] if m not in dict(bad)]
        await self._drop_bad_due(bad)
        good = [at for at, m in later if _member_id(m) and _hostile.valid_time(at)]
        return DueRuns(runs, min(good, default=None))

    async def _due_on_cluster(
        self, high: str, limit: int
    ) -> tuple[list[tuple[float, bytes]], list[tuple[float, bytes]]]:
        """Read the due shards of a cluster: two pipelines, one command per shard each."""
        pipe = self._client.pipeline(transaction=False)
        for key in self._due_keys:
            pipe.zrangebyscore(key, "-inf", high, start=0, num=limit, withscores=True)
        shards: list[list[tuple[bytes, float]]] = await pipe.execute()
        pipe = self._client.pipeline(transaction=False)
        for key, shard in zip(self._due_keys, shards, strict=True):
            pipe.zrange(key, len(shard), len(shard), withscores=True)
        heads: list[list[tuple[bytes, float]]] = await pipe.execute()
        found = [(at, m) for shard in shards for m, at in shard]
        return found, [(at, m) for head in heads for m, at in head]

    async def _drop_bad_due(self, bad: Sequence[tuple[bytes, float]]) -> None:
        """Remove due entries no worker can act on; a good run id with a bad time is due now."""
        if not bad:
            return
        try:
            async with self._health.io("drop bad due entries"):
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

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read, or compare-and-set in one Lua script, the lease, timed by the server's clock."""
        key = self._key(run_id, "lease")
        ttl = check_ttl(ttl)
        args = [owner or "", repr(ttl), take_from or ""]
        async with self._health.io("lease"):
            reply = await self._script("lease", [key], args)
        code, *rest = [part.decode(errors="replace") for part in reply]
        if code == "bad":
            self._unreadable_lease(run_id, "reading it as expired")
            return _hostile.unreadable_lease(run_id)
        if code == "set-over-bad":
            self._unreadable_lease(run_id, "replaced it")
        if not rest:
            return None
        return Lease(run_id, rest[0], float(rest[1]))

    def _unreadable_lease(self, run_id: str, action: str) -> None:
        _hostile.warn_once(self, "lease", run_id, "not an owner and a finite expiry", action)

    # -- run metadata -----------------------------------------------------

    async def start_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool | None:
        """Write a new run's entry at 0, metadata, index and due entry in one script.

        Single server only (the keys are in several slots); on a cluster this
        returns None and the run is created through the contract's methods.
        """
        if self._cluster:
            return None
        at = check_due(info.run_id, due_at, None)
        run_id, shard = info.run_id, shard_of(info.run_id)
        keys = [self._key(run_id, k) for k in ("log", "append", "meta")]
        keys += [self._due_keys[shard], *self._index_keys(shard)]
        created, status = score(info.created_at), Listing.status_arg(info.status)
        token = os.urandom(8).hex()  # as append's: a retried call finds its own write
        args = [bytes(entry), token, info.to_bytes(), run_id, created, status, repr(at)]
        async with self._health.io("start_run"):
            return bool(await self._script("start_run", keys, [*args, self._channel]))

    async def put_run(self, info: RunInfo) -> None:
        """Add the run to its runs shard, then SET its metadata.

        The index entries (id order and creation time) go first: an entry
        whose metadata is missing is skipped by the listings, so a crash
        between the two is harmless. On a single server both are one script.
        """
        key = self._key(info.run_id, "meta")
        index_keys = self._index_keys(shard_of(info.run_id))
        index_args = [info.run_id, score(info.created_at), Listing.status_arg(info.status)]
        async with self._health.io("put_run"):
            if not self._cluster:
                await self._script("put_run", [key, *index_keys], [info.to_bytes(), *index_args])
                return
            await self._in_order(
                self._eval("index_run", index_keys, index_args), ("SET", key, info.to_bytes())
            )

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """Page through the runs shards in id order (ZRANGE BYLEX), filtering on metadata."""
        return await self._listing.list_runs(status, workflow, limit, after, ids)

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """Merge the shards' creation indexes newest first from the cursor (``_listing.py``)."""
        return await self._listing.list_recent(status, workflow, limit, before)

    def _index_keys(self, shard: int) -> list[str]:
        return self._listing.index_keys(shard)

    async def _reindex(self, run_id: str, created_at: float, status: int) -> Any:
        keys, args = self._index_keys(shard_of(run_id)), [run_id, score(created_at), status]
        return await self._pipe.call(*self._eval("reindex_run", keys, args))

    # -- retention --------------------------------------------------------

    async def delete(self, run_id: str) -> bool:
        """ZREM the due entry, DEL the run's keys (one slot: atomic), then its index entries.

        In this order a crash leaves at most index entries without metadata,
        which the listings pass over, and a second delete removes.
        """
        keys = [self._key(run_id, k) for k in ("log", "append", "inbox", "events", "lease", "meta")]
        shard = shard_of(run_id)
        async with self._health.io("delete"):
            replies = await self._in_order(
                ("ZREM", self._due_keys[shard], run_id),
                ("DEL", *keys),
                self._eval("unindex_run", self._index_keys(shard), [run_id]),
            )
        return any(int(r) > 0 for r in replies)

    # -- wake-ups and lifecycle --------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a wake-up arrives on the channel, a published timer falls due, or timeout.

        A signal that arrived since the last :meth:`due` counts at once.
        """
        self._listener.start()
        # The waker keeps a signal that arrived while nobody waited, so it counts at once.
        return await self.waker.wait(timeout)

    async def _release(self) -> None:
        """Close the connections; a later call (in another loop, say) opens new ones."""
        await self._listener.stop()
        await self._pipe.release()
        if self._owns_client:
            await self._client.aclose()

    async def close(self) -> None:
        """Stop the listener and close the connections this backend opened."""
        self._closed = True
        await self._listener.close()
        await self._health.release()


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
