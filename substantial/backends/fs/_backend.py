"""The fs backend: the log, the inbox, leases and metadata as files under one directory."""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from substantial.backends import _hostile
from substantial.backends._common import (
    Page,
    ack_ids,
    check_due,
    check_durability,
    check_position,
    check_ttl,
    filtered_runs,
    gap_error,
    lease_takable,
    local_store_url,
)
from substantial.backends._recent import keep_newest
from substantial.backends._wake import WakeChannel
from substantial.backends.base import (
    Backend,
    Capabilities,
    DueRuns,
    Durability,
    Event,
    Lease,
    NewEvent,
    RunInfo,
    encode_json,
    validate_id,
)
from substantial.backends.fs._due import DueIndex, key_us
from substantial.backends.fs._files import (
    Files,
    arrival_ns,
    fdatasync,
    read_fd,
    read_file,
    sync_dir,
)
from substantial.backends.fs._segment import Replaced, Segments
from substantial.errors import BackendUnavailable, CorruptRecord, PositionTaken

__all__ = ["FSBackend"]

# Layout 1 named one file per entry by its zero-padded position.
_POSITION_DIGITS = 12


def _exists(path: str) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


class FSBackend(Backend):
    """Store runs as files under one directory; safe for many processes of one machine.

    ``durability="process"`` (default) survives the writing process being
    killed; ``"fsync"`` also flushes files and directories to disk before a
    write returns, so it survives power loss.
    """

    name = "fs"
    capabilities = Capabilities(wake_ups=True, delete=True, unschedule_idle=True)

    def __init__(self, path: str | os.PathLike[str], *, durability: Durability = "process") -> None:
        super().__init__()
        self.root = Path(os.path.abspath(os.fspath(path)))
        self.durability: Durability = check_durability(durability)
        self._root = str(self.root)
        self._runs = f"{self._root}/runs"
        self._fsync = durability == "fsync"
        self._files = Files(self._root, fsync=self._fsync)
        self._segments = Segments(self._files, self._runs)
        self._index = DueIndex(self._files, self._runs, f"{self._root}/due", self)
        self._wake = WakeChannel(f"{self._root}/wake", self.waker)
        self._unavailable = self._files.unavailable

    @classmethod
    def from_url(cls, url: str) -> FSBackend:
        """Open ``file:///abs/dir`` (or ``file://./rel/dir``), ``?durability=fsync`` optional."""
        path, durability = local_store_url(url)
        return cls(path, durability=durability)

    def describe(self) -> str:
        """Return the backend name and its directory."""
        return f"fs {self._root} (durability={self.durability})"

    def segment_path(self, run_id: str) -> Path:
        """Return the file that holds the run's log (it need not exist)."""
        validate_id("run id", run_id)
        return Path(self._segments.path(run_id))

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store the entry if the position is free, under the lock of the run's segment."""
        validate_id("run id", run_id)
        check_position(run_id, position)
        entry = bytes(entry)
        try:
            for _ in range(3):
                fd = self._segments.open_for_append(run_id, position, self._has_legacy_log)
                if fd is None:
                    return self._legacy_append(run_id, position, entry)
                try:
                    self._segments.append(run_id, fd, position, entry)
                    return None
                except Replaced:
                    continue  # deleted meanwhile: look again
                finally:
                    os.close(fd)
            raise BackendUnavailable(
                f"cannot append to run {run_id!r}: its log file keeps being replaced; "
                "stop whatever deletes or rewrites it, then retry"
            )
        except OSError as exc:
            raise self._unavailable(exc, f"append to run {run_id!r}") from exc

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Read the run's segment from ``start`` up to its last whole record."""
        validate_id("run id", run_id)
        check_position(run_id, start, "log start")
        try:
            entries = self._segments.read(run_id, start)
            return self._legacy_read(run_id, start) if entries is None else entries
        except OSError as exc:
            raise self._unavailable(exc, f"read the log of run {run_id!r}") from exc

    # -- logs of layout 1: one file per entry, read and extended as they are ----

    def _has_legacy_log(self, run_id: str) -> bool:
        return _exists(f"{self._runs}/{run_id}/log/{0:0{_POSITION_DIGITS}d}")

    def _legacy_append(self, run_id: str, position: int, entry: bytes) -> None:
        log_dir = f"{self._runs}/{run_id}/log"
        # Entries are never removed: once the one before exists, it stays.
        if position and not _exists(f"{log_dir}/{position - 1:0{_POSITION_DIGITS}d}"):
            raise gap_error(run_id, position)
        try:
            self._files.publish(log_dir, f"{position:0{_POSITION_DIGITS}d}", entry)
        except FileExistsError:
            raise PositionTaken(run_id, position) from None

    def _legacy_read(self, run_id: str, position: int) -> list[bytes]:
        log_dir = f"{self._runs}/{run_id}/log"
        out: list[bytes] = []
        while True:
            try:
                fd = os.open(f"{log_dir}/{position:0{_POSITION_DIGITS}d}", os.O_RDONLY)
            except FileNotFoundError:
                return out
            try:
                out.append(read_fd(fd))
            finally:
                os.close(fd)
            position += 1

    # -- the inbox --------------------------------------------------------

    def _post(self, run_id: str, event: NewEvent) -> bool:
        payload = b"%d\n" % arrival_ns() + bytes(event.data)
        try:
            self._files.publish(f"{self._runs}/{run_id}/inbox", event.event_id, payload)
        except FileExistsError:
            return False
        return True

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Delete the acknowledged events' files, then return the rest by (arrival, id)."""
        validate_id("run id", run_id)
        inbox = f"{self._runs}/{run_id}/inbox"
        acked = ack_ids(ack)
        found: list[tuple[int, str, bytes]] = []
        try:
            for event_id in acked:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{inbox}/{event_id}")
            if self._fsync and acked:
                with contextlib.suppress(FileNotFoundError):
                    sync_dir(inbox)
            try:
                names = os.listdir(inbox)
            except FileNotFoundError:
                return []
            for name in names:
                if name.startswith("."):
                    continue  # a temporary of a post that has not finished (or crashed)
                try:
                    raw = read_file(f"{inbox}/{name}")
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

    # -- the due index ----------------------------------------------------

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Publish the event, if any; then point the run at a new due key (or remove it)."""
        at = check_due(run_id, at, event)
        try:
            stored = self._post(run_id, event) if event is not None else False
            if at is None:
                self._index.clear(run_id)
                return stored
            at_us = key_us(at)
            self._index.set(run_id, at_us)
        except OSError as exc:
            raise self._unavailable(exc, f"set the due time of run {run_id!r}") from exc
        if at_us <= key_us(time.time()):
            self._wake.broadcast()
        return stored

    async def unschedule_idle(self, run_id: str) -> bool:
        """Remove the run's due key unless its inbox holds an event, under the run's lock."""
        validate_id("run id", run_id)
        inbox = f"{self._runs}/{run_id}/inbox"

        def waiting() -> bool:
            try:
                return any(not name.startswith(".") for name in os.listdir(inbox))
            except FileNotFoundError:
                return False

        try:
            return self._index.clear_unless(run_id, waiting)
        except OSError as exc:
            raise self._unavailable(exc, f"unschedule run {run_id!r}") from exc

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """List the buckets up to now (and on to the next live key) in time order."""
        self._wake.listen()
        self.waker.clear()  # this read covers every signal sent so far
        try:
            runs, following = self._index.due(now, max(0, limit))
        except OSError as exc:
            raise self._unavailable(exc, "read the due index") from exc
        return DueRuns(runs, following)

    # -- leases -----------------------------------------------------------

    # The lease is the content of the run's lock file, rewritten in place under its
    # exclusive lock and read under a shared one: no file to create, rename or remove.

    def _read_lease(self, run_id: str) -> Lease | None:
        try:
            fd = os.open(f"{self._runs}/{run_id}/lock", os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # never sees a rewrite half-way
            return self._parse_lease(run_id, read_fd(fd))
        finally:
            os.close(fd)

    def _parse_lease(self, run_id: str, raw: bytes) -> Lease | None:
        if not raw.strip():
            return None  # never taken, or released
        try:
            obj = orjson.loads(raw)
            lease = _hostile.lease_or_none(run_id, obj.get("owner"), obj.get("expires_at"))
        except (orjson.JSONDecodeError, AttributeError):
            lease = None
        if lease is None:
            _hostile.warn_once(self, "lease", run_id, f"{raw[:80]!r}", "reading it as expired")
            return _hostile.unreadable_lease(run_id)
        return lease

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read, or compare-and-set under the run's lock, the lease held in the lock file."""
        validate_id("run id", run_id)
        ttl = check_ttl(ttl)
        run_dir = f"{self._runs}/{run_id}"
        try:
            lease = self._read_lease(run_id)
            if owner is None or (lease is None and ttl <= 0):
                return lease  # do not create the run's directory for a lock to read
            with self._files.locked(run_dir) as fd:
                now = time.time()
                # From the locked descriptor: a second one's shared lock would wait on ours.
                raw = os.pread(fd, 1 << 16, 0)
                lease = self._parse_lease(run_id, raw)
                holder, expires_at = (lease.owner, lease.expires_at) if lease else (None, 0.0)
                if not lease_takable(holder, expires_at, owner, take_from, now):
                    return lease
                data = encode_json({"owner": owner, "expires_at": now + ttl}) if ttl > 0 else b""
                # Overwritten in place, padded with spaces (JSON whitespace) to the old
                # length: ext4 flushes a file truncated to 0 and written again at close,
                # 100x the cost of the write.
                if len(data) < len(raw):
                    data = data.ljust(len(raw))
                if data:
                    os.pwrite(fd, data, 0)
                    if self._fsync:
                        fdatasync(fd)
                return Lease(run_id, owner, now + ttl) if ttl > 0 else None
        except OSError as exc:
            raise self._unavailable(exc, f"take the lease of run {run_id!r}") from exc

    # -- run metadata -----------------------------------------------------

    async def put_run(self, info: RunInfo) -> None:
        """Replace meta.json atomically."""
        validate_id("run id", info.run_id)
        try:
            self._files.replace(f"{self._runs}/{info.run_id}", "meta.json", info.to_bytes())
        except OSError as exc:
            raise self._unavailable(exc, f"store metadata of run {info.run_id!r}") from exc

    def _meta(self, run_id: str) -> bytes | None:
        try:
            return read_file(f"{self._runs}/{run_id}/meta.json")
        except FileNotFoundError:
            return None  # a run with only events, or a half start
        except OSError as exc:
            raise self._unavailable(exc, f"read metadata of run {run_id!r}") from exc

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[RunInfo]:
        """List the run directories once, read every run's metadata, keep the newest: O(n).

        No index in creation order is kept (it would cost every run started
        one more file); this reads each ``meta.json`` once per call.
        """
        try:
            names = self._index.listing(self._runs) or []  # the one list_runs keeps too
        except OSError as exc:
            raise self._unavailable(exc, "list runs") from exc
        metas = ((run_id, self._meta(run_id)) for run_id in names)
        found = (_hostile.read_listed(self, r, data) for r, data in metas if data is not None)
        return keep_newest(found, status=status, workflow=workflow, limit=limit, before=before)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """List run directories in id order and read the metadata of each."""
        meta = self._meta
        listing: list[str] | None = None

        async def fetch(cursor: str | None, n: int) -> Page:
            nonlocal listing
            if listing is None:
                try:
                    # Kept across calls while runs/ is unchanged: a paged scan of n runs
                    # lists the directory once, not once per page.
                    listing = self._index.listing(self._runs) or []
                except OSError as exc:
                    raise self._unavailable(exc, "list runs") from exc
            start = 0 if cursor is None else bisect.bisect_right(listing, cursor)
            page = [(run_id, meta(run_id)) for run_id in listing[start : start + n]]
            return page, start + n < len(listing)

        async def fetch_ids(wanted: list[str]) -> Page:
            return [(r, meta(r)) for r in wanted], False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=limit,
            ids=ids,
            fetch_ids=fetch_ids,
        )

    # -- retention --------------------------------------------------------

    async def delete(self, run_id: str) -> bool:
        """Leave the due index, then rename the run's directory into trash/ and remove it there.

        The rename takes the log, inbox, lease and metadata away in one step:
        no reader sees part of the run. A crash after it leaves a directory
        in trash/ that no reader looks at; the next delete removes it.
        """
        validate_id("run id", run_id)
        run_dir = f"{self._runs}/{run_id}"
        trash = f"{self._root}/trash"
        try:
            self._index.clear(run_id)
            if not _exists(run_dir):
                return False
            self._files.makedirs(trash)
            gone = f"{trash}/{run_id}.{os.getpid()}.{time.time_ns()}"
            try:
                # No lock: a lease or due update caught in between lands in trash/ too, or
                # makes a directory without metadata, which listing and due() pass over.
                os.rename(run_dir, gone)
            except FileNotFoundError:
                return False  # another delete won
            if self._fsync:
                sync_dir(self._runs)
            for name in os.listdir(trash):  # this one, and any a crash left behind
                shutil.rmtree(f"{trash}/{name}", ignore_errors=True)
        except OSError as exc:
            raise self._unavailable(exc, f"delete run {run_id!r}") from exc
        return True

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a process sharing this directory makes work due, or ``timeout`` passes."""
        return await self._wake.wait(timeout)

    async def close(self) -> None:
        """Stop listening for wake-ups and remove this client's socket."""
        self._wake.close()
