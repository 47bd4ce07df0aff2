"""A backend in a local directory, shared safely by many processes of one machine.

Layout (docs/PROTOCOL.md, "fs backend", is normative)::

    <root>/runs/<run_id>/log/000000000042   one immutable file per log entry
    <root>/runs/<run_id>/inbox/<event_id>   arrival time in ns, a newline, event data
    <root>/runs/<run_id>/meta.json          run metadata, replaced atomically
    <root>/runs/<run_id>/lease              {"owner", "expires_at"}, replaced atomically
    <root>/runs/<run_id>/lock               flock()ed around lease and schedule updates
    <root>/runs/<run_id>/due                symlink to the run's current due key
    <root>/due/<hour>/<at µs>-<run_id>      the due index, one empty file per run
    <root>/wake/<pid>-<random>              unix datagram sockets of waiting clients

Entries and events are published with ``link()``, which fails if the name is
taken: that is the create-if-absent fencing, and since the file is complete
before it gets its name, no reader ever sees half an entry.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import orjson

from substantial.backends import _hostile
from substantial.backends._wake import WakeChannel
from substantial.backends.base import (
    Backend,
    Durability,
    Event,
    Lease,
    RunInfo,
    encode_json,
    validate_id,
)
from substantial.errors import BackendUnavailable, CorruptRecord, InvalidArgument, PositionTaken

__all__ = ["FSBackend"]

_POSITION_DIGITS = 12
_US = 1_000_000
# Hour-wide buckets: due() lists the buckets up to now, never the far-future ones.
_BUCKET_US = 3600 * _US
_AT_DIGITS = 17
_BUCKET_DIGITS = 8
# Far above the timestamp granularity of local file systems (a clock tick).
_SETTLED_NS = 1_000_000_000
# The pointer runs/<id>/due is a symlink whose target resolves to the due key's file.
_POINTER_PREFIX = "../../due/"

# Reading /proc/self/fd/N through linkat(AT_SYMLINK_FOLLOW) gives an O_TMPFILE
# file its name; Python only uses linkat (not link) when a dir fd is passed.
_HAVE_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
_TMPFILE_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL})
_anchor_fd: int | None = None

_last_arrival_ns = 0
_arrival_lock = threading.Lock()


def _anchor() -> int:
    global _anchor_fd
    if _anchor_fd is None:
        _anchor_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    return _anchor_fd


def _arrival_ns() -> int:
    """Return a wall-clock timestamp strictly greater than any this process returned before."""
    global _last_arrival_ns
    with _arrival_lock:
        now = time.time_ns()
        if now <= _last_arrival_ns:
            now = _last_arrival_ns + 1
        _last_arrival_ns = now
        return now


def _key_us(at: float) -> int:
    # floor() keeps "at <= now" and "key(at) <= key(now)" equivalent; times
    # before the epoch are stored as the epoch.
    return max(0, math.floor(at * _US))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    data = os.read(fd, size)
    if len(data) == size:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_file(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _read_pointer(path: str) -> str | None:
    """Return the due key a run's pointer names, or None if it has none."""
    try:
        target = os.readlink(path)
    except FileNotFoundError:
        return None
    return target.removeprefix(_POINTER_PREFIX)


def _sync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(directory: str, base: str) -> str:
    return f"{directory}/.{base}.{os.getpid()}-{os.urandom(4).hex()}.tmp"


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


class FSBackend(Backend):
    """Store runs as files under one directory; safe for many processes of one machine.

    ``durability="process"`` (default) survives the writing process being
    killed; ``"fsync"`` also flushes files and directories to disk before a
    write returns, so it survives power loss.
    """

    name = "fs"

    def __init__(self, path: str | os.PathLike[str], *, durability: Durability = "process") -> None:
        super().__init__()
        if durability not in ("process", "fsync"):
            raise InvalidArgument(f"durability={durability!r}: use 'process' or 'fsync'")
        self.root = Path(os.path.abspath(os.fspath(path)))
        self.durability: Durability = durability
        self._root = str(self.root)
        self._runs = f"{self._root}/runs"
        self._due = f"{self._root}/due"
        self._fsync = durability == "fsync"
        self._use_tmpfile = _HAVE_TMPFILE
        self._wake = WakeChannel(f"{self._root}/wake", self.waker)
        self._bucket_cache: tuple[int, list[str]] | None = None

    def describe(self) -> str:
        """Return the backend name and its directory."""
        return f"fs {self._root} (durability={self.durability})"

    def entry_path(self, run_id: str, position: int) -> Path:
        """Return the file that holds one log entry (it need not exist)."""
        validate_id("run id", run_id)
        return Path(self._runs, run_id, "log", f"{position:0{_POSITION_DIGITS}d}")

    # -- errors -----------------------------------------------------------

    def _unavailable(self, exc: OSError, action: str) -> BackendUnavailable:
        """Translate an OS error into the one error callers handle, saying what to do."""
        where = exc.filename or self._root
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            advice = f"the file system holding {self._root} is full; free space or raise the quota"
        elif code in (errno.EACCES, errno.EPERM):
            advice = (
                f"permission denied on {where}; give this process's user read and write access "
                f"to {self._root} and everything under it"
            )
        elif code == errno.EROFS:
            advice = (
                f"{self._root} is on a read-only file system; remount it read-write or point "
                "the backend at a writable directory"
            )
        elif code == errno.EIO:
            advice = f"the disk holding {self._root} reported an I/O error; check it (dmesg)"
        elif code == errno.ENOTDIR:
            advice = (
                f"part of the path {where} is a file, not a directory; point the backend at a "
                "directory"
            )
        elif code in (errno.EMFILE, errno.ENFILE):
            advice = "too many open files; raise the limit (ulimit -n)"
        else:
            advice = f"check that {self._root} is a reachable, writable directory"
        return BackendUnavailable(f"cannot {action}: {exc.strerror or exc}; {advice}, then retry")

    # -- primitives on files ----------------------------------------------

    def _makedirs(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        if self._fsync:
            # New directory entries must reach the disk too, up to the store's parent.
            path = directory
            while len(path) >= len(self._root):
                path = os.path.dirname(path)
                _sync_dir(path)

    def _publish(self, directory: str, name: str, data: bytes) -> None:
        """Create ``directory/name`` holding ``data`` in one step; FileExistsError if taken."""
        for attempt in range(3):
            try:
                if self._use_tmpfile:
                    try:
                        self._publish_tmpfile(directory, name, data)
                    except OSError as exc:
                        if exc.errno not in _TMPFILE_UNSUPPORTED:
                            raise
                        # This file system has no O_TMPFILE: use named temporaries from now on.
                        self._use_tmpfile = False
                        self._publish_named(directory, name, data)
                else:
                    self._publish_named(directory, name, data)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._makedirs(directory)
            else:
                if self._fsync:
                    _sync_dir(directory)
                return

    def _publish_tmpfile(self, directory: str, name: str, data: bytes) -> None:
        # An unnamed file vanishes with its process if killed before link():
        # nothing to clean up, and one syscall fewer than a named temporary.
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o444)
        try:
            _write_all(fd, data)
            if self._fsync:
                os.fsync(fd)
            os.link(f"/proc/self/fd/{fd}", f"{directory}/{name}", src_dir_fd=_anchor())
        finally:
            os.close(fd)

    def _publish_named(self, directory: str, name: str, data: bytes) -> None:
        tmp = _tmp_name(directory, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            try:
                _write_all(fd, data)
                if self._fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, f"{directory}/{name}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _replace(self, directory: str, name: str, data: bytes) -> None:
        """Atomically set ``directory/name`` to ``data``: readers see the old or the new bytes."""
        for attempt in range(3):
            tmp = _tmp_name(directory, name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._makedirs(directory)
                continue
            try:
                try:
                    _write_all(fd, data)
                    if self._fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, f"{directory}/{name}")
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if self._fsync:
                _sync_dir(directory)
            return

    @contextlib.contextmanager
    def _locked(self, run_id: str) -> Iterator[None]:
        """Hold the run's lock file: serializes lease and schedule updates across processes."""
        run_dir = f"{self._runs}/{run_id}"
        try:
            fd = os.open(f"{run_dir}/lock", os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            self._makedirs(run_dir)
            fd = os.open(f"{run_dir}/lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # Held for a few syscalls only, so blocking the event loop here is brief.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the last descriptor releases the lock

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store the entry if the position is free, by linking a complete file to its name."""
        validate_id("run id", run_id)
        if position < 0:
            raise InvalidArgument(f"log position {position} is negative")
        try:
            self._publish(f"{self._runs}/{run_id}/log", f"{position:0{_POSITION_DIGITS}d}", entry)
        except FileExistsError:
            raise PositionTaken(run_id, position) from None
        except OSError as exc:
            raise self._unavailable(exc, f"append to run {run_id!r}") from exc

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Read entry files from ``start`` until the first missing one."""
        validate_id("run id", run_id)
        log_dir = f"{self._runs}/{run_id}/log"
        out: list[bytes] = []
        position = max(start, 0)
        try:
            while True:
                try:
                    fd = os.open(f"{log_dir}/{position:0{_POSITION_DIGITS}d}", os.O_RDONLY)
                except FileNotFoundError:
                    return out
                try:
                    out.append(_read_fd(fd))
                finally:
                    os.close(fd)
                position += 1
        except OSError as exc:
            raise self._unavailable(exc, f"read the log of run {run_id!r}") from exc

    # -- the inbox --------------------------------------------------------

    def _post(self, run_id: str, event_id: str, data: bytes) -> bool:
        payload = b"%d\n" % _arrival_ns() + data
        try:
            self._publish(f"{self._runs}/{run_id}/inbox", event_id, payload)
        except FileExistsError:
            return False
        return True

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Add the event unless its id is pending, stamped with its arrival time."""
        validate_id("run id", run_id)
        validate_id("event id", event_id)
        try:
            stored = self._post(run_id, event_id, data)
        except OSError as exc:
            raise self._unavailable(exc, f"post event {event_id!r} to run {run_id!r}") from exc
        if stored:
            self._wake.broadcast()
        return stored

    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Post an event and make the run due now, waking waiters once."""
        validate_id("run id", run_id)
        validate_id("event id", event_id)
        try:
            stored = self._post(run_id, event_id, data)
            self._schedule(run_id, _key_us(time.time()))
        except OSError as exc:
            raise self._unavailable(exc, f"send event {event_id!r} to run {run_id!r}") from exc
        self._wake.broadcast()
        return stored

    async def read_inbox(self, run_id: str) -> list[Event]:
        """Return pending events sorted by (arrival time, event id)."""
        validate_id("run id", run_id)
        inbox = f"{self._runs}/{run_id}/inbox"
        found: list[tuple[int, str, bytes]] = []
        try:
            try:
                names = os.listdir(inbox)
            except FileNotFoundError:
                return []
            for name in names:
                if name.startswith("."):
                    continue  # a temporary of a post that has not finished (or crashed)
                try:
                    raw = _read_file(f"{inbox}/{name}")
                except FileNotFoundError:
                    continue  # acknowledged meanwhile
                head, sep, data = raw.partition(b"\n")
                if not sep or not head.isdigit():
                    raise CorruptRecord(run_id, f"event {name}", "no arrival time header")
                found.append((int(head), name, data))
        except OSError as exc:
            raise self._unavailable(exc, f"read the inbox of run {run_id!r}") from exc
        found.sort()
        return [Event(name, data, ns / 1e9) for ns, name, data in found]

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Delete the events' files; missing ones are ignored."""
        validate_id("run id", run_id)
        inbox = f"{self._runs}/{run_id}/inbox"
        try:
            for event_id in event_ids:
                validate_id("event id", event_id)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{inbox}/{event_id}")
            if self._fsync and event_ids:
                with contextlib.suppress(FileNotFoundError):
                    _sync_dir(inbox)
        except OSError as exc:
            raise self._unavailable(exc, f"acknowledge events of run {run_id!r}") from exc

    # -- the due index ----------------------------------------------------

    def _pointer(self, run_id: str) -> str:
        return f"{self._runs}/{run_id}/due"

    def _schedule(self, run_id: str, at_us: int) -> None:
        bucket = f"{at_us // _BUCKET_US:0{_BUCKET_DIGITS}d}"
        key = f"{bucket}/{at_us:0{_AT_DIGITS}d}-{run_id}"
        pointer = self._pointer(run_id)
        with self._locked(run_id):
            old = _read_pointer(pointer)
            if old == key:
                return
            # New entry first, then the pointer, then drop the old entry: a crash
            # in between leaves an extra entry, which due() recognises as stale
            # (the pointer does not name it) and removes; never a run with none.
            self._touch_due(bucket, key)
            tmp = _tmp_name(os.path.dirname(pointer), "due")
            os.symlink(_POINTER_PREFIX + key, tmp)
            try:
                os.replace(tmp, pointer)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if self._fsync:
                _sync_dir(os.path.dirname(pointer))
            if old is not None:
                self._drop_due(old)

    def _touch_due(self, bucket: str, key: str) -> None:
        path = f"{self._due}/{key}"
        for attempt in range(3):
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            except FileNotFoundError:
                # No bucket yet, or due() just removed it as empty.
                if attempt == 2:
                    raise
                self._makedirs(f"{self._due}/{bucket}")
            else:
                if self._fsync:
                    _sync_dir(f"{self._due}/{bucket}")
                return

    def _drop_due(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._due}/{key}")

    async def schedule(self, run_id: str, at: float) -> None:
        """Point the run at a new due key, then remove its old key."""
        validate_id("run id", run_id)
        at_us = _key_us(at)
        try:
            self._schedule(run_id, at_us)
        except OSError as exc:
            raise self._unavailable(exc, f"schedule run {run_id!r}") from exc
        if at_us <= _key_us(time.time()):
            self._wake.broadcast()

    async def unschedule(self, run_id: str) -> None:
        """Remove the run's pointer and due key."""
        validate_id("run id", run_id)
        pointer = self._pointer(run_id)
        try:
            if _read_pointer(pointer) is None:
                return  # never scheduled: do not create the run's directory for nothing
            with self._locked(run_id):
                old = _read_pointer(pointer)
                if old is None:
                    return
                os.unlink(pointer)
                self._drop_due(old)
                if self._fsync:
                    _sync_dir(os.path.dirname(pointer))
        except OSError as exc:
            raise self._unavailable(exc, f"unschedule run {run_id!r}") from exc

    def _buckets(self) -> list[str]:
        """Return the bucket names in order, re-listing due/ only when it changed."""
        try:
            mtime = os.stat(self._due).st_mtime_ns
            if self._bucket_cache is not None and self._bucket_cache[0] == mtime:
                return self._bucket_cache[1]
            listed_at = time.time_ns()
            names = sorted(b for b in os.listdir(self._due) if b.isascii() and b.isdigit())
        except FileNotFoundError:
            return []
        # A change made within one timestamp tick of the last one may leave the
        # mtime as it was: trust a listing only once the directory has been
        # still for a while, so any later change shows as a new mtime.
        settled = listed_at - mtime > _SETTLED_NS
        self._bucket_cache = (mtime, names) if settled else None
        return names

    def _scan_bucket(self, bucket: str, now_bucket: int) -> list[str] | None:
        """List one bucket's entries in key order; drop it if it is a past, empty bucket."""
        directory = f"{self._due}/{bucket}"
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            return None
        if not names and int(bucket) < now_bucket:
            # A schedule() racing with this finds the bucket gone and recreates it.
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        names.sort()
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
            # schedule() takes the lock before creating a key, so a key without a
            # lock file belongs to a run whose directory was removed.
            self._drop_due(key)
            return False
        try:
            # Under the lock no schedule() is half-way, so a key the pointer does
            # not name is a leftover of a crash and can go.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _read_pointer(pointer) == key:
                return True
            self._drop_due(key)
            return False
        finally:
            os.close(fd)

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """List the buckets up to now and return their current keys in time order."""
        self._wake.listen()
        self.waker.clear()  # this read covers every signal sent so far
        now_us = _key_us(now)
        now_bucket = now_us // _BUCKET_US
        out: list[tuple[str, float]] = []
        if limit <= 0:
            return out
        seen: set[str] = set()
        bad: list[str] = []
        try:
            for bucket in self._buckets():
                if int(bucket) > now_bucket:
                    break
                for name in self._scan_bucket(bucket, now_bucket) or ():
                    parsed = _parse_due_name(name)
                    if parsed is None or not _hostile.is_valid_id(parsed[1]):
                        bad.append(f"{bucket}/{name}")
                        continue
                    at_us, run_id = parsed
                    if at_us > now_us:
                        break
                    # A crash can leave two keys for one run: report it once, at
                    # the key its pointer names.
                    if run_id in seen or not self._is_current(run_id, f"{bucket}/{name}"):
                        continue
                    seen.add(run_id)
                    out.append((run_id, at_us / _US))
                    if len(out) >= limit:
                        break
                if len(out) >= limit:
                    break
        except OSError as exc:
            raise self._unavailable(exc, "read the due index") from exc
        await self._drop_bad_due(bad)
        return out

    async def next_due_at(self) -> float | None:
        """Return the earliest current key, reading only up to the first bucket that has one."""
        now_bucket = _key_us(time.time()) // _BUCKET_US
        bad: list[str] = []
        found: float | None = None
        try:
            for bucket in self._buckets():
                for name in self._scan_bucket(bucket, now_bucket) or ():
                    parsed = _parse_due_name(name)
                    if parsed is None or not _hostile.is_valid_id(parsed[1]):
                        bad.append(f"{bucket}/{name}")
                    elif self._is_current(parsed[1], f"{bucket}/{name}"):
                        found = parsed[0] / _US
                        break
                if found is not None:
                    break
        except OSError as exc:
            raise self._unavailable(exc, "read the due index") from exc
        await self._drop_bad_due(bad)
        return found

    async def _drop_bad_due(self, keys: list[str]) -> None:
        """Remove due keys no worker can act on; a run whose live key it was is due now."""
        for key in keys:
            name = key.partition("/")[2]
            run_id = name[_AT_DIGITS + 1 :]
            live = _hostile.is_valid_id(run_id) and _read_pointer(self._pointer(run_id)) == key
            action = "scheduling its run now" if live else "removing it from the due index"
            _hostile.warn_once(self, "due entry", name, "not <17-digit time>-<run id>", action)
            with contextlib.suppress(OSError):
                os.unlink(f"{self._due}/{key}")
            if live:
                with contextlib.suppress(BackendUnavailable):
                    await self.schedule(run_id, time.time())

    # -- leases -----------------------------------------------------------

    def _read_lease(self, run_id: str) -> Lease | None:
        try:
            raw = _read_file(f"{self._runs}/{run_id}/lease")
        except FileNotFoundError:
            return None
        try:
            obj = orjson.loads(raw)
            lease = _hostile.lease_or_none(run_id, obj.get("owner"), obj.get("expires_at"))
        except (orjson.JSONDecodeError, AttributeError):
            lease = None
        if lease is None:
            _hostile.warn_once(self, "lease", run_id, f"{raw[:80]!r}", "reading it as expired")
            return _hostile.unreadable_lease(run_id)
        return lease

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Compare-and-set the lease file under the run's lock."""
        validate_id("run id", run_id)
        try:
            with self._locked(run_id):
                now = time.time()
                lease = self._read_lease(run_id)
                if not (
                    lease is None
                    or lease.expires_at <= now
                    or lease.owner == owner
                    or (steal_from is not None and lease.owner == steal_from)
                ):
                    return False
                data = encode_json({"owner": owner, "expires_at": now + ttl})
                self._replace(f"{self._runs}/{run_id}", "lease", data)
                return True
        except OSError as exc:
            raise self._unavailable(exc, f"take the lease of run {run_id!r}") from exc

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Delete the lease file if ``owner`` holds it."""
        validate_id("run id", run_id)
        try:
            if self._read_lease(run_id) is None:
                return  # nothing to release: do not create the run's directory for a lock
            with self._locked(run_id):
                lease = self._read_lease(run_id)
                if lease is not None and (lease.owner == owner or _hostile.is_unreadable(lease)):
                    os.unlink(f"{self._runs}/{run_id}/lease")
        except OSError as exc:
            raise self._unavailable(exc, f"release the lease of run {run_id!r}") from exc

    async def get_lease(self, run_id: str) -> Lease | None:
        """Read the lease file."""
        validate_id("run id", run_id)
        try:
            return self._read_lease(run_id)
        except OSError as exc:
            raise self._unavailable(exc, f"read the lease of run {run_id!r}") from exc

    # -- run metadata -----------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Replace meta.json atomically."""
        validate_id("run id", info.run_id)
        try:
            self._replace(f"{self._runs}/{info.run_id}", "meta.json", info.to_bytes())
        except OSError as exc:
            raise self._unavailable(exc, f"store metadata of run {info.run_id!r}") from exc

    def _get_run(self, run_id: str) -> RunInfo | None:
        try:
            data = _read_file(f"{self._runs}/{run_id}/meta.json")
        except FileNotFoundError:
            return None
        return RunInfo.from_bytes(run_id, data)

    async def get_run(self, run_id: str) -> RunInfo | None:
        """Read meta.json."""
        validate_id("run id", run_id)
        try:
            return self._get_run(run_id)
        except OSError as exc:
            raise self._unavailable(exc, f"read metadata of run {run_id!r}") from exc

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """List run directories in id order and read the metadata of each."""
        out: list[RunInfo] = []
        try:
            try:
                run_ids = sorted(os.listdir(self._runs))
            except FileNotFoundError:
                return out
            for run_id in run_ids:
                if len(out) >= limit:
                    break
                if after is not None and run_id <= after:
                    continue
                try:
                    data = _read_file(f"{self._runs}/{run_id}/meta.json")
                except FileNotFoundError:
                    continue  # a run with only events, or a half start
                info = _hostile.read_listed(self, run_id, data)
                if _hostile.listed(info, status, workflow):
                    out.append(info)
        except OSError as exc:
            raise self._unavailable(exc, "list runs") from exc
        return out

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a process sharing this directory makes work due, or ``timeout`` passes."""
        return await self._wake.wait(timeout)

    async def close(self) -> None:
        """Stop listening for wake-ups and remove this client's socket."""
        self._wake.close()
