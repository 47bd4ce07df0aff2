"""The fs backend's due index: one empty file per run, named by time, in hour-wide buckets.

``due/<hour>/<at µs>-<run_id>`` keys sort in time order, so ``due()`` lists
the buckets up to now and never the far-future ones. Each run's
``runs/<id>/due`` symlink names its live key; a key it does not name is a
leftover of a crash and is removed when met.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import time
from collections.abc import Callable

from substantial.backends import _hostile
from substantial.backends.fs._files import Files, sync_dir, tmp_name

__all__ = ["DueIndex", "key_us"]

_US = 1_000_000
# Hour-wide buckets: due() lists the buckets up to now, never the far-future ones.
_BUCKET_US = 3600 * _US
_AT_DIGITS = 17
_AT_MAX = 99_999_999_999_999_999  # the largest time of _AT_DIGITS digits
_BUCKET_DIGITS = 8
# Far above the timestamp granularity of local file systems (a clock tick).
_SETTLED_NS = 1_000_000_000
# The pointer runs/<id>/due is a symlink whose target resolves to the due key's file.
_POINTER_PREFIX = "../../due/"


def key_us(at: float) -> int:
    """Return the key time (integer µs) of ``at``."""
    # floor() keeps "at <= now" and "key(at) <= key(now)" equivalent; times
    # before the epoch are stored as the epoch, times past the key's 17 digits (year
    # 5138) as its last: a key too long would be unreadable, and such a run due at once.
    return min(max(0, math.floor(at * _US)), _AT_MAX)


def _read_pointer(path: str) -> str | None:
    """Return the due key a run's pointer names, or None if it has none."""
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        return None
    return target.removeprefix(_POINTER_PREFIX)


def _parse_due_name(name: str) -> tuple[int, str] | None:
    """Split ``<at µs>-<run_id>``; None if the time is not 17 ASCII digits.

    The run id is not checked here: due() drops a key whose id is not valid.
    """
    if len(name) < _AT_DIGITS + 1 or name[_AT_DIGITS] != "-":
        return None
    digits = name[:_AT_DIGITS]
    if not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits), name[_AT_DIGITS + 1 :]


class DueIndex:
    """The due keys and run pointers under one store; OSError escapes to the caller."""

    def __init__(self, files: Files, runs: str, due: str, owner: object) -> None:
        self._files = files
        self._runs = runs
        self._due = due
        self._owner = owner  # whose warnings these are
        #: Directories' sorted listings, by the mtime each was listed at (see listing).
        self._listings: dict[str, tuple[int, list[str]]] = {}

    def _pointer(self, run_id: str) -> str:
        return f"{self._runs}/{run_id}/due"

    def set(self, run_id: str, at_us: int) -> None:
        """Point the run at a new due key, then remove its old key."""
        bucket = f"{at_us // _BUCKET_US:0{_BUCKET_DIGITS}d}"
        key = f"{bucket}/{at_us:0{_AT_DIGITS}d}-{run_id}"
        pointer = self._pointer(run_id)
        with self._files.locked(f"{self._runs}/{run_id}"):
            old = _read_pointer(pointer)
            if old == key:
                return
            # New entry first, then the pointer, then drop the old entry: a crash
            # in between leaves an extra entry, which due() recognises as stale
            # (the pointer does not name it) and removes; never a run with none.
            self._touch(bucket, key)
            tmp = tmp_name(os.path.dirname(pointer), "due")
            os.symlink(_POINTER_PREFIX + key, tmp)
            try:
                os.replace(tmp, pointer)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if self._files.fsync:
                sync_dir(os.path.dirname(pointer))
            if old is not None:
                self._drop(old)

    def _touch(self, bucket: str, key: str) -> None:
        path = f"{self._due}/{key}"
        for attempt in range(3):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            except FileNotFoundError:
                # No bucket yet, or due() just removed it as empty.
                if attempt == 2:
                    raise
                self._files.makedirs(f"{self._due}/{bucket}")
            else:
                if self._files.fsync:
                    sync_dir(f"{self._due}/{bucket}")
                return

    def _drop(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._due}/{key}")

    def clear(self, run_id: str) -> None:
        """Remove the run's pointer and due key."""
        pointer = self._pointer(run_id)
        if _read_pointer(pointer) is None:
            return  # never scheduled: do not create the run's directory for nothing
        with self._files.locked(f"{self._runs}/{run_id}"):
            old = _read_pointer(pointer)
            if old is None:
                return
            os.unlink(pointer)
            self._drop(old)
            if self._files.fsync:
                sync_dir(os.path.dirname(pointer))

    def clear_unless(self, run_id: str, waiting: Callable[[], bool]) -> bool:
        """Remove the run's pointer and due key unless ``waiting()``; False if it was.

        ``waiting`` is asked under the run's lock, which a post's schedule takes
        after its event is published: an event published before the question is
        seen, one published after is scheduled after the removal.
        """
        pointer = self._pointer(run_id)
        if _read_pointer(pointer) is None:
            # Not due: nothing to remove, and no directory to create for nothing. A
            # post racing with this schedules the run itself once its event is there.
            return not waiting()
        with self._files.locked(f"{self._runs}/{run_id}"):
            if waiting():
                return False
            old = _read_pointer(pointer)
            if old is not None:
                os.unlink(pointer)
                self._drop(old)
                if self._files.fsync:
                    sync_dir(os.path.dirname(pointer))
        return True

    def listing(self, directory: str) -> list[str] | None:
        """Return ``directory``'s names sorted, or None if it is gone.

        With a million runs waiting, due/ and the hour bucket that holds the next
        due time (tens of thousands of keys) would be listed and sorted at every
        poll, and runs/ at every page of a listing. A listing is kept while the
        directory's mtime is the one it was listed at: any name added or removed,
        by any process, changes it.
        """
        try:
            mtime = os.stat(directory).st_mtime_ns
            cached = self._listings.get(directory)
            if cached is not None and cached[0] == mtime:
                return cached[1]
            listed_at = time.time_ns()
            names = sorted(os.listdir(directory))
        except FileNotFoundError:
            self._listings.pop(directory, None)
            return None
        # A change made within one timestamp tick of the last one may leave the
        # mtime as it was: trust a listing only once the directory has been
        # still for a while, so any later change shows as a new mtime.
        if listed_at - mtime > _SETTLED_NS:
            if len(self._listings) >= 64:
                self._listings.clear()
            self._listings[directory] = (mtime, names)
        return names

    def _buckets(self) -> list[str]:
        """Return the bucket names in order."""
        return [b for b in self.listing(self._due) or () if b.isascii() and b.isdigit()]

    def _scan_bucket(self, bucket: str, now_bucket: int) -> list[str] | None:
        """List one bucket's entries in key order; drop it if it is a past, empty bucket."""
        directory = f"{self._due}/{bucket}"
        names = self.listing(directory)
        if names == [] and int(bucket) < now_bucket:
            # A schedule racing with this finds the bucket gone and recreates it.
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        return names

    def _is_current(self, run_id: str, key: str) -> bool:
        """Tell whether ``key`` is the run's due key; remove it if it is a stale leftover."""
        pointer = self._pointer(run_id)
        if _read_pointer(pointer) == key:
            return True
        lock = f"{self._runs}/{run_id}/lock"
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            # set() takes the lock before creating a key, so a key without a
            # lock file belongs to a run whose directory was removed.
            self._drop(key)
            return False
        try:
            # Under the lock no set() is half-way, so a key the pointer does
            # not name is a leftover of a crash and can go.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _read_pointer(pointer) == key:
                return True
            self._drop(key)
            return False
        finally:
            os.close(fd)

    def due(
        self, now: float, limit: int, *, following: bool = True
    ) -> tuple[list[tuple[str, float]], float | None]:
        """Return up to ``limit`` due runs in time order, and the first time after them.

        The second value is the time of the earliest live key not returned
        (None if there is none, or if ``following`` is False: then nothing
        after ``now`` is read); it is read only as far as the first bucket
        that has one.
        """
        now_us = key_us(now)
        now_bucket = now_us // _BUCKET_US
        out: list[tuple[str, float]] = []
        seen: set[str] = set()
        bad: list[str] = []
        after: float | None = None
        done = False
        for bucket in self._buckets():
            if not following and int(bucket) > now_bucket:
                break
            for name in self._scan_bucket(bucket, now_bucket) or ():
                parsed = _parse_due_name(name)
                if parsed is None or not _hostile.is_valid_id(parsed[1]):
                    bad.append(f"{bucket}/{name}")
                    continue
                at_us, run_id = parsed
                beyond = at_us > now_us or len(out) >= limit
                if beyond and not following:
                    done = True
                    break
                # A crash can leave two keys for one run: report it once, at the
                # key its pointer names.
                if run_id in seen or not self._is_current(run_id, f"{bucket}/{name}"):
                    continue
                if beyond:
                    after, done = at_us / _US, True
                    break
                seen.add(run_id)
                out.append((run_id, at_us / _US))
            if done:
                break
        if bad and self._drop_bad(bad):
            # A run whose live key was unreadable is due now: read again.
            return self.due(now, limit, following=following)
        return out, after

    def _drop_bad(self, keys: list[str]) -> bool:
        """Remove due keys no worker can act on; a run whose live key it was is due now.

        Returns whether a run was made due.
        """
        rescheduled = False
        for key in keys:
            name = key.partition("/")[2]
            run_id = name[_AT_DIGITS + 1 :]
            live = _hostile.is_valid_id(run_id) and _read_pointer(self._pointer(run_id)) == key
            action = "scheduling its run now" if live else "removing it from the due index"
            _hostile.warn_once(
                self._owner, "due entry", name, "not <17-digit time>-<run id>", action
            )
            with contextlib.suppress(OSError):
                os.unlink(f"{self._due}/{key}")
            if live:
                with contextlib.suppress(OSError):
                    self.set(run_id, key_us(time.time()))
                    rescheduled = True
        return rescheduled
