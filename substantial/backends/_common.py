"""Code every backend would otherwise repeat: each rule written once, here.

* :func:`check_durability` - the one check of a ``durability=`` argument.
* :func:`local_store_url` - reading ``file://`` and ``sqlite://`` URLs.
* :func:`lease_takable` - when a lease may be taken (free, expired, ours, or named).
* :func:`filtered_runs` - the listing loop: page through metadata in run id
  order, decode each record (flagging unreadable ones) and apply the filters.
* :func:`recent_runs` - the same loop over an index in creation order,
  newest first (``list_recent``).
* :func:`reraise_lost_cancel` - the guard against a driver that swallows a
  ``cancel()``.
* :func:`release_with_loop` - closing a client its user never closed, when
  its event loop shuts down.
* The checks that make every backend answer bad input alike:
  :func:`check_position`, :func:`check_time`, :func:`check_due`,
  :func:`check_ttl`, :func:`gap_error` and :func:`ack_ids`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Sequence
from dataclasses import replace
from typing import TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

from substantial.backends._hostile import is_valid_id, listed, read_listed
from substantial.backends._recent import Cursor
from substantial.backends._redact import redact_url
from substantial.backends.base import Durability, NewEvent, RunInfo, validate_id
from substantial.errors import InvalidArgument

__all__ = [
    "Page",
    "RecentPage",
    "ack_ids",
    "check_due",
    "check_durability",
    "check_position",
    "check_time",
    "check_ttl",
    "filtered_runs",
    "gap_error",
    "lease_takable",
    "local_store_url",
    "recent_runs",
    "release_with_loop",
    "reraise_lost_cancel",
]


def check_durability(value: object) -> Durability:
    """Return ``value`` if it names a durability mode; raise :class:`InvalidArgument` if not."""
    if value not in ("process", "fsync"):
        raise InvalidArgument(f"durability={value!r}: use 'process' or 'fsync'")
    return value


def check_position(run_id: str, position: object, what: str = "log position") -> int:
    """Return ``position`` if it is a whole number >= 0; raise :class:`InvalidArgument` if not."""
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
        raise InvalidArgument(f"{what} {position!r} of run {run_id!r} is not a whole number >= 0")
    return position


def gap_error(run_id: str, position: int) -> InvalidArgument:
    """Return the error for an append that would leave position ``position - 1`` empty."""
    return InvalidArgument(
        f"position {position} leaves a gap in the log of run {run_id!r}: position "
        f"{position - 1} is empty; append at the first free position"
    )


def check_time(at: object) -> float:
    """Return ``at`` as a float if it is a finite number of seconds; raise if not."""
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise InvalidArgument(f"time {at!r} is not a finite number of seconds since the epoch")
    return float(at)


def check_ttl(ttl: object) -> float:
    """Return ``ttl`` as a float if it is a finite number of seconds >= 0; raise if not."""
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 <= ttl < math.inf:
        raise InvalidArgument(f"lease ttl {ttl!r} is not a finite number of seconds >= 0")
    return float(ttl)


def check_due(run_id: str, at: object, event: object) -> float | None:
    """Check the arguments of ``set_due``; return ``at`` as a float, or None.

    An event makes its run due: it comes with a time, never with None.
    """
    validate_id("run id", run_id)
    if event is not None:
        if not isinstance(event, NewEvent):
            raise InvalidArgument(f"event {event!r} is not a NewEvent(event_id, data)")
        validate_id("event id", event.event_id)
        if at is None:
            raise InvalidArgument(
                f"an event for run {run_id!r} makes it due: give a time, not None"
            )
    return None if at is None else check_time(at)


def ack_ids(event_ids: Sequence[object]) -> list[str]:
    """Return the well-formed ids of ``event_ids``, each once, in order.

    Acknowledging is cleanup: an id that no event can have is ignored like
    one that is not in the inbox, never an error (and never used in a key).
    """
    return list(dict.fromkeys(e for e in event_ids if isinstance(e, str) and is_valid_id(e)))


def local_store_url(url: str) -> tuple[str, Durability]:
    """Return the path and durability a ``file://`` or ``sqlite://`` URL names.

    ``file:///abs/dir`` or ``file://./rel/dir``; ``?durability=fsync`` selects
    power-loss safety (default ``process``).
    """
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidArgument(f"malformed backend URL {redact_url(url)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    path = unquote(parts.netloc + parts.path)
    if not path:
        raise InvalidArgument(f"{redact_url(url)!r} names no path: use {scheme}:///absolute/path")
    if parts.password is not None:
        # It would become part of the path, and of describe()'s output.
        raise InvalidArgument(f"{redact_url(url)!r}: {scheme}:// URLs take no password")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    durability = query.get("durability", "process")
    if durability not in ("process", "fsync"):
        raise InvalidArgument(
            f"durability={durability!r} in {redact_url(url)!r}: use 'process' or 'fsync'"
        )
    return path, check_durability(durability)


def lease_takable(
    holder: str | None, expires_at: float, owner: str, take_from: str | None, now: float
) -> bool:
    """Tell whether ``owner`` may take a lease now held by ``holder`` until ``expires_at``.

    Free (no holder), expired, already ``owner``'s (a renewal), or held by
    ``take_from`` (a takeover the caller decided on). An unreadable lease is
    reported with expiry 0.0, so it is always takable.
    """
    return (
        holder is None
        or expires_at <= now
        or holder == owner
        or (take_from is not None and holder == take_from)
    )


#: One page of a listing: ``(run_id, stored metadata)`` in run id order, and whether more
#: may follow. The metadata is the stored bytes, an already decoded (or flagged) RunInfo,
#: or None for an id whose metadata is missing (a run half created): it is skipped.
Page: TypeAlias = tuple[Sequence[tuple[str, "bytes | RunInfo | None"]], bool]


async def filtered_runs(
    backend: object,
    fetch: Callable[[str | None, int], Awaitable[Page]],
    *,
    status: str | None,
    workflow: str | None,
    limit: int,
    after: str | None,
    page_size: int,
    ids: Sequence[str] | None = None,
    fetch_ids: Callable[[list[str]], Awaitable[Page]] | None = None,
) -> list[RunInfo]:
    """Collect up to ``limit`` runs after ``after`` that pass the filters, paging with ``fetch``.

    ``fetch(cursor, n)`` returns up to ``n`` entries with ids above
    ``cursor`` (None: from the first). A backend that can filter on its
    side may do so in ``fetch``; the filters are applied here again, since
    unreadable metadata lists as ``corrupt`` whatever the store's columns say.
    With ``ids``, only those runs are read, with ``fetch_ids(sorted ids)``.
    """
    out: list[RunInfo] = []
    if limit <= 0:
        return out
    if ids is not None:
        if fetch_ids is None:
            raise TypeError("filtered_runs with ids needs fetch_ids")
        wanted = sorted({validate_id("run id", r) for r in ids})
        wanted = [r for r in wanted if after is None or r > after]
        pages = [(await fetch_ids(wanted))[0]] if wanted else []
    else:
        pages = []
    cursor = after
    while len(out) < limit:
        if ids is not None:
            if not pages:
                break
            items, more = pages.pop(), False
        else:
            items, more = await fetch(cursor, page_size)
        for run_id, data in items:
            if data is None:
                continue
            info = data if isinstance(data, RunInfo) else read_listed(backend, run_id, data)
            if listed(info, status, workflow):
                out.append(info)
                if len(out) >= limit:
                    break
        if not more or not items:
            break
        cursor = items[-1][0]
    return out


#: The largest page ``recent_runs`` grows to while filters pass few of the runs read.
RECENT_PAGE_MAX = 1000

#: One page of a creation-time index, newest first: ``(run_id, created_at as indexed,
#: stored metadata)`` (metadata as in :data:`Page`), and whether more may follow.
RecentPage: TypeAlias = tuple[Sequence[tuple[str, float, "bytes | RunInfo | None"]], bool]


async def recent_runs(
    backend: object,
    fetch: Callable[[Cursor | None, int], Awaitable[RecentPage]],
    *,
    status: str | None,
    workflow: str | None,
    limit: int,
    before: Cursor | None,
    page_size: int,
) -> list[RunInfo]:
    """Collect up to ``limit`` runs after ``before``, newest first, paging with ``fetch``.

    ``fetch(cursor, n)`` returns up to ``n`` index entries ordered after
    ``cursor`` (None: from the newest). The filters are applied here (again:
    unreadable metadata lists as ``corrupt``); such a run keeps the time the
    index holds for it, so the page's last run is always a cursor that
    continues where the index left off.
    """
    out: list[RunInfo] = []
    cursor = before
    while len(out) < limit:
        items, more = await fetch(cursor, page_size)
        for run_id, at, data in items:
            if data is None:
                continue  # indexed by a write that has not (or never) stored the metadata
            info = data if isinstance(data, RunInfo) else read_listed(backend, run_id, data)
            if info.status == "corrupt":
                info = replace(info, created_at=at)
            if listed(info, status, workflow):
                out.append(info)
                if len(out) >= limit:
                    break
        if not more or not items:
            break
        cursor = (items[-1][1], items[-1][0])
        # The filters passed too few: read on in larger pages (fewer round trips).
        page_size = min(page_size * 2, max(page_size, RECENT_PAGE_MAX))
    return out


@contextlib.contextmanager
def reraise_lost_cancel() -> Iterator[None]:
    """Raise :class:`asyncio.CancelledError` after the block if a cancel landed in it unseen.

    On Python 3.11, ``asyncio.wait_for`` (used inside drivers) returns
    normally when the awaited future completes in the same loop iteration as
    a ``cancel()`` of the caller, and the cancellation is lost: a worker told
    to stop would go on. The task's cancel count still shows it.
    """
    task = asyncio.current_task()
    before = task.cancelling() if task is not None else 0
    yield
    if task is not None and task.cancelling() > before:
        raise asyncio.CancelledError


async def release_with_loop(release: Callable[[], Awaitable[None]]) -> AsyncGenerator[None, None]:
    """Have the running event loop call ``release`` when it shuts down; return the guard.

    A user who never closes a backend (the seed's pattern: run, stop the
    worker, return from ``asyncio.run``) must not see "Unclosed client
    session" at exit. ``asyncio.run`` closes every async generator still
    open in its loop before closing the loop; the guard is one, so its
    ``finally`` releases the client while the loop can still run it. The
    caller keeps the guard (the loop holds it weakly) and, on an explicit
    close, calls ``await guard.aclose()``, which releases once.
    """

    async def guard() -> AsyncGenerator[None, None]:
        try:
            yield
        finally:
            await release()

    agen = guard()
    await agen.__anext__()
    return agen
