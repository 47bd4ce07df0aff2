"""The conformance suite again, on a real three-node Redis Cluster.

A script that touched keys of two hash slots would fail here with CROSSSLOT,
so a pass shows the key layout keeps each run in one slot, and that the
sharded indexes are read and written one slot at a time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio
from redis.crc import key_slot

from substantial.backends.base import Backend
from substantial.backends.redis import SHARDS
from substantial.errors import PositionTaken
from substantial.records import encode_entry
from substantial.testing.contract import BackendContract, Store
from tests.harness import Harness
from tests.redis_server import RedisClusterServers, RedisServerMissing

# Collected again in this module, where `harness` means the cluster.
from tests.test_backend_contract import (  # noqa: F401
    test_a_corrupt_entry_is_reported_and_the_rest_stays_readable,
    test_store_run_completes_a_half_done_start,
    test_store_run_is_idempotent,
    test_the_lease_of_a_dead_process_on_this_host_is_taken_over,
)


class RedisClusterHarness(Harness):
    """A fresh key prefix on a shared Redis Cluster."""

    name = "redis-cluster"

    def __init__(self, cluster: RedisClusterServers) -> None:
        super().__init__()
        self.cluster = cluster
        self.prefix = "t" + uuid.uuid4().hex[:12]

    @property
    def url(self) -> str:
        return f"{self.cluster.url}&prefix={self.prefix}"

    def raw(self) -> redis.asyncio.RedisCluster:
        return redis.asyncio.RedisCluster.from_url(self.cluster.servers[0].url)

    async def corrupt_entry(self, run_id: str, position: int) -> None:
        raw = self.raw()
        try:
            await raw.lset(f"{{{self.prefix}:{run_id}}}:log", position, b"\x00{not json")
        finally:
            await raw.aclose()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    cluster = RedisClusterServers(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except RedisServerMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture
async def harness(redis_cluster: RedisClusterServers) -> AsyncIterator[Harness]:
    h = RedisClusterHarness(redis_cluster)
    yield h
    await h.aclose()


@pytest.fixture
async def backend(harness: Harness) -> Backend:
    return await harness.open()


class TestContractOnCluster(BackendContract):
    """The shipped suite on the cluster. No URL: worker processes behave the same on a
    cluster, so the slow cross-process tests run on the single server only."""

    @pytest.fixture
    async def store(self, harness: Harness) -> Store:
        return Store(harness.open)


async def test_the_due_shards_spread_over_every_node(harness: RedisClusterHarness) -> None:
    raw = harness.raw()
    try:
        await raw.initialize()
        owners = {
            raw.get_node_from_key(f"{{{harness.prefix}:due:{k}}}").name for k in range(SHARDS)
        }
    finally:
        await raw.aclose()
    assert len(owners) == len(harness.cluster.servers)
    slots = {key_slot(f"{{{harness.prefix}:runs:{k}}}".encode()) for k in range(SHARDS)}
    assert len(slots) == SHARDS


async def test_a_batch_spread_over_the_nodes_keeps_each_appends_outcome(
    harness: RedisClusterHarness,
) -> None:
    backend = await harness.open()
    entry = encode_entry([{"k": "step", "c": 0, "name": "s", "value": 1}])
    await backend.append("taken", 0, entry)
    # Sixty runs hash to slots on every node: one pipeline per node, side by side.
    results = await asyncio.gather(
        *(backend.append(f"r{i}", 0, entry) for i in range(60)),
        backend.append("taken", 0, entry),
        return_exceptions=True,
    )
    assert results[:60] == [None] * 60
    assert isinstance(results[60], PositionTaken)
    assert [len(await backend.read_log(f"r{i}")) for i in range(60)] == [1] * 60


async def test_a_burst_that_finds_the_scripts_gone_loads_them_once(
    harness: RedisClusterHarness,
) -> None:
    backend = await harness.open()
    entry = encode_entry([{"k": "step", "c": 0, "name": "s", "value": 1}])
    raw = harness.raw()
    try:
        await raw.initialize()
        for node in raw.get_nodes():  # as after a restart
            await raw.execute_command("SCRIPT", "FLUSH", target_nodes=node)
            await raw.execute_command("CONFIG", "RESETSTAT", target_nodes=node)
        # Each append finds its script missing; one SCRIPT LOAD serves them all, where
        # one each would exhaust a node's connections (MaxConnectionsError).
        await asyncio.gather(*(backend.append(f"r{i}", 0, entry) for i in range(300)))
        loads = 0
        for node in raw.get_nodes():
            stats = await raw.execute_command("INFO", "commandstats", target_nodes=node)
            loads += stats.get("cmdstat_script|load", {}).get("calls", 0)
    finally:
        await raw.aclose()
    assert 0 < loads <= 2 * len(harness.cluster.servers)
    assert [len(await backend.read_log(f"r{i}")) for i in range(300)] == [1] * 300
