"""File primitives of the fs backend: publish, replace atomically, lock, translate OS errors.

Publishing gives a complete file its name in one step (create-if-absent);
replacing swaps a file's content so readers see the old or the new bytes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator

from substantial.errors import BackendUnavailable

__all__ = ["Files", "arrival_ns", "fdatasync", "read_fd", "read_file", "sync_dir", "tmp_name"]

#: Flushes a file's data and what is needed to read it back (its size), not its times.
fdatasync = getattr(os, "fdatasync", os.fsync)

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


def arrival_ns() -> int:
    """Return a wall-clock timestamp strictly greater than any this process returned before."""
    global _last_arrival_ns
    with _arrival_lock:
        now = time.time_ns()
        if now <= _last_arrival_ns:
            now = _last_arrival_ns + 1
        _last_arrival_ns = now
        return now


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_fd(fd: int) -> bytes:
    """Read a whole open file."""
    size = os.fstat(fd).st_size
    data = os.read(fd, size)
    if len(data) == size:
        return data
    chunks = [data]
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def read_file(path: str) -> bytes:
    """Read a whole file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


def sync_dir(path: str) -> None:
    """Flush a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_name(directory: str, base: str) -> str:
    """Return a fresh temporary name in ``directory``; readers skip names starting with '.'."""
    return f"{directory}/.{base}.{os.getpid()}-{os.urandom(4).hex()}.tmp"


class Files:
    """Writes under one store directory, flushed to disk before returning in ``fsync`` mode."""

    def __init__(self, root: str, *, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        #: Whether unnamed temporaries (O_TMPFILE) work here; cleared on first refusal.
        self.use_tmpfile = _HAVE_TMPFILE

    def unavailable(self, exc: OSError, action: str) -> BackendUnavailable:
        """Translate an OS error into the one error callers handle, saying what to do."""
        root = self.root
        where = exc.filename or root
        code = exc.errno
        if code in (errno.ENOSPC, errno.EDQUOT):
            advice = f"the file system holding {root} is full; free space or raise the quota"
        elif code in (errno.EACCES, errno.EPERM):
            advice = (
                f"permission denied on {where}; give this process's user read and write access "
                f"to {root} and everything under it"
            )
        elif code == errno.EROFS:
            advice = (
                f"{root} is on a read-only file system; remount it read-write or point "
                "the backend at a writable directory"
            )
        elif code == errno.EIO:
            advice = f"the disk holding {root} reported an I/O error; check it (dmesg)"
        elif code == errno.ENOTDIR:
            advice = (
                f"part of the path {where} is a file, not a directory; point the backend at a "
                "directory"
            )
        elif code in (errno.EMFILE, errno.ENFILE):
            advice = "too many open files; raise the limit (ulimit -n)"
        else:
            advice = f"check that {root} is a reachable, writable directory"
        return BackendUnavailable(f"cannot {action}: {exc.strerror or exc}; {advice}, then retry")

    def makedirs(self, directory: str) -> None:
        """Create ``directory`` and its parents (durably in ``fsync`` mode)."""
        os.makedirs(directory, exist_ok=True)
        if self.fsync:
            # New directory entries must reach the disk too, up to the store's parent.
            path = directory
            while len(path) >= len(self.root):
                path = os.path.dirname(path)
                sync_dir(path)

    def publish(self, directory: str, name: str, data: bytes) -> None:
        """Create ``directory/name`` holding ``data`` in one step; FileExistsError if taken."""
        for attempt in range(3):
            try:
                if self.use_tmpfile:
                    try:
                        self._publish_tmpfile(directory, name, data)
                    except OSError as exc:
                        if exc.errno not in _TMPFILE_UNSUPPORTED:
                            raise
                        # This file system has no O_TMPFILE: use named temporaries from now on.
                        self.use_tmpfile = False
                        self._publish_named(directory, name, data)
                else:
                    self._publish_named(directory, name, data)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self.makedirs(directory)
            else:
                if self.fsync:
                    sync_dir(directory)
                return

    def _publish_tmpfile(self, directory: str, name: str, data: bytes) -> None:
        # An unnamed file vanishes with its process if killed before link():
        # nothing to clean up, and one syscall fewer than a named temporary.
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o444)
        try:
            _write_all(fd, data)
            if self.fsync:
                os.fsync(fd)
            os.link(f"/proc/self/fd/{fd}", f"{directory}/{name}", src_dir_fd=_anchor())
        finally:
            os.close(fd)

    def _publish_named(self, directory: str, name: str, data: bytes) -> None:
        tmp = tmp_name(directory, name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            try:
                _write_all(fd, data)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.link(tmp, f"{directory}/{name}")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def replace(self, directory: str, name: str, data: bytes) -> None:
        """Atomically set ``directory/name`` to ``data``: readers see the old or the new bytes."""
        for attempt in range(3):
            tmp = tmp_name(directory, name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self.makedirs(directory)
                continue
            try:
                try:
                    _write_all(fd, data)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, f"{directory}/{name}")
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
            if self.fsync:
                sync_dir(directory)
            return

    @contextlib.contextmanager
    def locked(self, run_dir: str) -> Iterator[int]:
        """Hold the run's lock file (it holds the lease): serializes lease and schedule updates."""
        path = f"{run_dir}/lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                self.makedirs(run_dir)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if self.fsync:
                sync_dir(run_dir)  # it holds the lease: its name must survive power loss too
        try:
            # Held for a few syscalls only, so blocking the event loop here is brief.
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)  # closing the last descriptor releases the lock
