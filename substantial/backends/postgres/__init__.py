"""A Postgres backend: tables in one database shared by every worker, on any machine.

Each store is a set of tables named ``<prefix>_*`` (default prefix
``substantial``), created on first use. The primary key of the log is the
fence, an index on the due time answers ``due()``, leases are conditional
upserts judged by the server's clock, and LISTEN/NOTIFY wakes waiting
workers at once. docs/PROTOCOL.md (the postgres section) describes the
tables and statements precisely. Needs the ``postgres`` extra (asyncpg).
"""

from __future__ import annotations

from substantial.backends.postgres._backend import PostgresBackend
from substantial.backends.postgres._schema import SCHEMA_VERSION

__all__ = ["SCHEMA_VERSION", "PostgresBackend"]
