"""Which backend opens which URL scheme: the built-in ones, and any a package registers.

A backend joins by registering its scheme, in one of two ways:

* in the process, with :func:`register_backend`::

      register_backend("toy", "toy_store:ToyBackend")

* from an installed package, through the ``substantial.backends`` entry
  point group (``pyproject.toml``)::

      [project.entry-points."substantial.backends"]
      toy = "toy_store:ToyBackend"

The target is a class with a ``from_url(url)`` classmethod (a
:class:`~substantial.backends.base.Backend` subclass), or any callable
taking the URL; ``"module:attribute"`` strings are imported on first use,
so an unused backend costs no import. Built-in schemes cannot be taken
over by an entry point: a package cannot silently replace ``s3://``.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any
from urllib.parse import urlsplit

from substantial.backends._redact import redact_url
from substantial.backends.base import Backend
from substantial.errors import InvalidArgument

__all__ = ["ENTRY_POINT_GROUP", "from_url", "known_schemes", "register_backend"]

log = logging.getLogger("substantial.backend")

#: The entry point group third-party backends register their schemes in.
ENTRY_POINT_GROUP = "substantial.backends"

Opener = Callable[[str], Backend]
Target = Opener | type[Backend] | str

_BUILTIN: dict[str, str] = {
    "memory": "substantial.backends.memory:MemoryBackend",
    "file": "substantial.backends.fs:FSBackend",
    "sqlite": "substantial.backends.sqlite:SQLiteBackend",
    "redis": "substantial.backends.redis:RedisBackend",
    "rediss": "substantial.backends.redis:RedisBackend",
    "unix": "substantial.backends.redis:RedisBackend",
    "s3": "substantial.backends.s3:S3Backend",
    "postgresql": "substantial.backends.postgres:PostgresBackend",
    "postgres": "substantial.backends.postgres:PostgresBackend",
}

_registered: dict[str, Target] = {}


def _check_scheme(scheme: str) -> str:
    lowered = scheme.lower() if isinstance(scheme, str) else ""
    if (
        not lowered
        or not lowered[0].isalpha()
        or not all(c.isalnum() or c in "+-." for c in lowered)
    ):
        raise InvalidArgument(
            f"invalid URL scheme {scheme!r}: use letters, digits, '+', '-' or '.', "
            "starting with a letter"
        )
    return lowered


def register_backend(scheme: str, target: Target, *, replace: bool = False) -> None:
    """Make :func:`from_url` open ``scheme://...`` URLs with ``target``.

    ``target`` is a Backend class (opened with its ``from_url``), a callable
    taking the URL, or a ``"module:attribute"`` string naming either.
    Registering a scheme that is already taken raises
    :class:`InvalidArgument` unless ``replace`` is true.
    """
    scheme = _check_scheme(scheme)
    if not replace and (scheme in _registered or scheme in _BUILTIN):
        raise InvalidArgument(
            f"the URL scheme {scheme!r} is already registered; pass replace=True to replace it"
        )
    _registered[scheme] = target


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        scheme = ep.name.lower()
        if scheme in _BUILTIN:
            log.warning(
                "ignoring the %s entry point %r (%s): %r is a built-in scheme",
                ENTRY_POINT_GROUP,
                ep.name,
                ep.value,
                scheme,
            )
            continue
        found.setdefault(scheme, ep)
    return found


def known_schemes() -> list[str]:
    """Return every scheme :func:`from_url` can open now, sorted."""
    return sorted({*_BUILTIN, *_registered, *_entry_points()})


def _load(target: Target, scheme: str) -> Opener:
    obj: Any = target
    if isinstance(target, str):
        module, sep, attr = target.partition(":")
        if not sep:
            raise InvalidArgument(
                f"the backend for {scheme}:// is registered as {target!r}: use 'module:attribute'"
            )
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    opener = getattr(obj, "from_url", obj)
    if not callable(opener):
        raise InvalidArgument(
            f"the backend registered for {scheme}:// ({target!r}) is neither a Backend class "
            "nor a callable taking the URL"
        )
    return opener  # type: ignore[no-any-return]


def _opener(scheme: str, url: str) -> Opener:
    target: Target | None = _registered.get(scheme) or _BUILTIN.get(scheme)
    if target is None:
        ep = _entry_points().get(scheme)
        if ep is None:
            schemes = ", ".join(f"{s}://" for s in known_schemes())
            raise InvalidArgument(
                f"unknown backend URL scheme {scheme!r} in {redact_url(url)!r}: use one of "
                f"{schemes}, or install the package that provides {scheme}:// (it registers "
                f"the scheme in the {ENTRY_POINT_GROUP!r} entry point group)"
            )
        target = ep.value
    return _load(target, scheme)


def from_url(url: str) -> Backend:
    """Build a backend from a URL, by the backend registered for its scheme.

    Built in: ``memory://``, ``file:///abs/dir`` (or ``file://./rel/dir``),
    ``sqlite:///path/to.db``, ``redis://[user:pass@]host:port/db?prefix=app``
    (also ``rediss://``, ``unix://``), ``s3://bucket/prefix``,
    ``postgresql://user:pass@host:port/db?prefix=app`` (or ``postgres://``).
    A ``durability=fsync`` query parameter selects power-loss safety on the
    fs and sqlite backends. Other schemes come from :func:`register_backend`
    and the ``substantial.backends`` entry point group.
    """
    if not isinstance(url, str):
        raise InvalidArgument(f"a backend URL must be a string, got {type(url).__name__}")
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError as exc:
        raise InvalidArgument(f"malformed backend URL {redact_url(url)!r}: {exc}") from None
    if not scheme:
        raise InvalidArgument(
            f"{redact_url(url)!r} names no scheme: use e.g. file:///var/lib/app or "
            "sqlite:///var/lib/app.db"
        )
    backend = _opener(scheme, url)(url)
    if not isinstance(backend, Backend):
        raise InvalidArgument(
            f"the backend registered for {scheme}:// returned {type(backend).__name__}, "
            "not a Backend"
        )
    return backend
