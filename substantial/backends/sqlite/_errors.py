"""What a SQLite or OS error means for the caller of the sqlite backend, and what to do."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from substantial.errors import BackendUnavailable

__all__ = ["unavailable"]


def unavailable(
    path: Path, timeout: float, exc: sqlite3.Error | OSError, action: str
) -> BackendUnavailable:
    """Translate a driver or OS error into the one error callers handle, saying what to do."""
    code = getattr(exc, "sqlite_errorname", "") or ""
    if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        advice = (
            f"another process held {path} locked for more than {timeout}s; retry, or "
            "pass a larger timeout= if long transactions are expected"
        )
    elif code.startswith("SQLITE_FULL"):
        advice = f"the disk holding {path} is full; free space"
    elif code.startswith("SQLITE_READONLY") or isinstance(exc, PermissionError):
        advice = (
            f"{path} is read-only to this process; give its user write access to the file, "
            "its -wal and -shm files and their directory"
        )
    elif code.startswith("SQLITE_CANTOPEN") or isinstance(exc, OSError):
        advice = f"cannot open {path}; check that its directory exists and is writable"
    elif code.startswith("SQLITE_IOERR"):
        advice = f"the disk holding {path} reported an I/O error; check it (dmesg)"
    elif code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        advice = (
            f"{path} is not a valid database (corrupt, or another kind of file); restore it "
            "from a backup or point the backend at another path"
        )
    else:
        advice = f"check that {path} is a reachable, writable SQLite database"
    return BackendUnavailable(f"cannot {action}: {exc}; {advice}, then retry")
