"""S3-specific behaviour on a real server: configuration, conditional-write corner cases,
outages, adaptive polling, and the request counts docs/PROTOCOL.md promises."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import substantial.backends.s3._objects as s3objects
from substantial.backends import from_url
from substantial.backends.base import RunInfo
from substantial.backends.s3 import S3Backend
from substantial.backends.s3._objects import ObjectStore
from substantial.errors import BackendError, BackendUnavailable, InvalidArgument, PositionTaken
from substantial.records import decode_entry, encode_entry
from tests.backend_s3 import S3Harness
from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parent.parent


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str) -> RunInfo:
    now = time.time()
    return RunInfo(run_id, "wf", "active", now, now)


@pytest.fixture
async def h(s3_server: S3Server) -> AsyncIterator[S3Harness]:
    harness = S3Harness(s3_server)
    yield harness
    await harness.aclose()


def open_s3(h: S3Harness, **query: Any) -> S3Backend:
    """Open a client of the harness's prefix with other URL parameters (closed by the harness)."""
    backend = from_url(h.server.url(h.prefix, **query))
    assert isinstance(backend, S3Backend)
    h._opened.append(backend)
    return backend


def raw_keys(h: S3Harness) -> list[str]:
    client = h.server.client()
    try:
        resp = client.list_objects_v2(Bucket=h.server.bucket, Prefix=h.prefix + "/")
        return [o["Key"][len(h.prefix) + 1 :] for o in resp.get("Contents", [])]
    finally:
        client.close()


class Proxy:
    """A TCP proxy in front of the server that can lose responses or stop answering."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        #: Final replies to lose (interim "100 Continue" ones pass).
        self.drop_responses = 0
        #: "100 Continue" replies to lose: the client gives up before sending its body.
        self.drop_continues = 0
        self.blackhole = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.blackhole:
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)

            async def requests() -> None:
                while data := await reader.read(65536):
                    up_writer.write(data)
                    await up_writer.drain()

            async def responses() -> None:
                while data := await up_reader.read(65536):
                    interim = data == b"HTTP/1.1 100 Continue\r\n\r\n"
                    if interim and self.drop_continues:
                        self.drop_continues -= 1
                        return
                    if not interim and self.drop_responses:
                        # The server has done the work; the client never hears of it.
                        self.drop_responses -= 1
                        return
                    writer.write(data)
                    await writer.drain()

            pump = asyncio.ensure_future(requests())
            try:
                await responses()
            finally:
                pump.cancel()
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
        await self._server.wait_closed()


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[Proxy]:
    p = Proxy(s3_server.port)
    await p.start()
    yield p
    await p.close()


# -- configuration ------------------------------------------------------------------


async def test_url_carries_everything() -> None:
    b = from_url(
        "s3://AKID:se%2Fcret@my-bucket/a/b/?endpoint=http://127.0.0.1:9&path_style=1"
        "&region=eu-west-1&profile=p&min_poll=0.5&max_poll=9&read_timeout=3"
    )
    assert isinstance(b, S3Backend)
    assert (b.bucket, b.key_prefix, b.endpoint_url) == ("my-bucket", "a/b/", "http://127.0.0.1:9")
    assert (b.min_poll, b.max_poll) == (0.5, 9.0)
    assert b._objects.credentials == ("AKID", "se/cret", None)
    assert b._objects.profile == "p" and b._objects.region == "eu-west-1" and b._objects.path_style
    assert b.describe() == "s3://my-bucket/a/b/ at http://127.0.0.1:9"
    assert S3Backend("bkt").key_prefix == ""
    await b.close()


@pytest.mark.parametrize(
    "url",
    [
        "s3:///prefix",
        "s3://bkt/p?endpoint=x&colour=red",
        "s3://bkt/p?path_style=maybe",
        "s3://bkt/p?min_poll=2&max_poll=1",
        "s3://bkt/p?min_poll=fast",
        "s3://keyonly@bkt/p",
    ],
)
def test_bad_urls_are_rejected(url: str) -> None:
    with pytest.raises(InvalidArgument):
        from_url(url)


async def test_standard_aws_environment_configures_the_client(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    prefix = uuid.uuid4().hex
    # Nothing but a bucket and a prefix: path-style follows from the custom endpoint.
    b = S3Backend(s3_server.bucket, prefix)
    try:
        await b.append("r", 0, entry(1))
        assert len(await b.read_log("r")) == 1
    finally:
        await b.close()

    # A profile from the shared files, with keyword overrides for the endpoint.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    (tmp_path / "credentials").write_text(
        f"[ci]\naws_access_key_id = {s3_server.access_key}\n"
        f"aws_secret_access_key = {s3_server.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    b = S3Backend(s3_server.bucket, prefix, profile="ci", endpoint_url=s3_server.endpoint)
    try:
        assert len(await b.read_log("r")) == 1
    finally:
        await b.close()

    # Keyword credentials beat wrong ones in the environment.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    b = S3Backend(
        s3_server.bucket,
        prefix,
        endpoint_url=s3_server.endpoint,
        access_key_id=s3_server.access_key,
        secret_access_key=s3_server.secret_key,
    )
    try:
        assert len(await b.read_log("r")) == 1
    finally:
        await b.close()


async def test_wrong_credentials_and_missing_bucket_are_clear_errors(h: S3Harness) -> None:
    bad = from_url(h.url.replace(h.server.secret_key, "not-the-secret"))
    h._opened.append(bad)
    with pytest.raises(BackendError, match=r"denied.*credentials") as err:
        await bad.get_run("r")
    assert not isinstance(err.value, BackendUnavailable)
    missing = from_url(h.url.replace(f"@{h.server.bucket}/", "@no-such-bucket-here/"))
    h._opened.append(missing)
    with pytest.raises(BackendError, match="'no-such-bucket-here' does not exist"):
        await missing.due(time.time())


async def test_conditional_writes_are_checked_once_per_server(
    h: S3Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3objects, "_VERIFIED", set())
    b = open_s3(h)
    await b.append("r", 0, entry(0))
    # The probe: create, create again (refused), replace with a wrong ETag (refused), delete.
    assert b.requests == {"PutObject": 4, "DeleteObject": 1}
    assert not [k for k in raw_keys(h) if ".probe" in k]
    other = open_s3(h)
    await other.append("r", 1, entry(1))
    # No probe; one HEAD: the gap check of a position this client has not seen the log reach.
    assert other.requests == {"HeadObject": 1, "PutObject": 1}
    await other.append("r", 2, entry(2))
    assert other.requests == {"HeadObject": 1, "PutObject": 2}


async def test_a_server_that_ignores_conditions_is_refused(
    h: S3Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3objects, "_VERIFIED", set())
    real_call = ObjectStore.call

    async def overwriting_server(self: ObjectStore, op: str, key: str, fn: Any) -> Any:
        # What a server that ignores If-None-Match answers: success, having overwritten.
        try:
            return await real_call(self, op, key, fn)
        except s3objects.Rejected:
            return None

    monkeypatch.setattr(ObjectStore, "call", overwriting_server)
    b = open_s3(h)
    with pytest.raises(BackendError, match="ignores If-None-Match"):
        await b.append("r", 0, entry(0))
    assert not s3objects._VERIFIED


async def test_a_closed_backend_refuses_work(h: S3Harness) -> None:
    b = await h.open()
    await b.close()
    with pytest.raises(BackendError, match="closed"):
        await b.read_log("r")


# -- conditional writes ---------------------------------------------------------------


async def test_the_server_gives_equal_content_equal_etags(h: S3Harness) -> None:
    # The premise of the write ids: without them, A->B->A would restore the old ETag.
    client = h.server.client()
    try:
        e1 = client.put_object(Bucket=h.server.bucket, Key=f"{h.prefix}/x1", Body=b"A")["ETag"]
        e2 = client.put_object(Bucket=h.server.bucket, Key=f"{h.prefix}/x2", Body=b"A")["ETag"]
    finally:
        client.close()
    assert e1 == e2


async def test_lease_cas_is_not_fooled_by_a_b_a(h: S3Harness) -> None:
    b1, b2 = open_s3(h), open_s3(h)
    assert await b1._leases.write("r", "alice", 1e10, None)
    stale = await b1._leases.read("r")
    assert stale is not None
    # Someone else moves the lease away and back to exactly the same owner and expiry.
    moved = await b2._leases.read("r")
    assert moved is not None and await b2._leases.write("r", "bob", 2e10, moved.etag)
    back = await b2._leases.read("r")
    assert back is not None and await b2._leases.write("r", "alice", 1e10, back.etag)
    now = await b2._leases.read("r")
    assert now is not None and (now.owner, now.expires_at) == (stale.owner, stale.expires_at)
    assert now.etag != stale.etag
    assert not await b1._leases.write("r", "mallory", 3e10, stale.etag)
    lease = await b2.get_lease("r")
    assert lease is not None and lease.owner == "alice"


async def test_due_pointer_cas_is_not_fooled_by_a_b_a(h: S3Harness) -> None:
    b = open_s3(h)
    t1, t2 = time.time() - 10, time.time() + 100
    await b.schedule("r", t1)
    stale = await b._due.read_pointer("r")
    await b.schedule("r", t2)
    await b.schedule("r", t1)
    current = await b._due.read_pointer("r")
    assert stale is not None and current is not None
    assert stale.at == current.at and stale.etag != current.etag
    assert await b._objects.put_if(b._due.pointer_key("r"), b"{}", if_match=stale.etag) is None
    assert await b.due(time.time()) == [("r", pytest.approx(t1))]


async def test_if_match_on_a_missing_key_is_a_lost_race_not_a_create(h: S3Harness) -> None:
    b = open_s3(h)
    key = b._lease_key("nobody")
    assert await b._objects.put_if(key, b"x", if_match='"0123456789abcdef0123456789abcdef"') is None
    assert await b._objects.get(key) is None
    assert await b.get_lease("nobody") is None


async def test_a_lost_append_race_is_position_taken(h: S3Harness) -> None:
    b1, b2 = open_s3(h), open_s3(h)
    results = await asyncio.gather(
        b1.append("r", 0, entry("one")), b2.append("r", 0, entry("two")), return_exceptions=True
    )
    assert sum(r is None for r in results) == 1
    (lost,) = [r for r in results if r is not None]
    assert isinstance(lost, PositionTaken) and lost.position == 0
    (stored,) = await b1.read_log("r")
    winner = "one" if results[0] is None else "two"
    assert decode_entry("r", 0, stored)[0]["value"] == winner


async def test_a_retry_whose_first_attempt_landed_still_wins(h: S3Harness, proxy: Proxy) -> None:
    b = open_s3(h, endpoint=proxy.endpoint)
    await b.append("warm-up", 0, entry(0))  # connect, and check conditional writes
    before = b.requests.copy()
    proxy.drop_responses = 1
    await b.append("r", 0, entry("mine"))  # stored, reply lost, resent: 412, ours by write id
    # aiohttp resends on its own when a kept-alive connection drops; botocore counts one.
    spent = b.requests - before
    assert spent["HeadObject"] == 1 and spent["PutObject"] in (1, 2), spent
    (stored,) = await b.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == "mine"

    proxy.drop_responses = 1
    assert await b.post_event("r", "e1", b"1") is True

    assert await b.acquire_lease("r", "me", 30)
    proxy.drop_responses = 1
    assert await b.acquire_lease("r", "me", 30)  # a renewal (If-Match) whose reply is lost
    before = b.requests.copy()
    assert await b.acquire_lease("r", "me", 30)  # the ETag read back serves the next one
    assert b.requests - before == {"PutObject": 1}


async def test_a_put_cut_off_before_its_body_never_lands_as_an_empty_entry(
    h: S3Harness, proxy: Proxy
) -> None:
    # The client sends its headers with "Expect: 100-continue" and is gone before the
    # body. SeaweedFS then commits an empty object (which passes If-None-Match) unless
    # the PUT carries Content-MD5; ours always do.
    b = open_s3(h, endpoint=proxy.endpoint)
    await b.append("warm-up", 0, entry(0))
    proxy.drop_continues = 1
    await b.append("r", 0, entry("whole"))
    (stored,) = await b.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == "whole"


async def test_a_retry_does_not_claim_someone_elses_write(h: S3Harness, proxy: Proxy) -> None:
    other = open_s3(h)
    await other.append("r", 0, entry("theirs"))
    b = open_s3(h, endpoint=proxy.endpoint)
    await b.append("warm-up", 0, entry(0))
    proxy.drop_responses = 1  # the 412 is lost; the retry's 412 is checked against the write id
    with pytest.raises(PositionTaken):
        await b.append("r", 0, entry("mine"))
    (stored,) = await b.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == "theirs"


# -- outages -----------------------------------------------------------------------


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_server_down_is_backend_unavailable_in_bounded_time(h: S3Harness) -> None:
    b = open_s3(h, endpoint=f"http://127.0.0.1:{closed_port()}")
    t0 = time.monotonic()
    results = await asyncio.gather(
        b.append("r", 0, entry(1)),
        b.read_log("r"),
        b.due(time.time()),
        b.acquire_lease("r", "me", 30),
        b.post_event("r", "e", b"1"),
        b.schedule("r", time.time()),
        b.get_run("r"),
        return_exceptions=True,
    )
    # 4 attempts, backing off 0.05 + 0.2 + 0.8 s (jittered by up to 50%) per request; a
    # call may make two requests (a read, then a conditional write) before it gives up.
    assert time.monotonic() - t0 < 6.0
    for result in results:
        assert isinstance(result, BackendUnavailable), result
        assert "127.0.0.1" in str(result) and "after 4 attempts" in str(result)
    # Waiting keeps waiting through an outage (its polls fail quietly) and times out.
    t0 = time.monotonic()
    assert await b.wait_for_work(0.5) is False
    assert time.monotonic() - t0 < 1.0


async def test_hung_server_is_backend_unavailable_after_its_timeouts(
    h: S3Harness, proxy: Proxy
) -> None:
    proxy.blackhole = True
    b = open_s3(h, endpoint=proxy.endpoint, read_timeout=0.2, connect_timeout=0.2)
    t0 = time.monotonic()
    with pytest.raises(BackendUnavailable):
        await b.read_log("r")
    # 4 attempts of 0.2 s plus backoff (0.05 + 0.2 + 0.8, jittered by up to 50%).
    assert time.monotonic() - t0 < 4.0
