"""A backend in one SQLite file (WAL mode), shared safely by many processes of one machine.

Writes are group-committed: every write issued by the tasks of one process
during one event-loop iteration joins one transaction. docs/PROTOCOL.md
("sqlite backend") describes the tables.

Modules: ``_schema`` (tables, statements, connection setup), ``_batch``
(group commit) and ``_backend`` (the backend itself).
"""

from __future__ import annotations

from substantial.backends.sqlite._backend import SQLiteBackend
from substantial.backends.sqlite._schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "SQLiteBackend"]
