"""Leases of the s3 backend: one object per run, replaced by compare-and-swap on its ETag.

The ETag of each lease this client wrote or read is remembered, so a renewal
by the holder costs one PUT; a take costs a GET and a PUT. A released lease
is an object with no owner (a CAS target like any other), never a deletion.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from substantial.backends import _hostile
from substantial.backends._common import lease_takable
from substantial.backends.base import Lease
from substantial.backends.s3._objects import ObjectStore, new_wid

__all__ = ["Leases"]


@dataclass(frozen=True, slots=True)
class _LeaseState:
    etag: str
    owner: str | None
    expires_at: float
    #: The stored object could not be read: it counts as expired, release removes it.
    unreadable: bool = False


class Leases:
    """The lease objects of one store, with the ETags this client last saw."""

    def __init__(
        self, objects: ObjectStore, key: Callable[[str], str], took: Callable[[], None]
    ) -> None:
        self._objects = objects
        self._lease_key = key
        self._on_take = took
        self._leases: OrderedDict[str, _LeaseState] = OrderedDict()

    def _remember(self, run_id: str, state: _LeaseState | None) -> None:
        if state is None:
            self._leases.pop(run_id, None)
            return
        self._leases[run_id] = state
        self._leases.move_to_end(run_id)
        if len(self._leases) > 10_000:
            self._leases.popitem(last=False)

    async def read(self, run_id: str) -> _LeaseState | None:
        obj = await self._objects.get(self._lease_key(run_id))
        if obj is None:
            self._remember(run_id, None)
            return None
        try:
            data = orjson.loads(obj.body)
            owner, expires_at = data.get("owner"), data.get("expires_at")
        except (orjson.JSONDecodeError, AttributeError):
            owner = expires_at = None
        if owner is None and expires_at == 0.0:
            state = _LeaseState(obj.etag, None, 0.0)  # released
        elif _hostile.lease_or_none(run_id, owner, expires_at) is not None:
            state = _LeaseState(obj.etag, owner, float(expires_at))
        else:
            # Unreadable: free to take, by CAS over it like any other lease.
            _hostile.warn_once(self, "lease", run_id, f"{obj.body[:80]!r}", "reading it as expired")
            state = _LeaseState(obj.etag, None, 0.0, unreadable=True)
        self._remember(run_id, state)
        return state

    async def write(
        self, run_id: str, owner: str | None, expires_at: float, if_match: str | None
    ) -> bool:
        wid = new_wid()
        body = orjson.dumps({"owner": owner, "expires_at": expires_at, "wid": wid})
        etag = await self._objects.put_if(self._lease_key(run_id), body, if_match=if_match, wid=wid)
        if etag is None:
            self._remember(run_id, None)
            return False
        self._remember(run_id, _LeaseState(etag, owner, expires_at))
        return True

    async def op(
        self, run_id: str, owner: str | None, ttl: float, take_from: str | None
    ) -> Lease | None:
        """Read the lease, or CAS it on the lease object's ETag; return it as it stands after.

        A renewal by the holder costs one PUT (the ETag is remembered); a take
        costs a GET and a PUT. Giving it up (``ttl`` 0) writes a released
        lease, never a deletion: the object stays a compare-and-swap target.
        """
        if owner is None:
            return _public(run_id, await self.read(run_id))
        now = time.time()
        new_owner, expires_at = (owner, now + ttl) if ttl > 0 else (None, 0.0)
        after = Lease(run_id, owner, expires_at) if ttl > 0 else None
        known = self._leases.get(run_id)
        if (
            known is not None
            and lease_takable(known.owner, known.expires_at, owner, take_from, now)
            and await self.write(run_id, new_owner, expires_at, known.etag)
        ):
            self._took(known.owner, new_owner)
            return after
        current = await self.read(run_id)
        if current is None and new_owner is None:
            return None  # nothing to give up
        if current is not None and not lease_takable(
            current.owner, current.expires_at, owner, take_from, time.time()
        ):
            return _public(run_id, current)
        if await self.write(run_id, new_owner, expires_at, current.etag if current else None):
            self._took(current.owner if current else None, new_owner)
            return after
        return _public(run_id, await self.read(run_id))  # another client changed it first

    def _took(self, previous: str | None, owner: str | None) -> None:
        if owner is not None and previous != owner:
            self._on_take()


def _public(run_id: str, state: _LeaseState | None) -> Lease | None:
    """Return the lease a stored state shows: none when released, expired if unreadable."""
    if state is not None and state.unreadable:
        return _hostile.unreadable_lease(run_id)
    if state is None or state.owner is None:
        return None
    return Lease(run_id, state.owner, state.expires_at)
