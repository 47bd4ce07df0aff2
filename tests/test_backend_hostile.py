"""Damaged records and hostile input, on every backend: nothing beside the log stops a worker.

A lease or a due entry that cannot be read is replaced or dropped (with one
warning per run), unreadable metadata lists as "corrupt" instead of failing
the listing, and URLs with secrets are never repeated in clear.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import replace
from typing import Any

import pytest
from click.testing import CliRunner

from substantial._runs import take_lease
from substantial.backends import from_url, redact_url
from substantial.backends.base import PROTOCOL_VERSION, Backend, Lease, RunInfo, validate_id
from substantial.backends.redis import RedisBackend, shard_of
from substantial.backends.s3 import S3Backend
from substantial.cli import main
from substantial.errors import CorruptRecord, InvalidArgument, ProtocolMismatch
from tests.backend_redis import RedisHarness
from tests.harness import Harness

FORMS = ["garbage", "types"]


async def damage(harness: Harness, method: str, *args: Any) -> None:
    """Write damage through the harness; only a Postgres harness still lacking it may xfail."""
    try:
        await getattr(harness, method)(*args)
    except NotImplementedError:
        if harness.name == "postgres":
            pytest.xfail(f"the postgres harness does not implement {method} yet")
        raise


def warnings_about(caplog: pytest.LogCaptureFixture, what: str, name: str) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "substantial.backend"
        and r.levelno == logging.WARNING
        and f"unreadable {what} of run {name!r}" in r.getMessage()
    ]


def info(run_id: str, workflow: str = "wf") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, workflow, "active", now, now)


async def opened(harness: Harness) -> Backend:
    backend = await harness.open()
    # Creates the store (tables, directories) before the harness damages it.
    await backend.put_run(info("first"))
    return backend


# -- leases ----------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_acquire_takes_over_an_unreadable_lease(
    harness: Harness, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await opened(harness)
    await damage(harness, "corrupt_lease", "r", form)
    caplog.set_level(logging.WARNING, logger="substantial.backend")
    before = time.time()
    assert await backend.acquire_lease("r", "me", 30) is True
    lease = await backend.get_lease("r")
    assert lease is not None and lease.owner == "me"
    assert lease.expires_at > before + 20
    # Replaced by a real lease, which is respected like any other.
    assert await backend.acquire_lease("r", "other", 30) is False
    assert len(warnings_about(caplog, "lease", "r")) == 1


@pytest.mark.parametrize("form", FORMS)
async def test_an_unreadable_lease_reads_as_expired_and_release_removes_it(
    harness: Harness, form: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await opened(harness)
    await damage(harness, "corrupt_lease", "r", form)
    caplog.set_level(logging.WARNING, logger="substantial.backend")
    assert await backend.get_lease("r") == Lease("r", "?", 0.0)
    assert await backend.get_lease("r") == Lease("r", "?", 0.0)
    assert len(warnings_about(caplog, "lease", "r")) == 1  # once per run, not per read
    # The worker's path (take_lease): a take that fails looks at the lease; here it succeeds.
    taken = await take_lease(backend, "r", "me", 30)
    assert taken is not None and taken.owner == "me"
    await damage(harness, "corrupt_lease", "r", form)
    await backend.release_lease("r", "someone-else")
    assert await backend.get_lease("r") is None


# -- the due index ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dotdot", "empty", "bad-time"])
async def test_a_bad_due_entry_is_skipped_dropped_and_reported_once(
    harness: Harness, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    backend = await opened(harness)
    at = time.time() - 5
    await backend.schedule("good", at)
    await damage(harness, "add_bad_due", kind, at - 1)
    caplog.set_level(logging.WARNING, logger="substantial.backend")

    assert [r for r, _ in await backend.due(time.time())] == ["good"]
    assert await backend.next_due_at() == pytest.approx(at, abs=0.01)

    # With the good run gone, the bad entry is the head of the index: still never raised,
    # never handed out. A valid run id with a bad time may come back due at a real time.
    await backend.unschedule("good")
    for _ in range(2):
        for run_id, due_at in await backend.due(time.time()):
            validate_id("run id", run_id)
            assert run_id == "hostile-time" and math.isfinite(due_at)
        nxt = await backend.next_due_at()
        assert nxt is None or math.isfinite(nxt)
    messages = [
        r.getMessage()
        for r in caplog.records
        if r.name == "substantial.backend" and "unreadable due entry" in r.getMessage()
    ]
    assert len(messages) == 1


# -- run metadata ----------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
async def test_unreadable_metadata_lists_as_corrupt_and_the_rest_still_lists(
    harness: Harness, form: str
) -> None:
    backend = await opened(harness)
    for run_id in ("a", "b", "c"):
        await backend.put_run(info(run_id))
    await damage(harness, "corrupt_meta", "b", form)

    runs = await backend.list_runs()
    assert [(i.run_id, i.status) for i in runs] == [
        ("a", "active"),
        ("b", "corrupt"),
        ("c", "active"),
        ("first", "active"),
    ]
    assert runs[1].error is not None and runs[1].error["type"] == "CorruptRecord"
    assert [i.run_id for i in await backend.list_runs(status="active")] == ["a", "c", "first"]
    assert [i.run_id for i in await backend.list_runs(status="corrupt")] == ["b"]
    assert [i.run_id for i in await backend.list_runs(status="completed")] == []
    assert [i.run_id for i in await backend.list_runs(workflow="wf")] == ["a", "c", "first"]
    assert [i.run_id for i in await backend.list_runs(limit=2)] == ["a", "b"]
    assert [i.run_id for i in await backend.list_runs(after="a", limit=1)] == ["b"]
    with pytest.raises(CorruptRecord):
        await backend.get_run("b")
    assert (await backend.get_run("c")) is not None


async def test_metadata_of_a_newer_protocol_lists_as_unreadable_not_failing_the_listing(
    harness: Harness,
) -> None:
    backend = await opened(harness)
    for run_id in ("a", "b"):
        await backend.put_run(info(run_id))
    await backend.put_run(replace(info("n"), protocol=PROTOCOL_VERSION + 1))

    runs = await backend.list_runs()
    assert [(i.run_id, i.status) for i in runs] == [
        ("a", "active"),
        ("b", "active"),
        ("first", "active"),
        ("n", "corrupt"),
    ]
    error = runs[3].error
    assert error is not None and error["type"] == "ProtocolMismatch"
    assert f"storage protocol {PROTOCOL_VERSION + 1}" in error["message"]
    assert "upgrade substantial" in error["message"]
    assert [i.run_id for i in await backend.list_runs(status="corrupt")] == ["n"]
    with pytest.raises(ProtocolMismatch, match="upgrade substantial"):
        await backend.get_run("n")


# -- secrets in URLs -------------------------------------------------------------

SECRET = "hunter2secret"
MALFORMED = [
    f"redis+tls://user:{SECRET}@host:6379/0",  # unknown scheme
    f"redis://user:{SECRET}/x@host/0",  # an unencoded '/' makes the password a port
    f"redis://:{SECRET}@host:6379/0?prefix=no/slash",  # bad query parameter
    f"s3://AKIAEXAMPLE:{SECRET}@/prefix",  # no bucket
    f"s3://AKIAEXAMPLE:{SECRET}@bucket/p?bogus=1",  # unknown parameter
    f"s3://bucket/p?aws_secret_access_key={SECRET}",  # a secret in the query
    f"s3://bucket/p?min_poll=fast&Token={SECRET}",  # a bad number beside a token
    f"file:///tmp/store?durability=always&password={SECRET}",  # bad durability
    f"sqlite:///tmp/s.db?durability=always&api_key={SECRET}",
    f"file://user:{SECRET}@/tmp/store",  # a password would become part of the path
    f"unknown://user:{SECRET}@host/?sig=1",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_malformed_url_never_shows_its_secret(url: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        from_url(url)
    assert SECRET not in str(err.value)
    assert "***" in str(err.value) or "no/slash" in str(err.value)
    result = CliRunner().invoke(main, ["runs", "list", "--backend", url])
    assert result.exit_code != 0
    assert SECRET not in result.output


def test_redact_url_masks_passwords_and_secret_parameters_only() -> None:
    assert redact_url("redis://u:p%40ss@h:1/0?prefix=a&PASSWORD=x&AWS_Secret_Access_Key=y") == (
        "redis://u:***@h:1/0?prefix=a&PASSWORD=***&AWS_Secret_Access_Key=***"
    )
    assert redact_url("redis://h:6379/0?prefix=app") == "redis://h:6379/0?prefix=app"
    assert redact_url("s3://bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("user:pw@host") == "user:***@host"


async def test_describe_never_shows_a_secret() -> None:
    s3 = S3Backend("bucket", "p", endpoint_url=f"http://admin:{SECRET}@127.0.0.1:1")
    redis = RedisBackend.from_url(f"redis://user:{SECRET}@127.0.0.1:1/0")
    try:
        for backend in (s3, redis):
            assert SECRET not in backend.describe()
    finally:
        await s3.close()
        await redis.close()


# -- Redis only --------------------------------------------------------------------


async def test_redis_event_after_a_script_flush_wakes_the_worker_once_it_is_stored(
    redis_harness: RedisHarness,
) -> None:
    """The wake-up must not outrun the event: a worker that reads the inbox on it finds it.

    Before the fix the pipelined EVALSHA failed with NOSCRIPT while the ZADD and
    PUBLISH after it ran: the worker woke to an empty inbox, and the retry's ZADD
    repeated the same score, so nothing told it to look again.
    """
    h = redis_harness
    try:
        worker = await h.open()
        sender = await h.open()
        assert isinstance(worker, RedisBackend)
        await worker.due(time.time())
        await asyncio.wait_for(worker._subscribed.wait(), 5)
        await sender.send_event("r", "warm", b"0")  # scripts loaded and cached by SHA
        await worker.ack_events("r", ["warm"])
        await worker.unschedule("r")
        await worker.due(time.time())
        raw = h.raw()
        try:
            await raw.script_flush()
        finally:
            await raw.aclose()

        waiting = asyncio.create_task(worker.wait_for_work(5))
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        send = asyncio.create_task(sender.send_event("r", "e1", b"1"))
        assert await waiting is True
        woke_after = time.perf_counter() - t0
        inbox = [e.event_id for e in await worker.read_inbox("r")]
        await send
        assert inbox == ["e1"]
        assert woke_after < 1.0
        due = dict(await worker.due(time.time()))
        assert "r" in due and abs(due["r"] - time.time()) < 5
        # A stand-alone script call after the flush reloads it: leases still work.
        await raw_script_flush(h)
        assert await worker.acquire_lease("r", "me", 30) is True
    finally:
        await h.aclose()


async def raw_script_flush(h: RedisHarness) -> None:
    raw = h.raw()
    try:
        await raw.script_flush()
    finally:
        await raw.aclose()


async def test_redis_lease_expiry_ignores_a_client_clock_an_hour_ahead(
    redis_harness: RedisHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = redis_harness
    try:
        honest = await h.open()
        skewed = await h.open()
        assert await honest.acquire_lease("r", "honest", 30) is True
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)
        # From this process's clock the honest lease ended 59 minutes ago: still held.
        assert await skewed.acquire_lease("r", "skewed", 30) is False
        taken = await take_lease(skewed, "r", "skewed", 30)
        assert taken is not None and taken.owner == "honest"
        lease = await skewed.get_lease("r")
        assert lease is not None and lease.owner == "honest"
        monkeypatch.undo()
        assert lease.expires_at == pytest.approx(time.time() + 30, abs=5)
    finally:
        await h.aclose()


async def test_redis_keys_of_the_wrong_type_do_not_break_leases_or_listing(
    redis_harness: RedisHarness,
) -> None:
    h = redis_harness
    try:
        backend = await h.open()
        await backend.put_run(info("a"))
        await backend.put_run(info("b"))
        raw = h.raw()
        try:
            await raw.delete(f"{{{h.prefix}:b}}:meta")
            await raw.hset(f"{{{h.prefix}:b}}:meta", "x", "y")
            await raw.zadd(f"{{{h.prefix}:due:{shard_of('a b')}}}", {b"\xff\xfe": 1.0})
        finally:
            await raw.aclose()
        assert [(i.run_id, i.status) for i in await backend.list_runs()] == [
            ("a", "active"),
            ("b", "corrupt"),
        ]
        with pytest.raises(CorruptRecord):
            await backend.get_run("b")
        assert await backend.due(time.time()) == []
        assert await backend.next_due_at() is None
    finally:
        await h.aclose()
