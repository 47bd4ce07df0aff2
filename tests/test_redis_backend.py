"""What only the Redis backend promises: namespaces, auth, outages, key layout, wake-ups."""

from __future__ import annotations

import asyncio
import logging
import signal
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from redis.crc import key_slot

from substantial._runs import store_run
from substantial.backends.base import RunInfo
from substantial.backends.redis import SHARDS, RedisBackend, shard_of
from substantial.errors import BackendError, BackendUnavailable, InvalidArgument, PositionTaken
from substantial.records import encode_entry
from tests.backend_redis import RedisHarness, start_server
from tests.redis_server import RedisServer


@pytest.fixture
async def store(redis_harness: RedisHarness) -> AsyncIterator[RedisHarness]:
    """Yield a fresh prefix on the session server; close its backends and drop its keys after."""
    yield redis_harness
    await redis_harness.aclose()


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str, workflow: str = "wf", status: str = "active") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, workflow, status, now, now)


async def listening(backend: RedisBackend) -> None:
    """Wait until the backend's wake-up subscription is in place."""
    await backend.due(time.time())
    await asyncio.wait_for(backend._subscribed.wait(), 5)


async def use_every_primitive(b: RedisBackend, run_id: str) -> None:
    await store_run(b, info(run_id), entry("start"), time.time())
    await b.append(run_id, 1, entry(1))
    await b.send_event(run_id, "e1", b"1")
    await b.post_event(run_id, "e2", b"2")
    await b.ack_events(run_id, ["e1"])
    await b.acquire_lease(run_id, "me", 30)


# -- namespaces and URLs ----------------------------------------------------------


async def test_prefixes_isolate_applications(redis_server: RedisServer) -> None:
    a = RedisBackend.from_url(f"{redis_server.url}?prefix=appa")
    b = RedisBackend.from_url(f"{redis_server.url}?prefix=appb")
    try:
        now = time.time()
        await a.append("same", 0, entry("a"))
        await a.post_event("same", "e", b"a")
        await a.schedule("same", now - 1)
        await a.acquire_lease("same", "alice", 30)
        await a.put_run(info("same"))
        assert await b.read_log("same") == []
        assert await b.read_inbox("same") == []
        assert await b.due(now) == []
        assert await b.next_due_at() is None
        assert await b.get_lease("same") is None
        assert await b.get_run("same") is None
        assert await b.list_runs() == []
        await b.append("same", 0, entry("b"))  # position 0 is free in b's namespace
        assert await b.acquire_lease("same", "bob", 30)
        assert len(await a.read_log("same")) == 1
        assert [r for r, _ in await a.due(now)] == ["same"]
    finally:
        await a.close()
        await b.close()


def test_invalid_prefix_is_rejected() -> None:
    for bad in ["", "a:b", "a{b", "a}b", "x" * 65, "spa ce"]:
        with pytest.raises(InvalidArgument, match="invalid Redis key prefix"):
            RedisBackend("redis://127.0.0.1:1/0", prefix=bad)


async def test_url_keeps_redis_options_and_reads_the_prefix() -> None:
    b = RedisBackend.from_url(
        "redis://someone:s3cret@127.0.0.1:6390/3?prefix=shop&socket_timeout=7&health_check_interval=2"
    )
    try:
        assert b.prefix == "shop"
        client = b._client
        assert isinstance(client, redis.asyncio.Redis)
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("127.0.0.1", 6390, 3)
        assert (kwargs["username"], kwargs["password"]) == ("someone", "s3cret")
        assert kwargs["socket_timeout"] == 7.0  # the URL wins over our default
        assert kwargs["socket_connect_timeout"] == 2.0
        assert "s3cret" not in b.describe() and "6390/3" in b.describe()
    finally:
        await b.close()
    tls = RedisBackend.from_url("rediss://127.0.0.1:6390/0")
    assert tls.prefix == "substantial"
    await tls.close()
    with pytest.raises(InvalidArgument, match="not a redis://"):
        RedisBackend.from_url("http://127.0.0.1:6390")
    with pytest.raises(InvalidArgument, match=r"invalid Redis URL 'redis://u:\*\*\*@"):
        RedisBackend.from_url("redis://u:pw@127.0.0.1:6390/0?socket_timeout=soon")


async def test_password_is_checked_for_real(tmp_path: Path) -> None:
    server = start_server(tmp_path, password="letmein")
    try:
        good = RedisBackend.from_url(f"{server.url}?prefix=auth")
        bad = RedisBackend.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0?prefix=auth")
        try:
            await good.append("r", 0, entry(1))
            assert len(await good.read_log("r")) == 1
            t0 = time.monotonic()
            with pytest.raises(BackendError, match="user and password") as err:
                await bad.read_log("r")
            assert not isinstance(err.value, BackendUnavailable)  # retrying will not help
            assert "wrong" not in str(err.value)
            assert time.monotonic() - t0 < 5
        finally:
            await good.close()
            await bad.close()
    finally:
        server.stop()


async def test_acl_user_limited_to_its_prefix(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    admin = redis.asyncio.Redis.from_url(server.url)
    # The documented minimal grant: this prefix's keys, its wake channel, these commands.
    await admin.execute_command(
        "ACL", "SETUSER", "shop", "on", ">pw", "~{shop:*", "resetchannels", "&{shop:wake}",
        "-@all", "+@read", "+@write", "+@scripting", "+@pubsub", "+@connection", "+time",
    )  # fmt: skip
    url = f"redis://shop:pw@127.0.0.1:{server.port}/0"
    mine = RedisBackend.from_url(f"{url}?prefix=shop")
    sender = RedisBackend.from_url(f"{url}?prefix=shop")
    theirs = RedisBackend.from_url(f"{url}?prefix=other")
    try:
        await use_every_primitive(mine, "r")
        assert await mine.list_runs() != []
        assert [r for r, _ in await mine.due(time.time())] == ["r"]
        await listening(mine)
        task = asyncio.create_task(mine.wait_for_work(10))
        await asyncio.sleep(0.05)
        await sender.schedule("r", time.time())
        assert await asyncio.wait_for(task, 5) is True
        with pytest.raises(BackendError, match="refused") as err:
            await theirs.append("r", 0, entry(1))
        assert not isinstance(err.value, BackendUnavailable)
    finally:
        for b in (mine, sender, theirs):
            await b.close()
        await admin.aclose()
        server.stop()


# -- outages ------------------------------------------------------------------------


async def test_outage_fails_fast_logs_once_and_loses_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="substantial.redis")
    server = start_server(tmp_path, appendfsync="always")
    backend = RedisBackend.from_url(f"{server.url}?prefix=o")
    try:
        for i in range(3):
            await backend.append("r", i, entry(i))
        await backend.schedule("r", time.time() - 1)
        await listening(backend)
        server.stop()
        for call in (
            backend.read_log("r"),
            backend.append("r", 3, entry(3)),
            backend.due(time.time()),
            backend.acquire_lease("r", "me", 30),
        ):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable, match="unavailable"):
                await call
            assert time.monotonic() - t0 < 5, "a call during an outage must not hang"
        await asyncio.sleep(0.3)  # the listener fails too, and must not log again
        down = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(down) == 1, [r.getMessage() for r in down]
        assert "unreachable" in down[0].getMessage() and str(server.port) in down[0].getMessage()

        server.start()
        assert len(await backend.read_log("r")) == 3  # AOF kept every acknowledged write
        await backend.append("r", 3, entry(3))
        assert [r for r, _ in await backend.due(time.time())] == ["r"]
        up = [r for r in caplog.records if "reachable again" in r.getMessage()]
        assert len(up) == 1
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        await backend.close()
        server.stop()


async def test_a_hung_server_is_unavailable_after_the_timeouts(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    backend = RedisBackend(f"{server.url}", prefix="h", socket_timeout=0.25, connect_timeout=0.25)
    assert server.proc is not None
    try:
        await backend.append("r", 0, entry(0))
        server.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
        try:
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await backend.read_log("r")
            # 4 tries x the timeouts, plus 0.7 s of backoff.
            assert time.monotonic() - t0 < 4
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert len(await backend.read_log("r")) == 1
    finally:
        await backend.close()
        server.stop()


async def test_wake_ups_resume_after_a_server_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    waiter = RedisBackend.from_url(f"{server.url}?prefix=w")
    sender = RedisBackend.from_url(f"{server.url}?prefix=w")
    try:
        await listening(waiter)
        server.restart()
        # The listener re-subscribes on its own and wakes waiters, since
        # signals sent while it was away are lost.
        assert await waiter.wait_for_work(10) is True
        await asyncio.wait_for(waiter._subscribed.wait(), 10)
        await waiter.due(time.time())
        task = asyncio.create_task(waiter.wait_for_work(10))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await sender.send_event("r", "e", b"1")
        assert await asyncio.wait_for(task, 5) is True
        assert time.monotonic() - t0 < 1
    finally:
        await waiter.close()
        await sender.close()
        server.stop()


# -- key layout -----------------------------------------------------------------------


async def test_every_key_of_a_run_is_in_one_slot_and_indexes_are_sharded(
    store: RedisHarness,
) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend)
    prefix = store.prefix
    run_ids = [f"run-{i}" for i in range(64)] + ["due:3", "x.y=z+1"]
    for run_id in run_ids:
        await use_every_primitive(backend, run_id)
    raw = store.raw()
    try:
        keys = [k.decode() async for k in raw.scan_iter(match=f"{{{prefix}:*")]
        by_run: dict[str, set[str]] = defaultdict(set)
        index: dict[str, list[str]] = defaultdict(list)
        recent: list[str] = []
        for key in keys:
            tag, _, kind = key[1:].partition("}")
            if kind.startswith(":recent") and tag.startswith(f"{prefix}:runs:"):
                recent.append(key)  # a runs shard's creation indexes, in the shard's slot
            elif kind:
                by_run[tag.split(":", 1)[1]].add(kind)
                assert key_slot(key.encode()) == key_slot(f"{{{tag}}}".encode())
            else:
                index[tag.split(":")[1]].append(key)
        assert set(by_run) == set(run_ids)
        assert all(
            kinds == {":log", ":append", ":inbox", ":events", ":lease", ":meta"}
            for kinds in by_run.values()
        )
        assert set(index) == {"due", "runs"}
        for kind in ("due", "runs"):
            assert len(index[kind]) > SHARDS // 2  # 66 runs spread over most shards
            assert [await raw.type(k) for k in index[kind]] == [b"zset"] * len(index[kind])
            # One hash slot per shard, so a cluster can spread them over its nodes.
            assert len({key_slot(k.encode()) for k in index[kind]}) == len(index[kind])
        for run_id in run_ids:
            due_key = f"{{{prefix}:due:{shard_of(run_id)}}}"
            assert await raw.zscore(due_key, run_id) is not None
        # Every run is active here: the creation index and the "active" one of each shard.
        expected = [f"{k}:recent{s}" for k in index["runs"] for s in ("", ":active")]
        assert sorted(recent) == sorted(expected)
        for key in index["runs"]:
            ids = set(await raw.zrange(key, 0, -1))
            for sub in (f"{key}:recent", f"{key}:recent:active"):
                assert key_slot(sub.encode()) == key_slot(key.encode())
                assert set(await raw.zrange(sub, 0, -1)) == ids
    finally:
        await raw.aclose()


async def test_a_store_written_before_creation_indexes_is_indexed_by_its_first_listing(
    store: RedisHarness,
) -> None:
    old = await store.open()
    for i in range(30):
        await old.put_run(RunInfo(f"r{i:02d}", "wf", "active", 1000.0 + i % 10, 1000.0))
    raw = store.raw()
    try:
        for key in [k async for k in raw.scan_iter(match=f"{{{store.prefix}:runs:*}}:recent*")]:
            await raw.delete(key)  # as an earlier release left the store: no creation index
        await raw.set(f"{{{store.prefix}:r05}}:meta", b"\x00{not json")
        # Indexed by a put_run cut short before its SET: indexed too, and listed never.
        await raw.zadd(f"{{{store.prefix}:runs:{shard_of('ghost')}}}", {"ghost": 0})
        await raw.zadd(f"{{{store.prefix}:runs:{shard_of('bad')}}}:recent", {b"\xff..": 5000})
        fresh = await store.open()
        expected = sorted(
            ((1000.0 + i % 10 if i != 5 else 0.0, f"r{i:02d}") for i in range(30)), reverse=True
        )
        listed = await fresh.list_recent(limit=100)
        assert [(r.created_at, r.run_id) for r in listed] == expected
        assert listed[-1].status == "corrupt"
        listing = fresh._listing  # type: ignore[attr-defined]
        sizes = [await raw.zcard(k) for k in (*listing.runs_keys, *listing.recent_keys)]
        assert sum(sizes[:SHARDS]) == 31 and sum(sizes[SHARDS:]) == 32  # and the stray member
        assert await (await store.open()).list_recent(limit=100) == listed
        active = [r.run_id for r in await fresh.list_recent(status="active", limit=100)]
        assert active == [r for _, r in expected if r != "r05"]
    finally:
        await raw.aclose()


WRITER = """
import asyncio, sys, time
from substantial.backends import from_url
from substantial.backends.base import RunInfo

async def main() -> None:
    backend = from_url(sys.argv[1])
    i = 0
    while True:
        batch = [RunInfo(f"k{i + j:06d}", "wf", "active", time.time(), 0.0) for j in range(20)]
        await asyncio.gather(*(backend.put_run(info) for info in batch))
        await asyncio.gather(*(backend.delete(info.run_id) for info in batch[::3]))
        i += 20
        if i == 200:
            print("ready", flush=True)

asyncio.run(main())
"""


async def test_a_writer_killed_mid_put_run_or_delete_leaves_both_listings_agreeing(
    store: RedisHarness,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, store.url, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
    await asyncio.sleep(0.05)  # mid-batch, most likely
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    backend = await store.open()
    by_id = [r.run_id for r in await backend.list_runs(limit=100_000)]
    newest = await backend.list_recent(limit=100_000)
    assert len(by_id) >= 100
    assert sorted(r.run_id for r in newest) == by_id  # the same runs, each once
    keys = [(r.created_at, r.run_id) for r in newest]
    assert keys == sorted(keys, reverse=True)
    listing = backend._listing  # type: ignore[attr-defined]
    raw = store.raw()
    try:
        sizes = [await raw.zcard(k) for k in (*listing.runs_keys, *listing.recent_keys)]
    finally:
        await raw.aclose()
    assert sum(sizes[:SHARDS]) == sum(sizes[SHARDS:])  # the sets changed together


async def test_finding_due_work_reads_only_the_due_index(store: RedisHarness) -> None:
    backend = await store.open()
    now = time.time()
    for i in range(300):
        await backend.schedule(f"later-{i}", now + 3600 + i)
        await backend.put_run(info(f"later-{i}"))
    await backend.schedule("ready", now - 1)
    raw = store.raw()
    try:
        await raw.config_resetstat()
        due = await backend.due(now)
        assert [r for r, _ in due] == ["ready"]
        assert due.next_at == pytest.approx(now + 3600)
        stats = await raw.info("commandstats")
    finally:
        await raw.aclose()
    used = {name.removeprefix("cmdstat_") for name in stats}
    assert not used & {"scan", "keys", "zscan", "sscan", "hscan", "sort"}, used
    # One script, reading each shard's due head and the entry after: O(SHARDS * log n).
    assert stats["cmdstat_evalsha"]["calls"] == 1
    assert stats["cmdstat_zrangebyscore"]["calls"] == SHARDS
    assert stats["cmdstat_zrange"]["calls"] == SHARDS


async def test_list_runs_merges_the_shards_in_id_order(store: RedisHarness) -> None:
    backend = await store.open()
    ids = [f"r{i:03d}" for i in range(150)]
    for run_id in reversed(ids):
        await backend.put_run(info(run_id, "odd" if int(run_id[1:]) % 2 else "even"))
    assert [r.run_id for r in await backend.list_runs(limit=1000)] == ids
    assert [r.run_id for r in await backend.list_runs(limit=5, after="r099")] == ids[100:105]
    odd = await backend.list_runs(workflow="odd", limit=60)
    assert [r.run_id for r in odd] == ids[1::2][:60]
    raw = store.raw()
    try:
        # An index entry whose metadata was never written (a crash in put_run) is skipped.
        await raw.zadd(f"{{{store.prefix}:runs:{shard_of('r050a')}}}", {"r050a": 0})
    finally:
        await raw.aclose()
    assert [r.run_id for r in await backend.list_runs(after="r049", limit=3)] == [
        "r050",
        "r051",
        "r052",
    ]


# -- atomic operations --------------------------------------------------------------


async def test_append_retried_after_a_lost_reply_succeeds(store: RedisHarness) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend)
    keys = [backend._key("r", "log"), backend._key("r", "append")]
    # The driver re-sends a call whose reply was lost: same position, same token.
    assert await backend._script("append", keys, [0, entry("mine"), "tok1"]) == 1
    assert await backend._script("append", keys, [0, entry("mine"), "tok1"]) == 1
    assert await backend._script("append", keys, [0, entry("other"), "tok2"]) == 0
    assert len(await backend.read_log("r")) == 1
    with pytest.raises(PositionTaken):
        await backend.append("r", 0, entry("again"))


async def test_leases_use_the_server_clock(store: RedisHarness) -> None:
    backend = await store.open()
    raw = store.raw()
    try:
        seconds, micros = await raw.time()
    finally:
        await raw.aclose()
    assert await backend.acquire_lease("r", "me", 30)
    lease = await backend.get_lease("r")
    assert lease is not None
    assert lease.expires_at == pytest.approx(seconds + micros / 1e6 + 30, abs=1)


# -- wake-ups ------------------------------------------------------------------------


async def test_event_wakes_a_waiter_within_milliseconds(store: RedisHarness) -> None:
    waiter = await store.open()
    sender = await store.open()
    assert isinstance(waiter, RedisBackend)
    await listening(waiter)
    latencies = []
    for i in range(20):
        await waiter.due(time.time())
        task = asyncio.create_task(waiter.wait_for_work(5))
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await sender.send_event(f"r{i}", "e", b"1")
        assert await task is True
        latencies.append(time.perf_counter() - t0)
    # Generous bounds for a noisy machine; typically about a millisecond.
    assert max(latencies) < 1.0
    assert statistics.median(latencies) < 0.1


async def test_a_signal_between_poll_and_wait_is_not_lost(store: RedisHarness) -> None:
    waiter = await store.open()
    sender = await store.open()
    assert isinstance(waiter, RedisBackend)
    await listening(waiter)
    await waiter.due(time.time())
    await sender.schedule("r", time.time())
    await asyncio.sleep(0.1)  # delivered while nobody waits
    t0 = time.perf_counter()
    assert await waiter.wait_for_work(5) is True
    assert time.perf_counter() - t0 < 0.05
    assert await waiter.wait_for_work(0.1) is False  # consumed once


async def test_a_timer_set_elsewhere_wakes_the_waiter_when_due(
    store: RedisHarness,
) -> None:
    waiter = await store.open()
    sender = await store.open()
    assert isinstance(waiter, RedisBackend)
    await listening(waiter)
    await waiter.due(time.time())
    t0 = time.time()
    await sender.schedule("later", t0 + 10)
    await sender.schedule("soon", t0 + 0.3)
    assert await waiter.wait_for_work(5) is True
    assert 0.25 < time.time() - t0 < 1.5
    assert [r for r, _ in await waiter.due(time.time())] == ["soon"]


# -- cancellation and shutdown -------------------------------------------------------


async def test_close_is_prompt_whatever_the_listener_is_doing(redis_server: RedisServer) -> None:
    for i in range(20):
        backend = RedisBackend.from_url(f"{redis_server.url}?prefix=c")
        await backend.due(time.time())
        await asyncio.sleep(i * 0.001)
        t0 = time.monotonic()
        await asyncio.wait_for(backend.close(), 5)
        assert time.monotonic() - t0 < 1


async def test_a_cancelled_call_is_never_swallowed(store: RedisHarness) -> None:
    backend = await store.open()
    await backend.append("r", 0, entry(0))

    async def busy() -> None:
        while True:
            await backend.read_log("r")

    for i in range(30):
        task = asyncio.create_task(busy())
        await asyncio.sleep(0.001 + i * 0.0003)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=5)
        assert done, "the task kept running after cancel()"
        assert task.cancelled()


async def test_unschedule_idle_leaves_a_run_with_an_unreadable_inbox_due(
    store: RedisHarness,
) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend) and backend.capabilities.unschedule_idle
    await backend.set_due("odd", time.time() - 1)
    raw = store.raw()
    try:
        # Not a stream: whether an event waits there is the reader's to report.
        await raw.set(f"{{{store.prefix}:odd}}:inbox", b"garbage")
    finally:
        await raw.aclose()
    assert await backend.unschedule_idle("odd") is False
    assert [r for r, _ in await backend.due(time.time())] == ["odd"]


async def test_an_append_sent_again_after_later_ones_finds_its_own_write(
    store: RedisHarness,
) -> None:
    # A pipeline sent again after its connection dropped: this call's append to 0 had
    # landed, and later appends of the run replaced the last-append mark, so the script
    # answers "taken". The backend knows the round trip was sent again, and reads.
    backend = await store.open()
    assert isinstance(backend, RedisBackend)
    mine, theirs = entry("mine"), entry("theirs")
    await backend.append("r", 0, mine)
    await backend.append("r", 1, theirs)
    trip, real = backend._pipe._trip, backend._script

    async def sent_again(name: str, keys: Any, args: Any) -> Any:
        reply = await real(name, keys, args)
        trip.resends += 1
        return reply

    backend._script = sent_again  # type: ignore[method-assign]
    await backend.append("r", 0, mine)  # its own write: no PositionTaken
    with pytest.raises(PositionTaken):
        await backend.append("r", 0, theirs)  # another's bytes: taken, sent again or not
    backend._script = real  # type: ignore[method-assign]
    with pytest.raises(PositionTaken):
        await backend.append("r", 0, mine)  # a new call, even with the same bytes, loses
    assert await backend.read_log("r") == [mine, theirs]
