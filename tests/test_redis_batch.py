"""Group commit on Redis: what one pipeline of many runs' commands promises.

The commands that the tasks of one process issue in one event-loop
iteration go to the server as one pipeline. Each keeps its own outcome: a
fenced-out append fails alone, and a connection that drops in the middle of
a pipeline loses nothing and writes nothing twice (an append is recognised
by its token when redis-py sends the pipeline again).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial.backends.base import RunInfo
from substantial.backends.redis import RedisBackend
from substantial.backends.redis._pipe import MAX_IN_FLIGHT
from substantial.errors import BackendError, BackendUnavailable, InvalidArgument, PositionTaken
from substantial.records import encode_entry
from tests.backend_redis import RedisHarness, start_server
from tests.redis_server import RedisServer


@pytest.fixture
async def store(redis_harness: RedisHarness) -> AsyncIterator[RedisHarness]:
    yield redis_harness
    await redis_harness.aclose()


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


async def connections_received(server: RedisServer) -> int:
    """Return how many connections the server has accepted so far."""
    raw = RedisHarness(server).raw()
    try:
        return int((await raw.info("stats"))["total_connections_received"])
    finally:
        await raw.aclose()


async def test_a_fenced_out_append_fails_alone_in_its_batch(store: RedisHarness) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend) and backend.capabilities.group_commit
    for i in range(40):
        await backend.append(f"r{i}", 0, entry("first"))
    await backend.append("taken", 0, entry("first"))
    await backend.append("taken", 1, entry("theirs"))  # another worker got there first
    raw = store.raw()
    try:
        await raw.set(f"{{{store.prefix}:typo}}:log", b"not a list")
    finally:
        await raw.aclose()
    before = await connections_received(store.server)

    results = await asyncio.gather(
        *(backend.append(f"r{i}", 1, entry(i)) for i in range(40)),
        backend.append("taken", 1, entry("mine")),
        backend.append("gap", 5, entry("too far")),
        backend.append("typo", 0, entry("wrong key type")),
        # Two appenders at one position in one batch: exactly one wins.
        backend.append("twice", 0, entry("a")),
        backend.append("twice", 0, entry("b")),
        return_exceptions=True,
    )

    assert results[:40] == [None] * 40
    assert isinstance(results[40], PositionTaken)
    assert isinstance(results[41], InvalidArgument) and "gap" in str(results[41])
    assert isinstance(results[42], BackendError) and "WRONGTYPE" in str(results[42])
    assert not isinstance(results[42], BackendUnavailable)
    assert sorted(type(r).__name__ for r in results[43:]) == ["NoneType", "PositionTaken"]
    for i in range(40):
        assert await backend.read_log(f"r{i}") == [entry("first"), entry(i)]
    assert await backend.read_log("taken") == [entry("first"), entry("theirs")]
    assert await backend.read_log("gap") == []
    winner = entry("a") if results[43] is None else entry("b")
    assert await backend.read_log("twice") == [winner]
    # One pipeline: the 45 appends shared the backend's connection (the count's own is 1).
    assert await connections_received(store.server) - before < 5


async def test_group_commit_off_sends_each_command_alone(store: RedisHarness) -> None:
    backend = RedisBackend.from_url(f"{store.url}&group_commit=no")
    try:
        assert backend._pipe.enabled is False
        await backend.append("warm", 0, entry(0))
        before = await connections_received(store.server)
        await asyncio.gather(*(backend.append(f"r{i}", 0, entry(i)) for i in range(20)))
        # One connection per concurrent command: nothing was shared.
        assert await connections_received(store.server) - before >= 10
        assert [len(await backend.read_log(f"r{i}")) for i in range(20)] == [1] * 20
    finally:
        await backend.close()


async def test_other_commands_share_the_pipeline_and_keep_their_outcomes(
    store: RedisHarness,
) -> None:
    backend = await store.open()
    now = time.time()
    await backend.append("r", 0, entry(0))
    await backend.put_run(RunInfo("r", "wf", "active", now, now))
    before = await connections_received(store.server)
    lease, log, stored, _, runs = await asyncio.gather(
        backend.lease("r", "me", 30),
        backend.read_log("r"),
        backend.set_due("r", now, event=None),
        backend.put_run(RunInfo("s", "wf", "active", now, now)),
        backend.list_runs(ids=["r", "s", "unknown"]),
    )
    assert lease is not None and lease.owner == "me"
    assert log == [entry(0)]
    assert stored is False
    assert {r.run_id for r in runs} <= {"r", "s"} and "r" in {r.run_id for r in runs}
    assert await connections_received(store.server) - before < 5
    assert [r for r, _ in await backend.due(time.time())] == ["r"]


# -- a connection lost in the middle of a pipeline --------------------------------------


class Cutter:
    """A TCP proxy in front of the server that can cut a connection half way through a chunk."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        #: Cut the next request chunk: the server gets its first half, then the connection closes.
        self.cut_request = False
        #: Cut the next reply chunk: the client gets its first half, then the connection closes.
        self.cut_reply = False
        #: Refuse every new connection (the server seems down).
        self.down = False
        #: Seconds each reply chunk is held back, as on a slower network.
        self.delay = 0.0
        #: Connections accepted so far.
        self.accepted = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        try:
            if self.down:
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flag: str) -> None:
                while data := await src.read(65536):
                    if flag == "cut_reply" and self.delay:
                        await asyncio.sleep(self.delay)
                    if getattr(self, flag) and len(data) > 1:
                        setattr(self, flag, False)
                        dst.write(data[: len(data) // 2])
                        await dst.drain()
                        return
                    dst.write(data)
                    await dst.drain()

            ups = asyncio.ensure_future(pump(reader, up_writer, "cut_request"))
            downs = asyncio.ensure_future(pump(up_reader, writer, "cut_reply"))
            try:
                await asyncio.wait({ups, downs}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ups.cancel()
                downs.cancel()
                up_writer.close()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def cutter(store: RedisHarness) -> AsyncIterator[Cutter]:
    c = Cutter(store.server.port)
    await c.start()
    yield c
    await c.close()


def through(store: RedisHarness, cutter: Cutter) -> RedisBackend:
    return RedisBackend(
        f"redis://127.0.0.1:{cutter.port}/0",
        prefix=store.prefix,
        socket_timeout=2,
        connect_timeout=1,
    )


@pytest.mark.parametrize("cut", ["cut_request", "cut_reply"])
async def test_a_connection_dropped_mid_pipeline_loses_and_repeats_nothing(
    store: RedisHarness, cutter: Cutter, cut: str
) -> None:
    backend = through(store, cutter)
    try:
        for i in range(30):
            await backend.append(f"r{i}", 0, entry("first"))
        setattr(cutter, cut, True)
        # redis-py sends the pipeline again on a new connection: the appends that
        # landed the first time are recognised by their tokens, the rest land now.
        await asyncio.gather(*(backend.append(f"r{i}", 1, entry(i)) for i in range(30)))
        assert getattr(cutter, cut) is False, "the proxy never cut the pipeline"
    finally:
        await backend.close()
    reader = await store.open()
    for i in range(30):
        assert await reader.read_log(f"r{i}") == [entry("first"), entry(i)]


async def test_a_pipeline_that_cannot_be_resent_fails_every_append_and_writes_halves_never(
    store: RedisHarness, cutter: Cutter
) -> None:
    backend = through(store, cutter)
    try:
        await backend.append("warm", 0, entry(0))
        cutter.cut_request = True
        cutter.down = True  # and no reconnection succeeds
        results = await asyncio.gather(
            *(backend.append(f"r{i}", 0, entry(i)) for i in range(30)), return_exceptions=True
        )
        assert cutter.cut_request is False, "the proxy never cut the pipeline"
        for result in results:
            assert isinstance(result, BackendUnavailable), result
            assert "unavailable" in str(result) and "can be retried" in str(result)
        assert len({id(r) for r in results}) == 30  # each caller its own error
        cutter.down = False
        reader = await store.open()
        landed = 0
        for i in range(30):
            log = await reader.read_log(f"r{i}")
            # A whole entry or none: each append is one script on the server.
            assert log in ([], [entry(i)])
            landed += len(log)
            # The caller's retry either lands now or finds its own entry in place.
            try:
                await backend.append(f"r{i}", 0, entry(i))
            except PositionTaken:
                assert log == [entry(i)]
            assert await reader.read_log(f"r{i}") == [entry(i)]
        assert landed < 30  # the cut kept the end of the pipeline from the server
    finally:
        await backend.close()


async def test_a_lost_script_is_loaded_again_for_a_batch(store: RedisHarness) -> None:
    backend = await store.open()
    await backend.append("warm", 0, entry(0))
    raw = store.raw()
    try:
        await raw.script_flush()
    finally:
        await raw.aclose()
    await asyncio.gather(*(backend.append(f"r{i}", 0, entry(i)) for i in range(10)))
    assert [await backend.read_log(f"r{i}") for i in range(10)] == [[entry(i)] for i in range(10)]


async def test_a_cancelled_caller_gets_no_write(store: RedisHarness) -> None:
    backend = await store.open()
    assert isinstance(backend, RedisBackend)
    await backend.append("warm", 0, entry(0))

    async def one(i: int) -> None:
        await backend.append(f"r{i}", 0, entry(i))

    tasks = [asyncio.create_task(one(i)) for i in range(10)]
    await asyncio.sleep(0)  # every append is queued; the batch has not left yet
    tasks[3].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await backend._pipe.drain()
    assert tasks[3].cancelled()
    assert await backend.read_log("r3") == []
    assert [len(await backend.read_log(f"r{i}")) for i in range(10) if i != 3] == [1] * 9


async def test_the_url_reads_group_commit() -> None:
    on = RedisBackend.from_url("redis://127.0.0.1:6390/0?prefix=p")
    off = RedisBackend.from_url("redis://127.0.0.1:6390/0?prefix=p&group_commit=no")
    assert on._pipe.enabled and not off._pipe.enabled
    await on.close()
    await off.close()


async def test_a_burst_on_a_slow_network_takes_a_bounded_number_of_connections(
    store: RedisHarness, cutter: Cutter
) -> None:
    backend = through(store, cutter)
    try:
        await backend.append("warm", 0, entry(0))
        cutter.delay = 0.02
        before = cutter.accepted
        # A few appends per loop iteration, far sooner than a round trip: a batch waits
        # for a round trip to end rather than opening a connection of its own.
        tasks = []
        for i in range(200):
            tasks.append(asyncio.create_task(backend.append(f"r{i}", 0, entry(i))))
            if i % 2:
                await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        assert cutter.accepted - before <= MAX_IN_FLIGHT
    finally:
        await backend.close()
    reader = await store.open()
    assert [await reader.read_log(f"r{i}") for i in range(200)] == [[entry(i)] for i in range(200)]


def test_a_backend_outlives_a_loop_that_ended_with_commands_queued(
    redis_server: RedisServer,
) -> None:
    backend = RedisBackend.from_url(f"{redis_server.url}?prefix=loops")

    async def first(k: int) -> None:
        await backend.append(f"warm{k}", 0, entry(0))
        left = [asyncio.create_task(backend.append(f"r{k}-{i}", 0, entry(i))) for i in range(8)]
        await asyncio.sleep(0)  # queued; the loop ends before their batch comes back
        assert not any(task.done() for task in left)

    async def second() -> None:
        try:
            # A batch or a count of round trips left by the old loop must not hold this one.
            await asyncio.wait_for(backend.append("after", 0, entry(1)), 5)
            await asyncio.wait_for(
                asyncio.gather(*(backend.append(f"s{i}", 0, entry(i)) for i in range(8))), 5
            )
            assert await backend.read_log("after") == [entry(1)]
        finally:
            await backend.close()

    for k in range(MAX_IN_FLIGHT):  # each may leave a round trip that never came back
        asyncio.run(first(k))
    asyncio.run(second())


async def test_each_round_trip_keeps_its_timeout_and_a_timed_out_one_leaves_no_reply_behind(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path)
    backend = RedisBackend(server.url, prefix="h", socket_timeout=0.2, retries=0)
    assert server.proc is not None
    try:
        await backend.append("r", 0, entry(0))
        for round_ in range(2):  # a second hang times out too: the timeout was put back
            server.proc.send_signal(signal.SIGSTOP)  # accepts connections, never answers
            try:
                t0 = time.monotonic()
                calls = backend.read_log("r"), backend.lease("r")
                results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
                assert all(isinstance(r, BackendUnavailable) for r in results), results
                assert time.monotonic() - t0 < 3
            finally:
                server.proc.send_signal(signal.SIGCONT)
            # The replies the server sends late are never read as later commands' replies.
            await backend.append("r", round_ + 1, entry(round_ + 1))
            assert await backend.read_log("r") == [entry(i) for i in range(round_ + 2)]
            assert await backend.lease("r") is None
    finally:
        await backend.close()
        server.stop()


async def test_a_caller_cancelled_mid_exchange_leaves_no_reply_behind(tmp_path: Path) -> None:
    server = start_server(tmp_path)
    backend = RedisBackend(server.url, prefix="c", socket_timeout=5, retries=0)
    assert server.proc is not None
    try:
        await backend.append("r", 0, entry(0))
        for round_ in range(2):
            server.proc.send_signal(signal.SIGSTOP)  # the command goes out, no reply comes
            try:
                reading = asyncio.ensure_future(backend.read_log("r"))
                await asyncio.sleep(0.2)
                reading.cancel()  # a caller's own timeout, or a shutdown
                with contextlib.suppress(asyncio.CancelledError):
                    await reading
            finally:
                server.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.3)  # the late reply arrives
            # No connection the pool would hand out holds it: the next user of such a
            # connection would read it as the reply to its own command.
            pool = backend._client.connection_pool
            for conn in pool._available_connections:  # type: ignore[attr-defined]
                assert not (conn.is_connected and await conn.can_read())
            assert await backend.lease("r") is None
            await backend.append("r", round_ + 1, entry(round_ + 1))
            assert await backend.read_log("r") == [entry(i) for i in range(round_ + 2)]
    finally:
        await backend.close()
        server.stop()


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    from redis.asyncio.connection import Connection

    from substantial.backends.redis._trip import _pack, hiredis_pack

    assert hiredis_pack is not None, "the redis extra installs hiredis"
    conn = Connection()
    commands = [
        ("EVALSHA", "a" * 40, 2, "{p:r}:log", "{p:r}:append", 3, entry("é"), "f" * 16),
        ("ZADD", "{p:due:3}", repr(1764662400.123456), "r-1"),
        ("SET", "{p:r}:meta", b"\x00\xff" * 10_000),  # past redis-py's chunking size
        ("LRANGE", "{p:r}:log", 0, -1),
    ]
    assert b"".join(_pack(conn, commands)) == b"".join(conn.pack_commands(commands))


async def test_a_backend_on_the_callers_client_gives_its_connections_back_on_close(
    store: RedisHarness,
) -> None:
    import redis.asyncio

    pool = redis.asyncio.BlockingConnectionPool.from_url(
        store.server.url, max_connections=MAX_IN_FLIGHT, timeout=0.5
    )
    client = redis.asyncio.Redis.from_pool(pool)
    try:
        backend = RedisBackend(client, prefix=store.prefix)
        # A burst keeps every round trip in flight: the connections stay with the
        # backend between round trips, and go back to the caller's pool on close.
        await asyncio.gather(*(backend.append(f"r{i}", 0, entry(i)) for i in range(100)))
        # Closed with round trips in flight: those come back to the pool when they land.
        flying = [asyncio.create_task(backend.append(f"r{i}", 1, entry(i))) for i in range(100)]
        for _ in range(3):
            await asyncio.sleep(0)
        await backend.close()
        await asyncio.gather(*flying)
        taken = [await pool.get_connection() for _ in range(MAX_IN_FLIGHT)]
        for conn in taken:
            await pool.release(conn)
        assert await client.ping()
    finally:
        await client.aclose()
