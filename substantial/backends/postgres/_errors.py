"""The one place asyncpg's errors become Substantial's, and URLs lose their passwords."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
from asyncpg import exceptions as px

from substantial.backends._redact import redact_url
from substantial.errors import BackendError, BackendUnavailable, InvalidArgument

__all__ = ["fail_each", "is_connection_error", "is_connection_lost", "parse_url", "translate"]

# The connection went away under the call: on a fresh connection the call may succeed.
_LOST: tuple[type[BaseException], ...] = (
    px.PostgresConnectionError,
    px.AdminShutdownError,
    px.CrashShutdownError,
    ConnectionError,
)

# The server cannot serve right now; nothing was written (a statement is atomic).
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    *_LOST,
    px.CannotConnectNowError,
    px.TooManyConnectionsError,
    px.QueryCanceledError,
    px.TransactionRollbackError,  # deadlock or serialization failure: retry as is
    px.InsufficientResourcesError,
    px.ReadOnlySQLTransactionError,  # a standby, or a primary being demoted
    OSError,
    TimeoutError,
    asyncio.TimeoutError,
)

_DENIED: tuple[type[BaseException], ...] = (
    px.InvalidAuthorizationSpecificationError,  # wrong password, no pg_hba.conf entry
    px.InsufficientPrivilegeError,
    px.InvalidCatalogNameError,  # no such database
)


def _closed(exc: BaseException) -> bool:
    # asyncpg's client-side errors: "connection is closed", "pool is closing". Others
    # (a bad value, "another operation is in progress") are bugs, not outages.
    return (
        isinstance(exc, asyncpg.InterfaceError)
        and not isinstance(exc, asyncpg.DataError)
        and ("closed" in str(exc) or "closing" in str(exc))
    )


def is_connection_lost(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the connection broke (worth one try on a fresh one)."""
    return isinstance(exc, _LOST) or _closed(exc)


def is_connection_error(exc: BaseException) -> bool:
    """Tell whether ``exc`` means the server cannot be reached or cannot serve now."""
    return isinstance(exc, _UNAVAILABLE) or _closed(exc)


def translate(exc: BaseException, action: str, where: str, password: str | None) -> BackendError:
    """Return the Substantial error for a driver error met while doing ``action``."""
    detail = f"{type(exc).__name__}: {exc}"
    if password:
        detail = detail.replace(password, "***")
    if isinstance(exc, _DENIED):
        return BackendError(
            f"Postgres at {where} refused {action}: {detail}. Check the user, password and "
            "database in the URL, pg_hba.conf, and that the user may create tables and use "
            "the ones with this prefix"
        )
    if isinstance(exc, px.DiskFullError):
        return BackendUnavailable(
            f"Postgres at {where} is out of disk space ({action}): free space, then retry"
        )
    if is_connection_error(exc):
        return BackendUnavailable(
            f"Postgres at {where} is unavailable ({action}): {detail}. Nothing was written, "
            "or the call can be retried as it is"
        )
    return BackendError(f"Postgres at {where} rejected {action}: {detail}")


def parse_url(url: str) -> tuple[str, str, str | None]:
    """Return ``(dsn, where, password)``: where names the server without credentials."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError as exc:
        raise InvalidArgument(f"invalid Postgres URL {redact_url(url)!r}: {exc}") from exc
    if parts.scheme not in ("postgres", "postgresql"):
        raise InvalidArgument(f"{redact_url(url)!r} is not a postgresql:// or postgres:// URL")
    user = unquote(parts.username) + "@" if parts.username else ""
    host = parts.netloc.rpartition("@")[2] or "localhost"
    where = f"{user}{host}{parts.path or '/'}"
    return url, where, None if password is None else unquote(password)


def fail_each(futures: Iterable[asyncio.Future[Any]], exc: BaseException) -> None:
    """Fail the callers of a batch that failed as a whole, each with its own error.

    A :class:`BackendError` is copied per caller, so tracebacks stay apart; a
    cancel or an exit of the batch cancels the callers.
    """
    for fut in futures:
        if fut.done():
            continue
        if isinstance(exc, BackendError):
            own = type(exc)(*exc.args)
            own.__cause__ = exc.__cause__
            fut.set_exception(own)
        elif isinstance(exc, Exception):
            fut.set_exception(exc)
        else:
            fut.cancel()
