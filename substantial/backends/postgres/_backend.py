"""The Postgres backend: one database shared by every worker, through a connection pool."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg

from substantial.backends import _hostile
from substantial.backends._common import (
    Page,
    ack_ids,
    check_due,
    check_position,
    check_ttl,
    filtered_runs,
    gap_error,
    release_with_loop,
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
from substantial.backends.postgres import _recent as recent
from substantial.backends.postgres._errors import (
    is_connection_error,
    is_connection_lost,
    parse_url,
    translate,
)
from substantial.backends.postgres._listen import Listener
from substantial.backends.postgres._pool import Held, open_pool
from substantial.backends.postgres._reads import Reads
from substantial.backends.postgres._schema import (
    ACQUIRE,
    APPEND,
    GIVE_UP,
    PUT_RUN,
    SCHEDULE,
    SEND,
    START,
    UNSCHEDULE,
    Statements,
)
from substantial.backends.postgres._writes import Op, Outcome, WriteBatcher, unschedule_idle
from substantial.errors import (
    BackendUnavailable,
    InvalidArgument,
    PositionTaken,
    SubstantialError,
)

__all__ = ["PostgresBackend"]

T = TypeVar("T")
Conn = Any  # asyncpg.Connection: asyncpg ships no type information


# How long the first due() waits for the wake-up LISTEN to be in place, so a
# signal sent right after it is not missed.
_LISTEN_WAIT = 2.0


class PostgresBackend(Backend):
    """Store runs in PostgreSQL tables named ``<prefix>_*``; many machines share one database.

    Statements run on a pool of at most ``pool_size`` connections. A
    connection attempt gives up after ``connect_timeout`` seconds and a
    statement after ``command_timeout``, then the call raises
    :class:`BackendUnavailable`. ``prefix`` names the application's tables,
    so several applications can share one database. ``group_commit`` sends
    the writes of one event-loop iteration (appends, leases, metadata, due
    times and events of many runs) as one transaction. Durability is the
    server's: with the default ``synchronous_commit = on`` an acknowledged
    write survives a crash of the server or its machine.
    """

    name = "postgres"
    capabilities = Capabilities(
        wake_ups=True,
        group_commit=True,
        server_time=True,
        delete=True,
        list_recent=True,
        unschedule_idle=True,
    )

    def __init__(
        self,
        dsn: str = "postgresql://localhost/postgres",
        *,
        prefix: str = "substantial",
        pool_size: int = 10,
        connect_timeout: float = 5.0,
        command_timeout: float = 10.0,
        group_commit: bool = True,
    ) -> None:
        super().__init__()
        self._sql = Statements(prefix)
        self.prefix = prefix
        self._dsn, self._where, self._password = parse_url(dsn)
        if pool_size < 1:
            raise InvalidArgument(f"pool_size={pool_size}: use at least 1")
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: Any = None
        self._held: Held | None = None
        self._guard: AsyncGenerator[None, None] | None = None
        self._pool_lock = asyncio.Lock()
        self._closed = False
        self._group_commit = group_commit
        self._batcher = WriteBatcher(self._run, self._sql)
        self._batcher.enabled = group_commit
        self._reads = Reads(self._run, self._sql)
        #: Statements sent (round trips), by what they did: what a workload costs the server.
        self.requests: Counter[str] = Counter()
        self._listener = Listener(
            self._connect, self._sql.channel, self.waker, self._where, is_connection_error
        )
        self._listen_waited = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> PostgresBackend:
        """Open ``postgresql://user:pass@host:port/db?prefix=app`` (also ``postgres://``).

        ``prefix``, ``pool_size``, ``connect_timeout``, ``command_timeout`` and
        ``group_commit`` (``yes``/``no``) are read here; every other query
        parameter goes to asyncpg (``sslmode=require``, ...).
        """
        try:
            parts = urlsplit(url)
            query = parse_qsl(parts.query, keep_blank_values=True)
        except ValueError as exc:
            raise InvalidArgument(f"invalid Postgres URL {redact_url(url)!r}: {exc}") from exc
        rest: list[tuple[str, str]] = []
        for key, value in query:
            try:
                if key == "prefix":
                    kwargs["prefix"] = value
                elif key == "pool_size":
                    kwargs["pool_size"] = int(value)
                elif key in ("connect_timeout", "command_timeout"):
                    kwargs[key] = float(value)
                elif key == "group_commit":
                    kwargs[key] = value.lower() in ("1", "yes", "true", "on")
                else:
                    rest.append((key, value))
            except ValueError as exc:
                raise InvalidArgument(
                    f"{key}={value!r} in {redact_url(url)!r} is not a number"
                ) from exc
        return cls(urlunsplit(parts._replace(query=urlencode(rest))), **kwargs)

    def describe(self) -> str:
        """Return the server, database and prefix, without the password."""
        return f"postgres {self._where} prefix={self.prefix}"

    # -- connections and errors -------------------------------------------

    async def _connect(self) -> Conn:
        """Open a connection of its own (the wake-up listener's)."""
        return await asyncpg.connect(
            self._dsn,
            timeout=self.connect_timeout,
            command_timeout=self.command_timeout,
            server_settings={"application_name": "substantial listener"},
        )

    async def _get_pool(self) -> Held:
        if self._held is not None:
            return self._held
        if self._closed:
            raise BackendUnavailable(f"this backend for {self._where} is closed; open a new one")
        async with self._pool_lock:
            if self._pool is None:
                pool, function = await open_pool(
                    self._dsn,
                    self._sql,
                    size=self.pool_size,
                    connect_timeout=self.connect_timeout,
                    command_timeout=self.command_timeout,
                    password=self._password,
                    where=self._where,
                )
                self._pool = pool
                self._held = Held(pool, self.pool_size, self.connect_timeout)
                self._batcher.enabled = function and self._group_commit
                # Released when this loop shuts down if nobody closes the backend first.
                self._guard = await release_with_loop(self._release)
        assert self._held is not None
        return self._held

    async def _run(
        self, action: str, fn: Callable[[Conn], Awaitable[T]], *, retry: bool = True
    ) -> T:
        """Run ``fn`` on a connection of the pool, translating driver errors (the one place).

        A connection found broken (the server restarted since it was last
        used) is replaced and the call tried once more, unless ``retry`` is
        False: a call that may have been applied must not run twice.
        """
        attempts = 2 if retry else 1
        for attempt in range(attempts):
            # "read the log of run 'x'" counts as "read the log of run".
            self.requests[action.partition(" '")[0]] += 1
            try:
                held = await self._get_pool()
                conn = await held.take()
                try:
                    result = await fn(conn)
                except BaseException:
                    await held.give_back(conn)
                    raise
                await held.keep(conn)
                return result
            except SubstantialError:
                raise
            except Exception as exc:
                if attempt + 1 < attempts and is_connection_lost(exc):
                    continue
                raise translate(exc, action, self._where, self._password) from exc
        raise AssertionError("unreachable")

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Insert the entry; the primary key (run_id, position) refuses a taken position."""
        validate_id("run id", run_id)
        check_position(run_id, position)
        outcome = await self._write(Op(APPEND, run_id, position, blob=bytes(entry)))
        if outcome.state == 1:
            raise PositionTaken(run_id, position)
        if outcome.state == 2:
            raise gap_error(run_id, position)

    async def start_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool | None:
        """Insert the entry at 0 and, if it went in, the metadata and due row: one transaction."""
        validate_id("run id", info.run_id)
        at = check_due(info.run_id, due_at, None)
        blob = info.to_bytes()
        op = Op(START, info.run_id, 0, info.workflow, info.status, bytes(entry), at, blob2=blob)
        return (await self._write(op)).state == 0

    # -- writes, alone or together (group commit) -------------------------

    async def _write(self, op: Op) -> Outcome:
        return await self._batcher.write(op)

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Select entries from ``start`` in position order and stop at the first gap."""
        validate_id("run id", run_id)
        check_position(run_id, start, "log start")
        rows = await self._reads.log(run_id, start)
        out: list[bytes] = []
        for expected, (position, entry) in enumerate(rows, start):
            if position != expected:
                break
            out.append(bytes(entry))
        return out

    # -- the inbox --------------------------------------------------------

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Delete the acknowledged events and select the rest in ``seq`` order: one statement."""
        validate_id("run id", run_id)
        ids = ack_ids(ack)
        if ids:
            sql = self._sql["ack_read"]
            rows = await self._run(
                f"read the inbox of run {run_id!r}", lambda c: c.fetch(sql, run_id, ids)
            )
        else:
            rows = await self._reads.inbox(run_id)
        return [Event(event_id, bytes(data), posted_at) for event_id, data, posted_at in rows]

    # -- the due index ----------------------------------------------------

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Insert the event, if any, upsert (or delete) the ``due`` row, notify: one statement."""
        at = check_due(run_id, at, event)
        if event is not None:
            assert at is not None  # check_due refuses an event without a time
            data = bytes(event.data)
            op = Op(SEND, run_id, text1=event.event_id, blob=data, num1=time.time(), num2=at)
            return (await self._write(op)).state == 1
        await self._write(Op(UNSCHEDULE, run_id) if at is None else Op(SCHEDULE, run_id, num1=at))
        return False

    async def unschedule_idle(self, run_id: str) -> bool:
        """Delete the run's due row unless an event waits: the row locked, then the inbox read."""
        validate_id("run id", run_id)
        action = f"unschedule run {run_id!r}"
        return await self._run(action, lambda c: unschedule_idle(c, self._sql, run_id))

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """Walk the ``(at, run_id)`` index: the runs due by ``now``, and the one after them."""
        await self._start_listening()
        self.waker.clear()  # this read covers every signal sent so far
        limit = max(0, limit)
        for _ in range(16):
            rows = await self._run(
                "read the due index", lambda c: c.fetch(self._sql["due_head"], limit + 1, now)
            )
            bad = [tuple(r) for r in rows if not _hostile.good_due(*r)]
            if not bad:
                break
            await self._repair_due(bad)
        runs = [(run_id, float(at)) for run_id, at in rows[:limit] if at <= now]
        rest = rows[len(runs) :]
        return DueRuns(runs, float(rest[0][1]) if rest else None)

    async def _repair_due(self, rows: list[tuple[Any, ...]]) -> None:
        """Remove due rows no worker can act on; a good run id with a bad time is due now."""
        fix: list[str] = []
        drop: list[str] = []
        for run_id, at in rows:
            valid = _hostile.is_valid_id(run_id)
            action = "scheduling it now" if valid else "removing it from the due index"
            _hostile.warn_once(self, "due entry", run_id, f"due at {at!r}", action)
            (fix if valid else drop).append(run_id)
        try:
            await self._run(
                "repair the due index",
                lambda c: c.execute(self._sql["due_repair"], fix, drop, time.time()),
            )
        except BackendUnavailable as exc:
            _hostile.log.warning("could not drop bad due entries: %s", exc)

    # -- leases -----------------------------------------------------------

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read the lease row, or upsert (or delete) it where allowed, on the server's clock."""
        validate_id("run id", run_id)
        ttl = check_ttl(ttl)
        if owner is None:
            found = await self._run(
                f"read the lease of run {run_id!r}",
                lambda c: c.fetchrow(self._sql["get_lease"], run_id),
            )
            return None if found is None else self._check_lease(run_id, found[0], found[1])
        if ttl > 0:
            got = await self._write(Op(ACQUIRE, run_id, text1=owner, text2=take_from, num1=ttl))
            done: Any = got.new_expiry
        else:
            got = await self._write(Op(GIVE_UP, run_id, text1=owner, text2=take_from))
            done = got.state == 1
        old_owner, old_expiry = got.owner, got.old_expiry
        if not done:
            return None if old_owner is None else self._check_lease(run_id, old_owner, old_expiry)
        if old_owner is not None:
            self._check_lease(run_id, old_owner, old_expiry, "replaced it")
        return Lease(run_id, owner, float(done)) if ttl > 0 else None

    def _check_lease(
        self, run_id: str, owner: Any, expires_at: Any, action: str = "reading it as expired"
    ) -> Lease:
        lease = _hostile.lease_or_none(run_id, owner, expires_at)
        if lease is None:
            detail = f"owner {owner!r}, expires at {expires_at!r}"
            _hostile.warn_once(self, "lease", run_id, detail, action)
            return _hostile.unreadable_lease(run_id)
        return lease

    # -- run metadata -----------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Insert or replace the run's row (one statement: readers see old or new)."""
        validate_id("run id", info.run_id)
        op = Op(PUT_RUN, info.run_id, text1=info.workflow, text2=info.status, blob=info.to_bytes())
        await self._write(op)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """Select runs in id order through the matching index; unreadable ones list as corrupt."""
        # Unreadable metadata lists as "corrupt", which no status column holds: read all.
        by_status = status if status != "corrupt" else None
        sql = self._sql.list_runs(by_status is not None, workflow is not None)
        filters = [v for v in (by_status, workflow) if v is not None]

        async def fetch(cursor: str | None, n: int) -> Page:
            args = [cursor or "", *filters, n]
            rows = await self._run("list runs", lambda c: c.fetch(sql, *args))
            return [(run_id, bytes(data)) for run_id, data in rows], len(rows) >= n

        async def fetch_ids(wanted: list[str]) -> Page:
            found = await self._reads.runs(wanted)
            return [(r, found.get(r)) for r in wanted], False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=max(limit, 100) if status == "corrupt" else limit,
            ids=ids,
            fetch_ids=fetch_ids,
        )

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """Walk the creation-time index backwards from the cursor (``_recent.py``)."""
        return await recent.list_recent(
            self, self._run, self._sql.table("runs"), status, workflow, limit, before
        )

    # -- retention --------------------------------------------------------

    async def delete(self, run_id: str) -> bool:
        """Delete the run's rows from every table in one statement: all go, or none."""
        validate_id("run id", run_id)
        sql = self._sql["delete_run"]
        found = await self._run(f"delete run {run_id!r}", lambda c: c.fetchval(sql, run_id))
        return bool(found)

    # -- lifecycle and wake-ups -------------------------------------------

    async def _start_listening(self) -> None:
        self._listener.start()
        if not self._listen_waited:
            # Once: a signal sent right after our first poll must find us listening.
            self._listen_waited = True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(_LISTEN_WAIT, self.connect_timeout)):
                    await self._listener.listening.wait()

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a NOTIFY says work is due (here or in another process), or ``timeout``.

        A signal that arrived since the last :meth:`due` counts at once.
        """
        self._listener.start()
        return await self.waker.wait(timeout)

    async def _release(self) -> None:
        """Settle queued appends, stop listening, close the pool; a later call reopens."""
        self._guard = None
        await self._batcher.drain()
        await self._listener.stop()
        self._listen_waited = False
        pool, self._pool = self._pool, None
        held, self._held = self._held, None
        if held is not None:
            await held.give_all_back()
        if pool is not None:
            try:
                async with asyncio.timeout(5):
                    await pool.close()
            except TimeoutError:
                pool.terminate()

    async def close(self) -> None:
        """Settle queued appends, stop listening and close the pool."""
        await self._batcher.drain()
        self._closed = True
        await self._listener.close()
        guard, self._guard = self._guard, None
        if guard is not None:
            await guard.aclose()  # runs _release, once
        else:
            await self._release()
