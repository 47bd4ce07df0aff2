"""The Postgres backend under test: a private PostgreSQL server and its harness (a pytest plugin).

One server per test session (127.0.0.1, a free port, a temporary directory,
durable settings); each test gets a fresh table prefix, so tests never see
each other's runs. Without the PostgreSQL binaries the Postgres tests fail,
they do not skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from substantial.backends.postgres._schema import function_name
from tests.harness import BadDue, Damage, Harness, bad_due_name, damaged
from tests.postgres_server import PostgresServer, PostgresServerMissing

TABLES = ("schema", "log", "inbox", "due", "leases", "runs")


def start_server() -> PostgresServer:
    """Start a private PostgreSQL, failing the test (never skipping) if there is none."""
    server = PostgresServer()
    try:
        server.start()
    except PostgresServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


class PostgresHarness(Harness):
    """A fresh table prefix in the database of a shared PostgreSQL server."""

    name = "postgres"

    def __init__(self, server: PostgresServer) -> None:
        super().__init__()
        self.server = server
        self.prefix = "t" + uuid.uuid4().hex[:12]

    @property
    def url(self) -> str:
        return f"{self.server.url()}?prefix={self.prefix}"

    async def raw(self) -> asyncpg.Connection:
        """Return a plain asyncpg connection to the same database (the caller closes it)."""
        return await asyncpg.connect(self.server.url())

    def table(self, name: str) -> str:
        return f'"{self.prefix}_{name}"'

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        conn = await self.raw()
        try:
            await conn.execute(
                f"UPDATE {self.table('log')} SET entry = $1 WHERE run_id = $2 AND position = $3",
                b"\x00{not json",
                run_id,
                position,
            )
        finally:
            await conn.close()

    async def _execute(self, sql: str, *args: object) -> None:
        conn = await self.raw()
        try:
            await conn.execute(sql, *args)
        finally:
            await conn.close()

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        # Typed columns hold no wrong types: the damage they can hold is an empty
        # owner and an expiry that is not a finite number.
        owner, expires_at = ("", float("nan")) if form == "garbage" else ("5", float("inf"))
        await self._execute(
            f"INSERT INTO {self.table('leases')} VALUES ($1, $2, $3) "
            "ON CONFLICT (run_id) DO UPDATE SET owner = $2, expires_at = $3",
            run_id,
            owner,
            expires_at,
        )

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        await self._execute(
            f"UPDATE {self.table('runs')} SET info = $1 WHERE run_id = $2", damaged(form), run_id
        )

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        await self._execute(
            f"INSERT INTO {self.table('due')} VALUES ($1, $2) "
            "ON CONFLICT (run_id) DO UPDATE SET at = $2",
            bad_due_name(kind),
            float("nan") if kind == "bad-time" else at,
        )

    async def aclose(self) -> None:
        await super().aclose()
        if not self.server.running:
            return  # a test stopped the server: no tables to drop
        # Drop this test's tables so a long session keeps the database small.
        conn = await self.raw()
        try:
            await conn.execute(
                "DROP TABLE IF EXISTS " + ", ".join(self.table(t) for t in TABLES) + " CASCADE"
            )
            await conn.execute(f"DROP FUNCTION IF EXISTS {function_name(self.prefix)}")
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = start_server()
    yield server
    server.destroy()


@pytest.fixture
def postgres_harness(postgres_server: PostgresServer) -> PostgresHarness:
    # Plain (not async): the shared `harness` fixture resolves it from inside its loop
    # and closes it; tests that use it directly close it themselves.
    return PostgresHarness(postgres_server)
