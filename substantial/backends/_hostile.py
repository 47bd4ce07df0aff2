"""Damaged or hostile records beside the log: read them without failing, warn once, move on.

Leases and due entries are hints kept beside the log (fencing comes from
the log's create-if-absent append), so one that cannot be read is replaced
or dropped instead of stopping every worker. Run metadata that cannot be
read is flagged by listings instead of failing the whole listing. Every
backend applies the same rules through the helpers here.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import replace

from substantial.backends.base import Lease, RunInfo, validate_id
from substantial.errors import CorruptRecord, InvalidArgument, ProtocolMismatch

__all__ = [
    "UNREADABLE_OWNER",
    "good_due",
    "is_unreadable",
    "is_valid_id",
    "lease_or_none",
    "listed",
    "read_listed",
    "unreadable_lease",
    "valid_time",
    "warn_once",
]

log = logging.getLogger("substantial.backend")

#: The owner reported for a lease that cannot be read; it expired at 0.0.
UNREADABLE_OWNER = "?"

# Per backend instance, so one process with many stores (tests) warns for each.
_warned: weakref.WeakKeyDictionary[object, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
_WARNED_MAX = 10_000


def warn_once(backend: object, what: str, run_id: object, detail: str, action: str) -> None:
    """Log one warning per backend, kind of record and run id, however often it is met."""
    seen = _warned.setdefault(backend, set())
    key = (what, repr(run_id))
    if key in seen:
        return
    if len(seen) >= _WARNED_MAX:
        seen.clear()  # a flood of damage must not grow memory without bound
    seen.add(key)
    log.warning("unreadable %s of run %r (%s); %s", what, run_id, detail, action)


def is_valid_id(value: object) -> bool:
    """Tell whether ``value`` is a well-formed run id (see ``validate_id``)."""
    if not isinstance(value, str):
        return False
    try:
        validate_id("run id", value)
    except InvalidArgument:
        return False
    return True


def valid_time(value: object) -> bool:
    """Tell whether ``value`` is a finite number of seconds (not a bool, a string or NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def good_due(run_id: object, at: object) -> bool:
    """Tell whether a due entry names a valid run id and a finite time."""
    return is_valid_id(run_id) and valid_time(at)


def lease_or_none(run_id: str, owner: object, expires_at: object) -> Lease | None:
    """Return the lease these stored fields describe, or None if they are unreadable."""
    if not isinstance(owner, str) or not owner or not valid_time(expires_at):
        return None
    return Lease(run_id, owner, float(expires_at))  # type: ignore[arg-type]


def unreadable_lease(run_id: str) -> Lease:
    """Stand in for a lease that cannot be read: expired, so anyone may take it."""
    return Lease(run_id, UNREADABLE_OWNER, 0.0)


def is_unreadable(lease: Lease) -> bool:
    """Tell whether ``lease`` is the stand-in of an unreadable one (release removes it)."""
    return lease.owner == UNREADABLE_OWNER and lease.expires_at == 0.0


def read_listed(backend: object, run_id: str, data: bytes) -> RunInfo:
    """Decode metadata for a listing: an unreadable record is flagged, not raised."""
    try:
        return RunInfo.from_bytes(run_id, data)
    except CorruptRecord as exc:
        detail = str(exc.__cause__ or exc)
        warn_once(backend, "metadata", run_id, detail, "listing it with status 'corrupt'")
        return RunInfo.unreadable(run_id, f"metadata cannot be decoded: {detail}")
    except ProtocolMismatch as exc:
        # Written by a newer release: unreadable here, like a corrupt record, and named so.
        warn_once(backend, "metadata", run_id, str(exc), "listing it with status 'corrupt'")
        flagged = RunInfo.unreadable(run_id, str(exc))
        return replace(flagged, error={"type": "ProtocolMismatch", "message": str(exc)})


def listed(info: RunInfo, status: str | None, workflow: str | None) -> bool:
    """Tell whether a listing filtered by ``status`` and ``workflow`` includes ``info``.

    An unreadable record has status ``corrupt`` and workflow ``?``: it is
    listed with no filter or with ``status="corrupt"``, never under another
    status.
    """
    return (status is None or info.status == status) and (
        workflow is None or info.workflow == workflow
    )
