"""Opening the connection pool of a prefix, and its tables on first use."""

from __future__ import annotations

from typing import Any

import asyncpg

from substantial.backends._redact import redact_url
from substantial.backends.postgres._schema import Statements, ensure_schema
from substantial.errors import InvalidArgument

__all__ = ["open_pool"]

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
