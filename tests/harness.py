"""Backend harnesses: how the shared suites make, share and damage each backend.

A new backend joins every suite by adding a harness class here and a
``<name>_harness`` fixture in conftest.py.
"""

from __future__ import annotations

import abc
import bisect
import sqlite3
from pathlib import Path
from typing import Literal

from substantial.backends import from_url
from substantial.backends.base import Backend, Lease

#: How a stored lease or metadata record is damaged: bytes that are not JSON at all
#: (or, on Redis, a key of the wrong type), or JSON whose fields have the wrong types.
Damage = Literal["garbage", "types"]
#: A bad due-index entry: run id "..", an empty run id, or a time that is not a finite
#: number for the valid run id "hostile-time" (whatever the store can hold: NaN, -inf, text).
BadDue = Literal["dotdot", "empty", "bad-time"]

GARBAGE = b"\x00{not json"
WRONG_TYPES = b'{"owner": 5, "expires_at": "soon", "run_id": 7, "status": 3, "protocol": []}'


def damaged(form: Damage) -> bytes:
    return GARBAGE if form == "garbage" else WRONG_TYPES


def bad_due_name(kind: BadDue) -> str:
    """The run id part of a bad due entry."""
    return {"dotdot": "..", "empty": "", "bad-time": "hostile-time"}[kind]


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

    # The hostile-input suite (tests/test_backend_hostile.py) writes damage with these.
    # Defaults raise, so a harness that lacks one fails loudly instead of passing.

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        """Store an unreadable lease for the run, bypassing the backend."""
        raise NotImplementedError(f"the {self.name} harness does not implement corrupt_lease")

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        """Replace the run's stored metadata with an unreadable record, bypassing the backend."""
        raise NotImplementedError(f"the {self.name} harness does not implement corrupt_meta")

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        """Put a bad entry into the due index, due at ``at`` where the form has a time."""
        raise NotImplementedError(f"the {self.name} harness does not implement add_bad_due")

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

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        bad = GARBAGE if form == "garbage" else Lease(run_id, 5, "soon")  # type: ignore[arg-type]
        self.backend.leases[run_id] = bad  # type: ignore[assignment]

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        self.backend.runs[run_id] = damaged(form)

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        if kind == "bad-time":
            # A NaN breaks the list's order: put it first, where bisect would never look.
            self.backend._due.insert(0, (float("nan"), "hostile-time"))
            self.backend._due_at["hostile-time"] = float("nan")
        else:
            bisect.insort(self.backend._due, (at, bad_due_name(kind)))
            self.backend._due_at[bad_due_name(kind)] = at


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
        from substantial.backends.fs._segment import HEADER_SIZE, frame, parse

        # Garbage stored as the entry, in a well-formed record: what a buggy writer leaves.
        path = FSBackend(self.root).segment_path(run_id)
        data = path.read_bytes()
        found = parse(data[HEADER_SIZE:], HEADER_SIZE, 0)
        entries = [data[at : at + n] for at, n in found.records]
        entries[position] = b"\x00{not json"
        path.write_bytes(data[:HEADER_SIZE] + b"".join(frame(e) for e in entries))

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        run_dir = self.root / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "lock").write_bytes(damaged(form))  # the lock file holds the lease

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        (self.root / "runs" / run_id / "meta.json").write_bytes(damaged(form))

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        at_us = int(at * 1_000_000)
        bucket = self.root / "due" / f"{at_us // (3600 * 1_000_000):08d}"
        bucket.mkdir(parents=True, exist_ok=True)
        time_part = "x" * 17 if kind == "bad-time" else f"{at_us:017d}"
        (bucket / f"{time_part}-{bad_due_name(kind)}").touch()


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

    def _execute(self, sql: str, args: tuple[object, ...]) -> None:
        db = sqlite3.connect(self.path)
        try:
            with db:
                db.execute(sql, args)
        finally:
            db.close()

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        owner, expires_at = (b"\x00", GARBAGE) if form == "garbage" else (5, "soon")
        self._execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?)", (run_id, owner, expires_at))

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        self._execute("UPDATE runs SET info = ? WHERE run_id = ?", (damaged(form), run_id))

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        value: object = "soon" if kind == "bad-time" else at
        self._execute("INSERT OR REPLACE INTO due VALUES (?, ?)", (bad_due_name(kind), value))
