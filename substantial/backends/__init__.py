"""Storage backends, and :func:`from_url` to build one from a URL."""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlsplit

from substantial.backends._redact import redact_url
from substantial.backends.base import Backend
from substantial.errors import InvalidArgument

__all__ = ["Backend", "from_url", "redact_url"]


def from_url(url: str) -> Backend:
    """Build a backend from a URL.

    ``memory://``, ``file:///abs/dir`` (or ``file://./rel/dir``),
    ``sqlite:///path/to.db``, ``redis://[user:pass@]host:port/db?prefix=app``,
    ``rediss://...``, ``s3://bucket/prefix``,
    ``postgresql://user:pass@host:port/db?prefix=app`` (or ``postgres://``).
    A ``durability=fsync`` query parameter selects power-loss safety on the
    fs and sqlite backends.
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidArgument(f"malformed backend URL {redact_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    if scheme == "memory":
        from substantial.backends.memory import MemoryBackend

        return MemoryBackend()
    if scheme in ("file", "sqlite"):
        path = unquote(parts.netloc + parts.path)
        if not path:
            raise InvalidArgument(
                f"{redact_url(url)!r} names no path: use {scheme}:///absolute/path"
            )
        if parts.password is not None:
            # It would become part of the path, and of describe()'s output.
            raise InvalidArgument(f"{redact_url(url)!r}: {scheme}:// URLs take no password")
        durability = query.get("durability", "process")
        if durability not in ("process", "fsync"):
            raise InvalidArgument(
                f"durability={durability!r} in {redact_url(url)!r}: use 'process' or 'fsync'"
            )
        if scheme == "file":
            from substantial.backends.fs import FSBackend

            return FSBackend(path, durability=durability)  # type: ignore[arg-type]
        from substantial.backends.sqlite import SQLiteBackend

        return SQLiteBackend(path, durability=durability)  # type: ignore[arg-type]
    if scheme in ("redis", "rediss"):
        from substantial.backends.redis import RedisBackend

        return RedisBackend.from_url(url)
    if scheme == "s3":
        from substantial.backends.s3 import S3Backend

        return S3Backend.from_url(url)
    if scheme in ("postgres", "postgresql"):
        from substantial.backends.postgres import PostgresBackend

        return PostgresBackend.from_url(url)
    raise InvalidArgument(
        f"unknown backend URL scheme {scheme!r} in {redact_url(url)!r}: use memory://, file://, "
        "sqlite://, redis://, rediss://, s3:// or postgresql://"
    )
