"""Checkpoints off the event loop: a thread copies the write-ahead log into the database.

In WAL mode SQLite copies committed pages back into the database file once
the log has grown past ``wal_autocheckpoint`` pages, inside the commit that
crossed the mark, and syncs the log and the database file as it does. Done
by the connection of the event loop, that stalls every run of the process
while it lasts: under steady load it was more than half the time of a commit
(255 us a commit with it, 100 us without). A backend here checkpoints from
a thread of its own with a connection of its own instead, shortly after
writes. The checkpoint is PASSIVE: it neither waits for nor blocks readers
and writers. SQLite's own checkpoint stays, at ``BACKSTOP_PAGES``, as the
bound on the log's length when the thread cannot keep up; it then finds
most pages already copied. Only with ``durability="process"``: with
``"fsync"`` every commit syncs the log, and a checkpoint syncing it beside
them slowed commits down instead (W2 about 15% lower).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path

from substantial.backends.sqlite._fork import reset_in_child

__all__ = ["BACKSTOP_PAGES", "PAUSE", "Checkpointer"]

logger = logging.getLogger("substantial.backends.sqlite")

#: How long after a commit the thread checkpoints: the writes of that while share one.
PAUSE = 0.05
#: Fewer commits than this since the last checkpoint wait for more, up to ``LINGER``
#: seconds: a trickle of commits (an event now and then) is not worth two syncs each.
MIN_COMMITS = 64
LINGER = 1.0
#: The log length (pages) at which a commit still checkpoints by itself.
BACKSTOP_PAGES = 10_000


class Checkpointer:
    """A thread that checkpoints one database a little after each burst of commits."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.timeout = timeout
        self.passes = 0  # checkpoints run, for tests and diagnostics
        self.commits = 0  # commits noted
        self._wake = threading.Event()
        # Read without a lock by the writer: a stale True only merges its commit into the
        # checkpoint about to run (the thread clears the event before it resets the flag).
        self._noted = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pid = 0
        reset_in_child(self)

    def after_fork(self) -> None:
        """In a forked child, no thread (none survives fork): the next commit starts one."""
        self._thread = None
        self._noted = False

    def committed(self) -> None:
        """Note a commit; the thread checkpoints within ``PAUSE`` (``LINGER`` for a few)."""
        self.commits += 1
        if self._noted:
            return
        thread = self._thread
        if thread is None or (thread.ident is not None and not thread.is_alive()):
            # The first commit, one in a forked child (threads do not survive fork), or
            # the thread died: a new one, started a moment later, off this commit's path.
            # Thread.start() waits until the new thread runs, which on a busy machine
            # held up a new worker's first step by a millisecond and more.
            self._pid = os.getpid()
            self._stopping = False
            self._wake = threading.Event()
            thread = self._thread = threading.Thread(
                target=self._run, name=f"substantial-checkpoint {self.path.name}", daemon=True
            )
            try:
                asyncio.get_running_loop().call_later(PAUSE, self._start, thread)
            except RuntimeError:  # no loop to wait on: now, then
                self._start(thread)
        self._noted = True
        self._wake.set()

    def _start(self, thread: threading.Thread) -> None:
        if self._thread is thread and not self._stopping and self._pid == os.getpid():
            thread.start()

    def stop(self) -> None:
        """Ask the thread to end, without waiting (a backend dropped unclosed calls this)."""
        self._stopping = True
        self._wake.set()

    def close(self) -> None:
        """Stop the thread once a checkpoint under way ends."""
        thread, self._thread = self._thread, None
        self.stop()
        if thread is not None and thread.ident is not None and self._pid == os.getpid():
            thread.join(self.timeout)

    def _run(self) -> None:
        db: sqlite3.Connection | None = None
        wake = self._wake
        done, last = 0, time.monotonic()
        try:
            while True:
                wake.wait(LINGER if self.commits > done else None)
                if self._stopping:
                    return
                time.sleep(PAUSE)
                wake.clear()
                self._noted = False
                if self._stopping:
                    return
                if self.commits - done < MIN_COMMITS and time.monotonic() - last < LINGER:
                    continue  # a trickle: wait for more, or for LINGER to pass
                done, last = self.commits, time.monotonic()
                try:
                    if db is None:
                        db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
                        # As the writers (durability="process"): the log is synced before
                        # pages are copied, the database after.
                        db.execute("PRAGMA synchronous = NORMAL")
                    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.passes += 1
                except (sqlite3.Error, OSError) as exc:
                    # Not fatal: the commits' own checkpoint at BACKSTOP_PAGES still bounds
                    # the log. Open afresh next time (the file may have been replaced).
                    logger.debug("background checkpoint of %s failed: %s", self.path, exc)
                    if db is not None:
                        db.close()
                        db = None
        finally:
            if db is not None:
                db.close()
