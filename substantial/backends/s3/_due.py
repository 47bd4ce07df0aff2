"""The s3 backend's due index, and polling it for work.

``p/due/<µs, 17 digits>!<run>!<wid>`` keys sort in (time, run id) order, so
listing ``p/due/`` up to now finds due runs without touching any other run.
A per-run pointer object ``p/runs/<run>/due`` names the live key; keys it
does not name are leftovers of a crash or a concurrent reschedule and are
skipped, then deleted once old. S3 has no notifications: waiting polls the
index with a backoff, and work made due in this process wakes its waiters
at once.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import orjson

from substantial.backends import _hostile
from substantial.backends._common import reraise_lost_cancel
from substantial.backends.base import DueRuns, Waker
from substantial.backends.s3._objects import Listed, ObjectStore, new_wid
from substantial.errors import BackendUnavailable

__all__ = ["DueIndex"]

#: Due times are integer microseconds since the epoch, zero-padded (good until year 5138).
TIME_DIGITS = 17
#: Sorts below every character allowed in ids, so key order is (time, run id) order
#: on every server: '/' would not be, as servers differ in how they order it.
SEP = "!"
#: A due key that its run's pointer does not name, older than this (server clock), is
#: deleted. Younger ones may belong to a schedule call that has not written its pointer yet.
ORPHAN_GRACE = 60.0
#: How long a due key checked against its pointer is trusted before it is checked again.
VALID_TTL = 30.0
#: How far before the last due() call a poll looks for keys that landed late.
PEEK_LOOKBACK = 60.0


# Due indexes of this process by store, so a client that makes work due wakes a worker
# sharing its process at once instead of at its next poll.
_LOCAL: dict[str, weakref.WeakSet[DueIndex]] = {}


def _us(at: float) -> int:
    # Past the key's digits (year 5138), the last key time: a longer key would sort wrong.
    return min(max(0, int(at * 1_000_000)), 99_999_999_999_999_999)


@dataclass(frozen=True, slots=True)
class _DueKey:
    key: str
    name: str
    at_us: int
    run_id: str
    last_modified: float


@dataclass(frozen=True, slots=True)
class _Pointer:
    etag: str
    name: str | None
    at: float


class DueIndex:
    """The due keys and pointers of one store, with what this client knows of them."""

    def __init__(
        self, objects: ObjectStore, waker: Waker, *, min_poll: float, max_poll: float
    ) -> None:
        self._objects = objects
        self.waker = waker
        self.min_poll = min_poll
        self.max_poll = max_poll
        self._prefix = objects.key_prefix
        self._due_prefix = f"{self._prefix}due/"
        self._store_id = f"{objects.server_id}|{self._prefix}"
        # Due keys that cannot be parsed, to delete at the next due().
        self._junk: set[str] = set()
        # Due keys checked against their run's pointer: key -> (exact time, checked at).
        self._valid: dict[str, tuple[float, float]] = {}
        # Due keys the last due() call returned, and when it ran: what a poll need not report.
        self._returned: set[str] = set()
        # (now in µs, server time) of the last due() call; a poll reports only what is newer.
        self._checked: tuple[int, float] = (0, 0.0)
        self.poll_interval = min_poll
        self.due_hint: float | None = None
        _LOCAL.setdefault(self._store_id, weakref.WeakSet()).add(self)

    def pointer_key(self, run_id: str) -> str:
        """Return the key of the run's pointer object."""
        return f"{self._prefix}runs/{run_id}/due"

    def _parse_due(self, item: Listed) -> _DueKey | None:
        name = item.key[len(self._due_prefix) :]
        parts = name.split(SEP)
        if (
            len(parts) != 3
            or not (parts[0].isascii() and parts[0].isdigit())
            or not _hostile.is_valid_id(parts[1])
        ):
            # Not a key any worker can act on: skip it rather than fail every worker,
            # and have the next due() delete it.
            self._junk.add(item.key)
            return None
        return _DueKey(item.key, name, int(parts[0]), parts[1], item.last_modified)

    async def _drop_junk(self) -> None:
        """Delete the due keys _parse_due could not read; a run whose live key it was is due now."""
        junk, self._junk = self._junk, set()
        for key in junk:
            name = key[len(self._due_prefix) :]
            run_id = name.split(SEP)[1] if name.count(SEP) == 2 else ""
            live = False
            if _hostile.is_valid_id(run_id):
                pointer = await self.read_pointer(run_id)
                live = pointer is not None and pointer.name == name
            action = "scheduling its run now" if live else "removing it from the due index"
            _hostile.warn_once(self._objects, "due entry", name, "not <time>!<run id>!<id>", action)
            await self._objects.delete(key)
            if live:
                await self.schedule(run_id, time.time())

    async def read_pointer(self, run_id: str) -> _Pointer | None:
        obj = await self._objects.get(self.pointer_key(run_id))
        if obj is None:
            return None
        try:
            data = orjson.loads(obj.body)
            name = data.get("key")
            return _Pointer(obj.etag, name if isinstance(name, str) else None, float(data["at"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            # Written only by us; if damaged, the next schedule replaces it.
            return _Pointer(obj.etag, None, 0.0)

    async def schedule(self, run_id: str, at: float) -> None:
        """Put a new due key, move the run's pointer to it (CAS), then delete the old key.

        Each move of the pointer is one successful compare-and-swap, and the
        writer that made it deletes the key it replaced, so concurrent
        schedules leave exactly one key. A schedule that loses the CAS to
        another schedule takes effect just before the winner (which replaces
        it), deletes its own key, and returns; one that loses it to an
        unschedule (the pointer names no key now) tries again after it. A crash in
        between leaves an extra key that no pointer names: due() skips it and
        deletes it once it is older than ORPHAN_GRACE.
        """
        name = f"{_us(at):0{TIME_DIGITS}d}{SEP}{run_id}{SEP}{new_wid()}"
        key = f"{self._due_prefix}{name}"
        # The key name holds a fresh write id, so the pointer's body (and ETag) is unique.
        body = orjson.dumps({"key": name, "at": at})
        started = time.monotonic()
        old, _ = await asyncio.gather(self.read_pointer(run_id), self._objects.put(key, b""))
        pointer = self.pointer_key(run_id)
        won = await self._objects.put_if(pointer, body, if_match=old.etag if old else None)
        while won is None:
            # Lost the CAS. To another schedule: it takes effect after ours, which stands
            # replaced. To an unschedule (the pointer now names no key, or is gone): ours
            # comes after it and must take effect, or a post's event would wait unscheduled.
            old = await self.read_pointer(run_id)
            if old is not None and old.name is not None:
                await self._objects.delete(key)
                return
            won = await self._objects.put_if(pointer, body, if_match=old.etag if old else None)
        if time.monotonic() - started > ORPHAN_GRACE / 2:
            # So slow that another worker may have collected our key as an orphan: put it back.
            await self._objects.put(key, b"")
        old_key = f"{self._due_prefix}{old.name}" if old and old.name else None
        checked = time.monotonic()
        for backend in self._local_peers():
            # Known valid here and now: spare every worker of this process a GET.
            backend._valid[key] = (at, checked)
            if old_key is not None:
                backend._valid.pop(old_key, None)
        if old_key is not None and old_key != key:
            await self._objects.delete(old_key)
        self._note_local_schedule(at)

    async def unschedule_idle(self, run_id: str, waiting: Callable[[], Awaitable[bool]]) -> bool:
        """Point the run at no due key unless ``waiting()``: a CAS on its pointer.

        A post stores its event, then schedules. An event stored before
        ``waiting()`` is seen (False). One stored after comes with a schedule
        whose CAS meets this one: first, and this CAS fails (False); second, and
        it finds the pointer naming no key and tries again (:meth:`schedule`).
        The pointer stays, naming no key (a delete could not be conditional on
        every server), with a fresh write id so that its ETag is new.
        """
        old = await self.read_pointer(run_id)
        if await waiting():
            return False
        if old is None or old.name is None:
            return True
        body = orjson.dumps({"key": None, "at": 0.0, "wid": new_wid()})
        if await self._objects.put_if(self.pointer_key(run_id), body, if_match=old.etag) is None:
            return False  # moved meanwhile, by a schedule (maybe a post's)
        old_key = f"{self._due_prefix}{old.name}"
        for backend in self._local_peers():
            backend._valid.pop(old_key, None)
        await self._objects.delete(old_key)
        return True

    async def unschedule(self, run_id: str) -> None:
        """Delete the run's pointer and the due key it names."""
        old = await self.read_pointer(run_id)
        if old is None:
            return
        deletes = [self._objects.delete(self.pointer_key(run_id))]
        if old.name is not None:
            old_key = f"{self._due_prefix}{old.name}"
            for backend in self._local_peers():
                backend._valid.pop(old_key, None)
            deletes.append(self._objects.delete(old_key))
        await asyncio.gather(*deletes)

    async def _validate(self, candidates: list[_DueKey], server_now: float) -> dict[str, float]:
        """Return {key: exact time} of the candidates their run's pointer names.

        Keys checked recently are trusted without a request; the others cost
        one GET of their run's pointer. Orphans past the grace time are deleted.
        """
        now_mono = time.monotonic()
        valid: dict[str, float] = {}
        unknown: list[_DueKey] = []
        for c in candidates:
            cached = self._valid.get(c.key)
            if cached is not None and now_mono - cached[1] < VALID_TTL:
                valid[c.key] = cached[0]
            else:
                unknown.append(c)
        if unknown:
            run_ids = list(dict.fromkeys(c.run_id for c in unknown))
            pointers = dict(
                zip(
                    run_ids,
                    await self._objects.map(self.read_pointer, run_ids),
                    strict=True,
                )
            )
            orphans: list[str] = []
            for c in unknown:
                pointer = pointers[c.run_id]
                if pointer is not None and pointer.name == c.name:
                    valid[c.key] = pointer.at
                    self._valid[c.key] = (pointer.at, now_mono)
                else:
                    self._valid.pop(c.key, None)
                    if server_now - c.last_modified > ORPHAN_GRACE:
                        orphans.append(c.key)
            if orphans:
                await self._objects.map(self._objects.delete, orphans)
        if len(self._valid) > 100_000:
            self._valid = {k: v for k, v in self._valid.items() if now_mono - v[1] < VALID_TTL}
        return valid

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """List the due index up to ``now`` and keep the keys their run's pointer names.

        The listing goes on to the first key past those returned, for
        ``next_at``: usually on the same page, so it costs nothing more.
        """
        now_us = _us(now)
        limit = max(0, limit)
        out: list[tuple[str, float]] = []
        returned: set[str] = set()
        start_after: str | None = None
        first_page = True
        following: float | None = None
        future: _DueKey | None = None
        exhausted = False
        while True:
            items, truncated, server_now = await self._objects.list_page(
                self._due_prefix, start_after=start_after, max_keys=min(1000, limit + 16)
            )
            if first_page:
                # What a later poll compares against to tell new due keys from known ones.
                self._checked = (now_us, server_now)
                first_page = False
            keys = [k for k in map(self._parse_due, items) if k is not None]
            ready = [k for k in keys if k.at_us <= now_us]
            valid = await self._validate(ready, server_now) if ready else {}
            for k in ready:
                at = valid.get(k.key)
                if at is not None and at <= now and len(out) < limit:
                    out.append((k.run_id, at))
                    returned.add(k.key)
                elif at is not None and following is None:
                    following = at
            if len(ready) < len(keys):
                future = keys[len(ready)]
                self.due_hint = future.at_us / 1_000_000
                break
            if not truncated or not items:
                exhausted = True
                break
            start_after = items[-1].key
            if len(out) >= limit:
                break
        self._returned = returned
        if following is None and not exhausted:
            following = await self._first_valid(future, start_after, server_now)
        if self._junk:
            await self._drop_junk()
        return DueRuns(out, following)

    async def _first_valid(
        self, candidate: _DueKey | None, start_after: str | None, server_now: float
    ) -> float | None:
        """Return the time of the first live key from ``candidate`` (or after ``start_after``)."""
        if candidate is not None:
            valid = await self._validate([candidate], server_now)
            if candidate.key in valid:
                return valid[candidate.key]
            start_after = candidate.key
        while True:
            items, truncated, server_now = await self._objects.list_page(
                self._due_prefix, start_after=start_after, max_keys=64
            )
            keys = [k for k in map(self._parse_due, items) if k is not None]
            for i in range(0, len(keys), 8):
                chunk = keys[i : i + 8]
                valid = await self._validate(chunk, server_now)
                for k in chunk:
                    if k.key in valid:
                        return valid[k.key]
            if not truncated or not items:
                return None
            start_after = items[-1].key

    def _local_peers(self) -> list[DueIndex]:
        return list(_LOCAL.get(self._store_id, ()))

    def _notify_local(self) -> None:
        for backend in self._local_peers():
            backend.waker.notify()

    def _note_local_schedule(self, at: float) -> None:
        if at <= time.time():
            self._notify_local()
            return
        for backend in self._local_peers():
            if backend.due_hint is None or at < backend.due_hint:
                backend.due_hint = at

    async def peek(self) -> bool:
        """Poll once and tell whether there is due work the last due() call did not see.

        News is a valid due key that was still in the future at the last
        due() call, or that was written after it. Due keys that were already
        there (runs held by other workers, a backlog beyond due()'s limit)
        are not news, so they cannot make the worker spin. One LIST, plus a
        GET per new candidate; the first future key becomes a timer.
        """
        now_us = _us(time.time())
        checked_us, checked_server = self._checked
        # Keys scheduled "now" elsewhere land a little after their time: look back a minute.
        floor_us = max(0, checked_us - int(PEEK_LOOKBACK * 1_000_000))
        items, _, server_now = await self._objects.list_page(
            self._due_prefix,
            start_after=f"{self._due_prefix}{floor_us:0{TIME_DIGITS}d}",
            max_keys=256,
        )
        fresh: list[_DueKey] = []
        self.due_hint = None
        for k in map(self._parse_due, items):
            if k is None:
                continue
            if k.at_us > now_us:
                self.due_hint = k.at_us / 1_000_000
                break
            # LastModified has one-second resolution: a key from the second before counts.
            if k.key not in self._returned and (
                k.at_us > checked_us or k.last_modified >= checked_server - 1.0
            ):
                fresh.append(k)
        return bool(fresh) and bool(await self._validate(fresh, server_now))

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until woken in-process or a poll finds new due work; False on timeout.

        The poll interval starts at ``min_poll`` when work arrives and doubles
        up to ``max_poll`` while nothing does. Each poll is one LIST request.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            pause = min(self.poll_interval, remaining)
            hint = self.due_hint
            if hint is not None:
                pause = min(pause, max(0.001, hint - time.time() + 0.001))
            with reraise_lost_cancel():
                woken = await self.waker.wait(pause)
            if woken:
                # Work made due in this process says nothing about other processes:
                # keep the poll interval.
                return True
            if time.monotonic() >= deadline:
                return False
            try:
                # A poll is a read: cut short at the deadline, it harms nothing.
                # (asyncio.timeout, not wait_for: on 3.11 wait_for can eat a cancel.)
                with reraise_lost_cancel():
                    async with asyncio.timeout(max(0.05, deadline - time.monotonic())):
                        found = await self.peek()
            except (BackendUnavailable, TimeoutError):
                # Waiting is what the caller wants; its next due() reports an outage.
                found = False
            if found:
                self.poll_interval = self.min_poll
                return True
            self.poll_interval = min(self.poll_interval * 2, self.max_poll)

    def close(self) -> None:
        """Stop sharing wake-ups with the other clients of this process."""
        peers = _LOCAL.get(self._store_id)
        if peers is not None:
            peers.discard(self)
            if not peers:
                _LOCAL.pop(self._store_id, None)
