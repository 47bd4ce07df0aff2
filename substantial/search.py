"""Find runs: filter expressions over what runs produced, and the listing the CLI and UI share.

A filter expression is JSON, as in the original package::

    {"or": [{"lt": 3}, {"contains": "fatal"}]}
    {"and": [{"status": {"eq": "failed"}}, {"started_at": {"gte": "2025-01-01"}}]}
    {"not": {"in": [1, 2, 3]}}

Each expression is an object with exactly one key:

* ``and`` / ``or``: a list of expressions; ``not``: one expression;
* ``eq``, ``gt``, ``gte``, ``lt``, ``lte``, ``in``, ``contains``: a term on the
  run's **value**: its result if it completed, its error as ``"Type: message"``
  if it failed or timed out, none otherwise (a term on no value is false);
* ``run_id``, ``workflow``, ``status``, ``started_at``, ``ended_at``: a term on
  that field, e.g. ``{"started_at": {"gte": "2025-01-01T00:00"}}``. Times are
  epoch seconds or ISO 8601 text (naive means local time); ``ended_at`` is none
  while the run is active.

``gt``/``gte``/``lt``/``lte`` compare two numbers or two strings (anything else
is false); ``eq`` is equality of JSON values; ``x in y`` holds if ``y`` is a
list holding ``x``, a string containing the string ``x``, or an object
containing every key and value of the object ``x``; ``contains`` is ``in``
the other way round.

Everything is answered from run metadata (which holds each run's status,
times, result and error), never by reading logs. Newest first (the default
order) on a store with an index in creation order (SQLite, Postgres, Redis:
``capabilities.list_recent``) walks ``Backend.list_recent`` and stops once the
page is full: the newest page costs a page of reads however many runs the
store holds. Elsewhere the listing reads up to ``scan_limit`` runs and sorts.
A ``status`` or ``workflow`` equality at the top level (alone or inside a
top-level ``and``) is handed to the backend's listing, which the SQL and
Redis backends answer from an index; the other terms are checked on each
listed run. A ``queue`` filter
reads the queue's own run (its log and inbox name every run started into
it) and then only those runs' metadata.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from substantial._queue_members import queued_run_ids
from substantial.backends._recent import check_before, sort_key
from substantial.backends.base import TERMINAL_STATUSES, Backend, RunInfo
from substantial.errors import InvalidArgument

__all__ = [
    "Page",
    "RunQuery",
    "check",
    "find_runs",
    "matches",
    "parse_cursor",
    "parse_time",
    "run_json",
    "search",
]

Expr = dict[str, Any]

_LOGIC = ("and", "or", "not")
_ORDER = ("gt", "gte", "lt", "lte")
_TERMS = ("eq", *_ORDER, "in", "contains")
_FIELDS = ("run_id", "workflow", "status", "started_at", "ended_at")
_TIME_FIELDS = ("started_at", "ended_at")


def _where(path: list[str]) -> str:
    return ".".join(path)


def _fail(path: list[str], message: str) -> InvalidArgument:
    return InvalidArgument(f"search expression at {_where(path)}: {message}")


def _only_key(expr: Any, path: list[str], allowed: tuple[str, ...]) -> tuple[str, Any]:
    if not isinstance(expr, dict) or len(expr) != 1:
        raise _fail(
            path,
            f"expected an object with exactly one key ({', '.join(allowed)}), got {_show(expr)}",
        )
    ((op, arg),) = expr.items()
    if op not in allowed:
        raise _fail(path, f"unknown operator {op!r}: use one of {', '.join(allowed)}")
    return op, arg


def _show(value: Any) -> str:
    text = orjson.dumps(value, default=repr).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def check(expr: Any, path: list[str] | None = None) -> None:
    """Raise :class:`InvalidArgument` naming the operator and what it expects if ``expr`` is bad."""
    path = path or ["<root>"]
    op, arg = _only_key(expr, path, (*_LOGIC, *_TERMS, *_FIELDS))
    here = [*path, op]
    if op in ("and", "or"):
        if not isinstance(arg, list) or not arg:
            raise _fail(here, f"{op!r} expects a non-empty list of expressions, got {_show(arg)}")
        for i, sub in enumerate(arg):
            check(sub, [*here, f"#{i}"])
    elif op == "not":
        check(arg, here)
    elif op in _FIELDS:
        term, value = _only_key(arg, here, _TERMS)
        _check_term(term, value, [*here, term], time_field=op in _TIME_FIELDS)
    else:
        _check_term(op, arg, here, time_field=False)


def _check_term(op: str, value: Any, path: list[str], *, time_field: bool) -> None:
    if time_field and op in (*_ORDER, "eq"):
        if not isinstance(value, (int, float, str)) or isinstance(value, bool):
            raise _fail(path, f"{op!r} on a time expects epoch seconds or ISO 8601 text")
        if isinstance(value, str):
            parse_time(value, what=f"{op!r} at {_where(path)}")
    elif op in _ORDER and (not isinstance(value, (int, float, str)) or isinstance(value, bool)):
        raise _fail(
            path, f"{op!r} expects a number or a string to compare with, got {_show(value)}"
        )
    elif op == "in" and not isinstance(value, (list, str, dict)):
        raise _fail(path, f"'in' expects a list, a string or an object, got {_show(value)}")


def _value_of(info: RunInfo) -> tuple[bool, Any]:
    """Return (has a value, the value): the result, or the error as ``Type: message``."""
    if info.status == "completed":
        return True, info.output
    if info.error is not None and info.status in ("failed", "timed_out"):
        return True, f"{info.error['type']}: {info.error['message']}"
    return False, None


def _field(info: RunInfo, name: str) -> tuple[bool, Any]:
    if name == "started_at":
        return True, info.created_at
    if name == "ended_at":
        ended = info.status in TERMINAL_STATUSES
        return ended, info.updated_at if ended else None
    return True, getattr(info, name)


def matches(info: RunInfo, expr: Expr) -> bool:
    """Tell whether one run's metadata satisfies a (checked) expression."""
    ((op, arg),) = expr.items()
    if op == "and":
        return all(matches(info, sub) for sub in arg)
    if op == "or":
        return any(matches(info, sub) for sub in arg)
    if op == "not":
        return not matches(info, arg)
    if op in _FIELDS:
        present, value = _field(info, op)
        ((term, operand),) = arg.items()
        if op in _TIME_FIELDS and isinstance(operand, str) and term in (*_ORDER, "eq"):
            operand = parse_time(operand)
        return present and _term(term, value, operand)
    present, value = _value_of(info)
    return present and _term(op, value, arg)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and orjson.dumps(a, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        b, option=orjson.OPT_SORT_KEYS
    )


def _term(op: str, value: Any, operand: Any) -> bool:
    if op == "eq":
        return _same(value, operand)
    if op in _ORDER:
        numbers = all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in (value, operand)
        )
        if not numbers and not (isinstance(value, str) and isinstance(operand, str)):
            return False
        if op == "gt":
            return bool(value > operand)
        if op == "gte":
            return bool(value >= operand)
        if op == "lt":
            return bool(value < operand)
        return bool(value <= operand)
    needle, haystack = (value, operand) if op == "in" else (operand, value)
    if isinstance(haystack, list):
        return any(_same(needle, item) for item in haystack)
    if isinstance(haystack, str):
        return isinstance(needle, str) and needle in haystack
    if isinstance(haystack, dict) and isinstance(needle, dict):
        return all(k in haystack and _same(v, haystack[k]) for k, v in needle.items())
    return False


_AGO = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h|d|w)")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str | float, *, now: float | None = None, what: str = "a time") -> float:
    """Read a time as epoch seconds: a number, ISO 8601 text, or an age like ``15m``/``2h``/``3d``.

    Naive ISO times are local time.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    raw = str(text).strip()
    try:
        return float(raw)
    except ValueError:
        pass
    ago = _AGO.fullmatch(raw)
    if ago:
        return (time.time() if now is None else now) - float(ago[1]) * _UNIT[ago[2]]
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InvalidArgument(
            f"{what}: cannot read {raw!r} as a time; use ISO 8601 (2025-01-31 or "
            "2025-01-31T12:00:00Z), epoch seconds, or an age such as 90s, 15m, 2h, 3d"
        ) from None


def parse_cursor(text: str, what: str = "--before ") -> tuple[float, str]:
    """Read a newest-first cursor written ``TIME,RUN``: a run's created_at and its id.

    ``what`` is how the cursor is given (``"--before "``, ``"before="``), for the error.
    """
    at, _, run_id = text.partition(",")
    try:
        if run_id and math.isfinite(float(at)):
            return float(at), run_id
    except ValueError:
        pass
    raise InvalidArgument(
        f"{what.strip()} {text!r}: give the created_at and run id of the last run of the "
        f"previous page, e.g. {what}1733140000.123456,run-42"
    )


def _pushdown(expr: Expr | None) -> dict[str, str]:
    """Find status/workflow equalities the whole expression requires, for list_runs' index."""
    if expr is None:
        return {}
    terms = expr.get("and", [expr])
    out: dict[str, str] = {}
    for term in terms:
        for name in ("status", "workflow"):
            sub = term.get(name) if isinstance(term, dict) and len(term) == 1 else None
            if isinstance(sub, dict) and isinstance(sub.get("eq"), str) and len(sub) == 1:
                out[name] = sub["eq"]
    return out


SORT_KEYS: dict[str, Callable[[RunInfo], Any]] = {
    "created": lambda i: (i.created_at, i.run_id),
    "updated": lambda i: i.updated_at,
    "id": lambda i: i.run_id,
    "status": lambda i: (i.status, i.run_id),
    "workflow": lambda i: (i.workflow, i.run_id),
}


@dataclass(frozen=True, slots=True)
class RunQuery:
    """Which runs to list, in which order, which page: the CLI's and the UI's filters."""

    status: str | None = None
    workflow: str | None = None
    parent: str | None = None
    #: Keep runs created at or after / before this time (epoch seconds).
    since: float | None = None
    until: float | None = None
    #: Keep runs whose id contains this text.
    text: str | None = None
    #: Keep runs started into this queue (read from the queue's own log, see _queue_members).
    queue: str | None = None
    where: Expr | None = None
    sort: str = "created"
    descending: bool = True
    limit: int = 50
    offset: int = 0
    #: Stop reading metadata after this many runs (a bound on the cost of one listing).
    scan_limit: int = 100_000
    #: Only runs after this one newest first: ``(created_at, run_id)`` of the last run of
    #: the previous page (a cursor: the next page without reading the ones before it).
    before: tuple[float, str] | None = None

    def __post_init__(self) -> None:
        if self.sort not in SORT_KEYS:
            raise InvalidArgument(
                f"cannot sort by {self.sort!r}: use one of {', '.join(SORT_KEYS)}"
            )
        if self.limit < 1 or self.offset < 0 or self.scan_limit < 1:
            raise InvalidArgument("limit and scan_limit must be at least 1, offset at least 0")
        if self.where is not None:
            check(self.where)
        object.__setattr__(self, "before", check_before(self.before))  # a JSON list, too

    def keeps(self, info: RunInfo) -> bool:
        """Tell whether one run passes every filter."""
        return (
            (self.status is None or info.status == self.status)
            and (self.workflow is None or info.workflow == self.workflow)
            and (self.parent is None or info.parent == self.parent)
            and (self.since is None or info.created_at >= self.since)
            and (self.until is None or info.created_at < self.until)
            and (self.text is None or self.text in info.run_id)
            and (self.where is None or matches(info, self.where))
            and (self.before is None or sort_key(info) < self.before)
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of runs, and how many matched in all."""

    runs: list[RunInfo]
    total: int
    scanned: int
    #: The scan stopped at ``scan_limit``: more runs exist that were not read.
    truncated: bool


async def find_runs(
    backend: Backend, query: RunQuery, progress: Callable[[int], None] | None = None
) -> Page:
    """Return the page of runs ``query`` asks for; ``progress(n)`` is told how many were read."""
    if query.queue is not None:
        return await _queue_page(backend, query, progress)
    pushed = _pushdown(query.where)
    status = query.status or pushed.get("status")
    workflow = query.workflow or pushed.get("workflow")
    if (query.status and pushed.get("status", query.status) != query.status) or (
        query.workflow and pushed.get("workflow", query.workflow) != query.workflow
    ):
        return Page([], 0, 0, False)  # the filters and the expression contradict each other
    if query.sort == "created" and query.descending and backend.capabilities.list_recent:
        # Without an index each list_recent call reads the whole store: one scan below is less.
        return await _newest_page(backend, query, status, workflow, progress)
    found: list[RunInfo] = []
    scanned = 0
    after: str | None = None
    truncated = False
    # In id order the first offset+limit matches are the page: no need to read further.
    enough = query.offset + query.limit if query.sort == "id" and not query.descending else None
    while True:
        batch = min(500, query.scan_limit - scanned)
        page = await backend.list_runs(status=status, workflow=workflow, limit=batch, after=after)
        scanned += len(page)
        found.extend(info for info in page if query.keeps(info))
        if progress is not None:
            progress(scanned)
        if len(page) < batch:
            break
        after = page[-1].run_id
        if scanned >= query.scan_limit:
            truncated = True
            break
        if enough is not None and len(found) > enough:
            truncated = True
            break
    found.sort(key=SORT_KEYS[query.sort], reverse=query.descending)
    return Page(found[query.offset : query.offset + query.limit], len(found), scanned, truncated)


async def _newest_page(
    backend: Backend,
    query: RunQuery,
    status: str | None,
    workflow: str | None,
    progress: Callable[[int], None] | None,
) -> Page:
    """Walk the store newest first (``list_recent``) until the page and one run more are found.

    On a store with an index in creation order the newest page costs a page
    of reads, not a scan; ``total`` then counts the runs found so far and
    ``truncated`` says more exist (``51+``). ``before`` and ``until`` start
    the walk there, ``since`` ends it.
    """
    want = query.offset + query.limit
    found: list[RunInfo] = []
    scanned = 0
    starts = [c for c in (query.before, None if query.until is None else (query.until, "")) if c]
    before = min(starts, default=None)
    batch = min(want + 1, 500)
    while True:
        batch = min(batch, query.scan_limit - scanned)
        page = await backend.list_recent(
            status=status, workflow=workflow, limit=batch, before=before
        )
        scanned += len(page)
        older = query.since is not None and bool(page) and page[-1].created_at < query.since
        found.extend(info for info in page if query.keeps(info))
        if progress is not None:
            progress(scanned)
        if len(found) > want:
            return Page(found[query.offset : want], len(found), scanned, True)
        if len(page) < batch or older:
            return Page(found[query.offset : want], len(found), scanned, False)
        if scanned >= query.scan_limit:
            return Page(found[query.offset : want], len(found), scanned, True)
        before = (page[-1].created_at, page[-1].run_id)
        batch = 500  # the filters passed too few: read on in larger pages


async def _queue_page(
    backend: Backend, query: RunQuery, progress: Callable[[int], None] | None
) -> Page:
    """Answer a query on one queue: its own log names its runs; read only their metadata."""
    assert query.queue is not None
    ids = await queued_run_ids(backend, query.queue)
    found: list[RunInfo] = []
    scanned = 0
    for i in range(0, min(len(ids), query.scan_limit), 64):
        chunk = ids[i : min(i + 64, query.scan_limit)]
        infos = await asyncio.gather(*(backend.get_run(run_id) for run_id in chunk))
        found.extend(info for info in infos if info is not None and query.keeps(info))
        scanned += len(chunk)
        if progress is not None:
            progress(scanned)
    found.sort(key=SORT_KEYS[query.sort], reverse=query.descending)
    page = found[query.offset : query.offset + query.limit]
    return Page(page, len(found), scanned, len(ids) > query.scan_limit)


async def search(
    backend: Backend,
    expr: Expr,
    *,
    workflow: str | None = None,
    status: str | None = None,
    limit: int = 1000,
) -> list[RunInfo]:
    """Return runs whose metadata satisfies ``expr``, newest first (see the module docs)."""
    query = RunQuery(status=status, workflow=workflow, where=expr, limit=limit)
    return (await find_runs(backend, query)).runs


def run_json(info: RunInfo) -> dict[str, Any]:
    """Return a run's metadata as the JSON ``--json`` and the UI give for it."""
    ended = info.status in TERMINAL_STATUSES
    return {
        "run_id": info.run_id,
        "workflow": info.workflow,
        "version": info.version,
        "status": info.status,
        "created_at": info.created_at,
        "updated_at": info.updated_at,
        "ended_at": info.updated_at if ended else None,
        "parent": info.parent,
        "deadline": info.deadline,
        "output": info.output,
        "error": info.error,
        "note": info.note,
        "published": info.published,
    }
