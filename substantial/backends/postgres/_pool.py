"""Opening the connection pool of a prefix, and its tables on first use."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any

import asyncpg

from substantial.backends._redact import redact_url
from substantial.backends.postgres._schema import Statements, ensure_schema
from substantial.errors import InvalidArgument

__all__ = ["Held", "open_pool"]

Conn = Any  # asyncpg.Connection: asyncpg ships no type information


async def open_pool(
    dsn: str,
    statements: Statements,
    *,
    size: int,
    connect_timeout: float,
    command_timeout: float,
    password: str | None,
    where: str,
) -> tuple[Any, bool]:
    """Open a pool of at most ``size`` connections and make sure the prefix's tables exist.

    Return the pool, and whether the write function (group commit) is there.
    """
    try:
        pool = await asyncpg.create_pool(
            dsn,
            min_size=1,
            max_size=size,
            timeout=connect_timeout,
            command_timeout=command_timeout,
            server_settings={"application_name": "substantial"},
            reset=_keep_session,
        )
    except ValueError as exc:  # asyncpg's verdict on the URL's options
        detail = str(exc).replace(password or "\0", "***")
        raise InvalidArgument(f"invalid Postgres URL {redact_url(dsn)!r}: {detail}") from exc
    try:
        async with pool.acquire() as conn:
            function = await ensure_schema(conn, statements, where)
    except BaseException:
        pool.terminate()
        raise
    return pool, function


async def _keep_session(_conn: Conn) -> None:
    """Return a connection to the pool as it is.

    Statements here change no session state (no SET, no LISTEN, no session
    locks), and asyncpg still rolls back a transaction left open; its
    default reset would add a round trip to every call.
    """


class Held:
    """Connections taken from the pool once and kept between calls: a small pool on the pool.

    asyncpg's acquire and release (a timeout task, the release bookkeeping)
    cost about as much client CPU as the statement's own round trip; a call
    takes a kept connection instead. At most ``size`` are out at once; a call
    finding none waits (up to ``timeout`` seconds) for one to be kept or for
    room to take another. A connection goes back to the pool when a call
    on it fails or is cancelled (the pool cleans it up) and when the backend
    closes.
    """

    def __init__(self, pool: Any, size: int, timeout: float) -> None:
        self.pool = pool
        self._size = size
        self._timeout = timeout
        self._out = 0  # connections taken from the pool and not given back
        self._idle: list[Conn] = []
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closing = False

    async def take(self) -> Conn:
        """Return a connection for one call: a kept one, else one from the pool."""
        deadline = None
        while True:
            if self._idle:
                conn = self._idle.pop()  # the last used: its caches are warm
                if _usable(conn):
                    return conn
                await self.give_back(conn)
                continue
            if self._out < self._size:
                self._out += 1
                try:
                    return await self.pool.acquire(timeout=self._timeout)
                except BaseException:
                    self._out -= 1
                    self._wake()
                    raise
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self._timeout
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                async with asyncio.timeout_at(deadline):
                    await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken, but leaving: the next waiter gets the turn
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def keep(self, conn: Conn) -> None:
        """Keep a connection whose call succeeded, for the next call."""
        if self._closing or not _usable(conn) or conn.is_in_transaction():
            await self.give_back(conn)  # the pool is closing, or the call left a mess
            return
        self._idle.append(conn)
        self._wake()

    async def give_back(self, conn: Conn) -> None:
        """Return a connection to the pool, which resets or closes it."""
        self._out -= 1
        self._wake()
        await self.pool.release(conn)  # nothing to do if the driver gave it back itself

    async def give_all_back(self) -> None:
        """Return every kept connection to the pool, and those of calls still running."""
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self.give_back(conn)


def _usable(conn: Conn) -> bool:
    """Tell whether a kept connection can serve a call.

    A connection the server closed is handed back to the pool by asyncpg
    itself, which then refuses every call on it, even ``is_closed()``.
    """
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:
        return False
