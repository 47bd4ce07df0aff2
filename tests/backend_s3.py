"""The S3 backend under test: a private SeaweedFS server and its harness (a pytest plugin).

One ``weed mini`` per test session (127.0.0.1, free ports, a temporary
directory, SigV4 credentials); each test gets a fresh key prefix in the one
bucket, so tests never see each other's runs. Without the ``weed`` binary
the S3 tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from substantial.backends.s3 import S3Backend
from tests.harness import BadDue, Damage, Harness, bad_due_name, damaged
from tests.s3_server import S3Server, S3ServerMissing

#: Poll bounds for tests: cross-process wake-ups in the engine tests within 0.2 s.
TEST_POLL = {"min_poll": 0.02, "max_poll": 0.2}


def start_server() -> S3Server:
    """Start a private SeaweedFS, failing the test (never skipping) if there is none."""
    server = S3Server()
    try:
        server.start()
    except S3ServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


class S3Harness(Harness):
    """A fresh key prefix in the bucket of a shared SeaweedFS server."""

    name = "s3"

    def __init__(self, server: S3Server) -> None:
        super().__init__()
        self.server = server
        self.prefix = "t" + uuid.uuid4().hex[:12]

    @property
    def url(self) -> str:
        return self.server.url(self.prefix, **TEST_POLL)

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        key = S3Backend(self.server.bucket, self.prefix).entry_key(run_id, position)
        await self._put(key, b"\x00{not json")

    async def _put(self, key: str, body: bytes) -> None:
        client = self.server.client()
        try:
            await asyncio.to_thread(
                client.put_object, Bucket=self.server.bucket, Key=key, Body=body
            )
        finally:
            client.close()

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        await self._put(f"{self.prefix}/runs/{run_id}/lease", damaged(form))

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        await self._put(f"{self.prefix}/meta/{run_id}", damaged(form))

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        time_part = "notatime" if kind == "bad-time" else f"{int(at * 1_000_000):017d}"
        await self._put(f"{self.prefix}/due/{time_part}!{bad_due_name(kind)}!w", b"")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    server = start_server()
    yield server
    server.stop()


@pytest.fixture
def s3_harness(s3_server: S3Server) -> Harness:
    return S3Harness(s3_server)
