"""The Redis backend's one-script writes on a single server: a new run, and a run's metadata."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from substantial.backends.redis import RedisBackend
from substantial.records import decode_entry
from tests.backend_redis import RedisHarness
from tests.test_redis_backend import entry, info


@pytest.fixture
async def store(redis_harness: RedisHarness) -> AsyncIterator[RedisHarness]:
    """Yield a fresh prefix on the session server; close its backends and drop its keys after."""
    yield redis_harness
    await redis_harness.aclose()


async def write_calls(store: RedisHarness, backend: RedisBackend, write: object) -> dict[str, int]:
    """Run ``write`` (an awaitable) and return the server's calls per command meanwhile."""
    raw = store.raw()
    try:
        await raw.config_resetstat()
        await write  # type: ignore[misc]
        stats = await raw.info("commandstats")
    finally:
        await raw.aclose()
    calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
    del calls["config|resetstat"]
    return calls


async def test_a_new_run_is_one_script_and_a_taken_id_writes_nothing(store: RedisHarness) -> None:
    backend = await store.open()
    waiter = await store.open()
    assert isinstance(backend, RedisBackend) and isinstance(waiter, RedisBackend)
    await waiter.due(time.time())
    await asyncio.wait_for(waiter._subscribed.wait(), 5)
    now = time.time()
    # Loads the script: a server that lost it answers NOSCRIPT once.
    assert await backend.start_run(info("later"), entry("x"), now + 3600) is True
    calls = await write_calls(store, backend, backend.start_run(info("r"), entry("first"), now))
    # One command, whose calls inside write the entry and its token, the metadata, the
    # runs and creation indexes (ZREM from the 6 other status sets), the due entry, and
    # publish the wake-up: no other command was sent.
    inside = {"llen": 1, "rpush": 1, "set": 2, "zadd": 4, "zrem": 6, "publish": 1}
    assert calls == {"evalsha": 1, **inside}
    assert await waiter.wait_for_work(5) is True
    assert [r for r, _ in await backend.due(now)] == ["r"]
    assert len(await backend.read_log("r")) == 1
    assert [r.run_id for r in await backend.list_recent(status="active")] == ["r", "later"]
    assert [r.run_id for r in await backend.list_runs()] == ["later", "r"]

    other = info("r", "other", "completed")
    assert await backend.start_run(other, entry("second"), now + 100) is False
    (stored,) = await backend.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == "first"
    got = await backend.get_run("r")
    assert got is not None and got.workflow == "wf" and got.status == "active"
    assert await backend.list_recent(status="completed") == []
    assert [(r, at) for r, at in await backend.due(now)] == [("r", now)]  # unchanged


async def test_a_new_run_retried_after_a_lost_reply_is_created_once(store: RedisHarness) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend)
    keys = [backend._key("r", k) for k in ("log", "append", "meta")]
    keys += [backend._due_keys[0], *backend._index_keys(0)]
    args = [entry("mine"), "tok1", info("r").to_bytes(), "r", 1.0, 3, repr(time.time())]
    channel = backend._channel
    # The driver re-sends a call whose reply was lost: the same token finds its own write.
    assert await backend._script("start_run", keys, [*args, channel]) == 1
    assert await backend._script("start_run", keys, [*args, channel]) == 1
    args[1] = "tok2"
    assert await backend._script("start_run", keys, [*args, channel]) == 0
    assert len(await backend.read_log("r")) == 1


async def test_metadata_and_its_indexes_are_one_script(store: RedisHarness) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend)
    await backend.put_run(info("r"))  # loads the script
    calls = await write_calls(store, backend, backend.put_run(info("r", status="completed")))
    assert calls == {"evalsha": 1, "zadd": 3, "zrem": 6, "set": 1}
    got = await backend.get_run("r")
    assert got is not None and got.status == "completed"
    assert [r.run_id for r in await backend.list_recent(status="completed")] == ["r"]
    assert await backend.list_recent(status="active") == []
