"""A cross-process lock around SQLite write transactions, so waiting writers queue tightly.

SQLite lets one process write at a time. A writer that finds the database
locked waits in SQLite's busy handler, which sleeps 1, 2, 5, 10 ms and more
between tries: with several worker processes on one database, most of their
time went to those sleeps, while a transaction holds the lock for tens of
microseconds. The processes of one store now take an advisory ``flock`` on a
file beside the database around each write transaction, trying again every
few tens of microseconds, so the next writer starts soon after the last one
ends. SQLite's own locking still decides what is safe: a process that does
not take this lock (another tool, an older version) is only slower to queue.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from substantial.backends.sqlite._fork import reset_in_child

__all__ = ["WriterLock"]

#: The first and the longest pause between tries while another process writes.
FIRST_PAUSE = 0.00002
LONGEST_PAUSE = 0.0005


class WriterLock:
    """An exclusive ``flock`` on ``<database>.lock``, held around one write transaction."""

    def __init__(self, database: Path, timeout: float) -> None:
        self.path = Path(f"{database}.lock")
        self.timeout = timeout
        self._fd: int | None = None
        self._pid = 0
        reset_in_child(self)

    def after_fork(self) -> None:
        """Forget the parent's file in a forked child (closing it would drop the parent's lock)."""
        self._fd = None

    def _file(self) -> int | None:
        # flock belongs to the open file: a forked child must open its own, or parent and
        # child would both "hold" one lock (after_fork clears the child's fd).
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError:
                return None  # a read-only directory: SQLite's own locking still applies
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> bool:
        """Take the lock, waiting up to ``timeout``; return False to go on without it."""
        fd = self._file()
        if fd is None:
            return False
        deadline = 0.0
        pause = FIRST_PAUSE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            except OSError:
                return False  # a filesystem without flock
            now = time.monotonic()
            if not deadline:
                deadline = now + self.timeout
            elif now >= deadline:
                return False  # held too long (a stopped process): let SQLite's timeout decide
            time.sleep(pause)
            pause = min(pause * 2, LONGEST_PAUSE)

    def release(self) -> None:
        """Let the next writer in."""
        if self._fd is not None:
            # Not contextlib.suppress: an object per write on the hot path.
            try:  # noqa: SIM105
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass  # the lock went with the file

    def close(self) -> None:
        """Close the lock file (the lock goes with it)."""
        if self._fd is not None and self._pid == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd = None
