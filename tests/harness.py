"""Backend harnesses: how the shared suites make, share and damage each backend.

A new backend joins every suite by adding a harness class here and a
``<name>_harness`` fixture in conftest.py.
"""

from __future__ import annotations

import abc
import os
import sqlite3
from pathlib import Path

from substantial.backends import from_url
from substantial.backends.base import Backend


class Harness(abc.ABC):
    """One backend under test: a store, and ways to open it and to damage it."""

    name: str
    #: Whether other processes can open the same store from ``url``.
    shared_across_processes: bool = True

    def __init__(self) -> None:
        self._opened: list[Backend] = []

    @property
    @abc.abstractmethod
    def url(self) -> str:
        """A URL that opens this very store, from this or another process."""

    async def open(self) -> Backend:
        """Open one more client of the same store."""
        backend = from_url(self.url)
        self._opened.append(backend)
        return backend

    @abc.abstractmethod
    async def corrupt_entry(self, run_id: str, position: int) -> None:
        """Replace the stored bytes of one log entry with garbage, bypassing the backend."""

    async def aclose(self) -> None:
        """Close every backend this harness opened."""
        for backend in self._opened:
            await backend.close()
        self._opened.clear()


class MemoryHarness(Harness):
    name = "memory"
    shared_across_processes = False

    def __init__(self) -> None:
        super().__init__()
        from substantial.backends.memory import MemoryBackend

        self.backend = MemoryBackend()

    @property
    def url(self) -> str:
        return "memory://"

    async def open(self) -> Backend:
        return self.backend

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        self.backend.logs[run_id][position] = b"\x00{not json"


class FSHarness(Harness):
    name = "fs"

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    @property
    def url(self) -> str:
        return f"file://{self.root}"

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        from substantial.backends.fs import FSBackend

        path = FSBackend(self.root).entry_path(run_id, position)
        os.chmod(path, 0o644)
        path.write_bytes(b"\x00{not json")


class SQLiteHarness(Harness):
    name = "sqlite"

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    @property
    def url(self) -> str:
        return f"sqlite://{self.path}"

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        with sqlite3.connect(self.path) as db:
            db.execute(
                "UPDATE log SET entry = ? WHERE run_id = ? AND position = ?",
                (b"\x00{not json", run_id, position),
            )
