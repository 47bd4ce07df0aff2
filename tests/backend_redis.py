"""The Redis backend under test: a private redis-server and its harness (a pytest plugin).

One server per test session (127.0.0.1, a free port, a temporary directory,
AOF on); each test gets a fresh key prefix, so tests never see each other's
runs. Without a ``redis-server`` binary the Redis tests fail, they do not skip.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio

from substantial.backends.redis import shard_of
from tests.harness import BadDue, Damage, Harness, bad_due_name, damaged
from tests.redis_server import RedisServer, RedisServerMissing


def start_server(
    directory: Path,
    *,
    appendfsync: str = "everysec",
    password: str | None = None,
    extra_args: Sequence[str] = (),
) -> RedisServer:
    """Start a private redis-server, failing the test (never skipping) if there is none."""
    server = RedisServer(
        directory, appendfsync=appendfsync, password=password, extra_args=extra_args
    )
    try:
        server.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


class RedisHarness(Harness):
    """A fresh key prefix on a shared redis-server."""

    name = "redis"

    def __init__(self, server: RedisServer) -> None:
        super().__init__()
        self.server = server
        self.prefix = "t" + uuid.uuid4().hex[:12]

    @property
    def url(self) -> str:
        return f"{self.server.url}?prefix={self.prefix}"

    def raw(self) -> redis.asyncio.Redis:
        """Return a plain redis-py client of the same server (the caller closes it)."""
        return redis.asyncio.Redis.from_url(self.server.url)

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        raw = self.raw()
        try:
            await raw.lset(f"{{{self.prefix}:{run_id}}}:log", position, b"\x00{not json")
        finally:
            await raw.aclose()

    async def corrupt_lease(self, run_id: str, form: Damage) -> None:
        key = f"{{{self.prefix}:{run_id}}}:lease"
        raw = self.raw()
        try:
            await raw.delete(key)
            if form == "garbage":
                await raw.set(key, damaged(form))  # a string where a hash belongs
            else:
                await raw.hset(key, mapping={"owner": "", "expires_at": "soon"})
        finally:
            await raw.aclose()

    async def corrupt_meta(self, run_id: str, form: Damage) -> None:
        raw = self.raw()
        try:
            await raw.set(f"{{{self.prefix}:{run_id}}}:meta", damaged(form))
        finally:
            await raw.aclose()

    async def add_bad_due(self, kind: BadDue, at: float) -> None:
        # Scores are always numbers in Redis: the bad time is one no clock reaches.
        member = bad_due_name(kind)
        score = float("-inf") if kind == "bad-time" else at
        raw = self.raw()
        try:
            await raw.zadd(f"{{{self.prefix}:due:{shard_of(member)}}}", {member: score})
        finally:
            await raw.aclose()

    async def aclose(self) -> None:
        await super().aclose()
        if self.server.proc is None:
            return  # a test stopped the server: no keys to drop
        # Drop this test's keys so a long session keeps the server small.
        raw = self.raw()
        try:
            keys = [k async for k in raw.scan_iter(match=f"{{{self.prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await raw.unlink(*keys[i : i + 500])
        finally:
            await raw.aclose()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_harness(redis_server: RedisServer) -> RedisHarness:
    # Plain (not async): the shared `harness` fixture resolves it from inside its loop
    # and closes it; tests that use it directly close it themselves.
    return RedisHarness(redis_server)
