"""The fs backend: the log, the inbox, leases and metadata as files under one directory."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from substantial.backends import _hostile
from substantial.backends._common import (
    Page,
    ack_ids,
    check_durability,
    check_position,
    check_time,
    filtered_runs,
    gap_error,
    lease_takable,
    local_store_url,
)
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
from substantial.backends.fs._due import DueIndex, key_us
from substantial.backends.fs._files import Files, arrival_ns, read_fd, read_file, sync_dir
from substantial.errors import CorruptRecord, PositionTaken

__all__ = ["FSBackend"]

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

    def __init__(self, path: str | os.PathLike[str], *, durability: Durability = "process") -> None:
        super().__init__()
        self.root = Path(os.path.abspath(os.fspath(path)))
        self.durability: Durability = check_durability(durability)
        self._root = str(self.root)
        self._runs = f"{self._root}/runs"
        self._fsync = durability == "fsync"
        self._files = Files(self._root, fsync=self._fsync)
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

    def entry_path(self, run_id: str, position: int) -> Path:
        """Return the file that holds one log entry (it need not exist)."""
        validate_id("run id", run_id)
        return Path(self._runs, run_id, "log", f"{position:0{_POSITION_DIGITS}d}")

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store the entry if the position is free, by linking a complete file to its name."""
        validate_id("run id", run_id)
        check_position(run_id, position)
        log_dir = f"{self._runs}/{run_id}/log"
        try:
            # Entries are never removed: once the one before exists, it stays.
            if position and not _exists(f"{log_dir}/{position - 1:0{_POSITION_DIGITS}d}"):
                raise gap_error(run_id, position)
            self._files.publish(log_dir, f"{position:0{_POSITION_DIGITS}d}", entry)
        except FileExistsError:
            raise PositionTaken(run_id, position) from None
        except OSError as exc:
            raise self._unavailable(exc, f"append to run {run_id!r}") from exc

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Read entry files from ``start`` until the first missing one."""
        validate_id("run id", run_id)
        position = check_position(run_id, start, "log start")
        log_dir = f"{self._runs}/{run_id}/log"
        out: list[bytes] = []
        try:
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
        except OSError as exc:
            raise self._unavailable(exc, f"read the log of run {run_id!r}") from exc

    # -- the inbox --------------------------------------------------------

    def _post(self, run_id: str, event_id: str, data: bytes) -> bool:
        payload = b"%d\n" % arrival_ns() + data
        try:
            self._files.publish(f"{self._runs}/{run_id}/inbox", event_id, payload)
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
            self._index.set(run_id, key_us(time.time()))
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

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Delete the events' files; missing ones and malformed ids are ignored."""
        validate_id("run id", run_id)
        inbox = f"{self._runs}/{run_id}/inbox"
        ids = ack_ids(event_ids)
        try:
            for event_id in ids:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{inbox}/{event_id}")
            if self._fsync and ids:
                with contextlib.suppress(FileNotFoundError):
                    sync_dir(inbox)
        except OSError as exc:
            raise self._unavailable(exc, f"acknowledge events of run {run_id!r}") from exc

    # -- the due index ----------------------------------------------------

    async def schedule(self, run_id: str, at: float) -> None:
        """Point the run at a new due key, then remove its old key."""
        validate_id("run id", run_id)
        at_us = key_us(check_time(at))
        try:
            self._index.set(run_id, at_us)
        except OSError as exc:
            raise self._unavailable(exc, f"schedule run {run_id!r}") from exc
        if at_us <= key_us(time.time()):
            self._wake.broadcast()

    async def unschedule(self, run_id: str) -> None:
        """Remove the run's pointer and due key."""
        validate_id("run id", run_id)
        try:
            self._index.clear(run_id)
        except OSError as exc:
            raise self._unavailable(exc, f"unschedule run {run_id!r}") from exc

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """List the buckets up to now and return their current keys in time order."""
        self._wake.listen()
        self.waker.clear()  # this read covers every signal sent so far
        if limit <= 0:
            return []
        try:
            return self._index.due(now, limit, following=False)[0]
        except OSError as exc:
            raise self._unavailable(exc, "read the due index") from exc

    async def next_due_at(self) -> float | None:
        """Return the earliest current key, reading only up to the first bucket that has one."""
        try:
            return self._index.due(time.time(), 0)[1]
        except OSError as exc:
            raise self._unavailable(exc, "read the due index") from exc

    # -- leases -----------------------------------------------------------

    def _read_lease(self, run_id: str) -> Lease | None:
        try:
            raw = read_file(f"{self._runs}/{run_id}/lease")
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
            with self._files.locked(f"{self._runs}/{run_id}"):
                now = time.time()
                lease = self._read_lease(run_id)
                holder, expires_at = (lease.owner, lease.expires_at) if lease else (None, 0.0)
                if not lease_takable(holder, expires_at, owner, steal_from, now):
                    return False
                data = encode_json({"owner": owner, "expires_at": now + ttl})
                self._files.replace(f"{self._runs}/{run_id}", "lease", data)
                return True
        except OSError as exc:
            raise self._unavailable(exc, f"take the lease of run {run_id!r}") from exc

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Delete the lease file if ``owner`` holds it."""
        validate_id("run id", run_id)
        try:
            if self._read_lease(run_id) is None:
                return  # nothing to release: do not create the run's directory for a lock
            with self._files.locked(f"{self._runs}/{run_id}"):
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
            self._files.replace(f"{self._runs}/{info.run_id}", "meta.json", info.to_bytes())
        except OSError as exc:
            raise self._unavailable(exc, f"store metadata of run {info.run_id!r}") from exc

    def _get_run(self, run_id: str) -> RunInfo | None:
        try:
            data = read_file(f"{self._runs}/{run_id}/meta.json")
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
        try:
            try:
                run_ids = sorted(os.listdir(self._runs))
            except FileNotFoundError:
                return []
        except OSError as exc:
            raise self._unavailable(exc, "list runs") from exc

        async def fetch(cursor: str | None, n: int) -> Page:
            page: list[tuple[str, bytes | None]] = []
            for run_id in run_ids:
                if cursor is not None and run_id <= cursor:
                    continue
                try:
                    page.append((run_id, read_file(f"{self._runs}/{run_id}/meta.json")))
                except FileNotFoundError:
                    page.append((run_id, None))  # a run with only events, or a half start
                except OSError as exc:
                    raise self._unavailable(exc, "list runs") from exc
                if len(page) >= n:
                    return page, True
            return page, False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=limit,
        )

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a process sharing this directory makes work due, or ``timeout`` passes."""
        return await self._wake.wait(timeout)

    async def close(self) -> None:
        """Stop listening for wake-ups and remove this client's socket."""
        self._wake.close()
