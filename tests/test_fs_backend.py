"""What the conformance suite cannot see of the fs backend: files, crashes, wake-ups."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from substantial.backends import from_url
from substantial.backends._wake import wake_dir_for
from substantial.backends.base import RunInfo
from substantial.backends.fs import FSBackend
from substantial.backends.fs._segment import HEADER_SIZE, MAGIC, parse
from substantial.errors import BackendUnavailable, PositionTaken
from substantial.records import decode_entry, encode_entry

ROOT = Path(__file__).resolve().parent.parent


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str) -> RunInfo:
    now = time.time()
    return RunInfo(run_id, "wf", "active", now, now)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


async def test_fsync_mode_stores_and_reads_everything(store: Path) -> None:
    backend = from_url(f"file://{store}?durability=fsync")
    assert isinstance(backend, FSBackend) and backend.durability == "fsync"
    await backend.append("r", 0, entry(0))
    await backend.append("r", 1, entry(1))
    with pytest.raises(PositionTaken):
        await backend.append("r", 1, entry("again"))
    assert len(await backend.read_log("r")) == 2
    assert await backend.post_event("r", "e", b"1")
    await backend.schedule("r", time.time() - 1)
    await backend.put_run(info("r"))
    assert await backend.acquire_lease("r", "me", 30)
    assert [e.event_id for e in await backend.read_inbox("r")] == ["e"]
    await backend.ack_events("r", ["e"])
    assert [r for r, _ in await backend.due(time.time())] == ["r"]
    assert (await backend.get_run("r")) is not None
    await backend.close()


async def test_the_log_is_one_segment_of_checksummed_records(store: Path) -> None:
    backend = FSBackend(store)
    for i in range(3):
        await backend.append("r", i, entry(i))
    path = backend.segment_path("r")
    assert path == store / "runs" / "r" / "log.seg"
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    found = parse(data[HEADER_SIZE:], HEADER_SIZE, 0)
    assert (found.end, found.bad, found.damage) == (len(data), [], None)
    values = [
        decode_entry("r", i, data[at : at + n])[0]["value"]
        for i, (at, n) in enumerate(found.records)
    ]
    assert values == [0, 1, 2]
    # Nothing else in the run's directory: no file per entry, no temporaries.
    assert os.listdir(path.parent) == ["log.seg"]


async def test_named_temporaries_work_where_o_tmpfile_does_not(store: Path) -> None:
    backend = FSBackend(store)
    backend._files.use_tmpfile = False  # as on a file system without O_TMPFILE
    await backend.append("r", 0, entry(0))
    with pytest.raises(PositionTaken):
        await backend.append("r", 0, entry("second"))
    assert await backend.post_event("r", "e", b"x")
    assert not await backend.post_event("r", "e", b"y")
    (stored,) = await backend.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == 0
    assert os.listdir(store / "runs" / "r" / "inbox") == ["e"]


async def test_temporaries_left_by_a_crash_are_ignored(store: Path) -> None:
    backend = FSBackend(store)
    await backend.append("r", 0, entry(0))
    await backend.post_event("r", "e1", b"1")
    (store / "runs" / "r" / "inbox" / ".e2.123-abcd.tmp").write_bytes(b"12")
    (store / "runs" / "r" / ".meta.json.123-abcd.tmp").write_bytes(b"{")
    assert len(await backend.read_log("r")) == 1
    assert [e.event_id for e in await backend.read_inbox("r")] == ["e1"]
    await backend.append("r", 1, entry(1))
    assert len(await backend.read_log("r")) == 2


async def test_a_store_under_a_file_is_unavailable_with_advice(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    backend = FSBackend(blocker / "store")
    calls: list[Any] = [
        backend.append("r", 0, entry(0)),
        backend.read_log("r"),
        backend.post_event("r", "e", b"1"),
        backend.schedule("r", time.time()),
        backend.put_run(info("r")),
        backend.acquire_lease("r", "me", 30),
        backend.get_run("r"),
    ]
    for call in calls:
        with pytest.raises(BackendUnavailable, match="not a directory; point the backend at"):
            await call


def test_a_read_only_store_is_unavailable_with_advice() -> None:
    # Root ignores permission bits, so the writer is a child that drops to "nobody"
    # (after importing everything, since it may not read the virtualenv).
    base = Path(tempfile.mkdtemp(prefix="substantial-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        store = base / "store"
        asyncio.run(FSBackend(store).append("r", 0, entry(0)))
        for directory in [store, *store.rglob("*")]:
            if directory.is_dir():
                directory.chmod(0o555)
        script = textwrap.dedent(
            f"""
            import asyncio, os
            from substantial.backends.fs import FSBackend
            from substantial.errors import BackendUnavailable
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            async def main():
                backend = FSBackend({str(store)!r})
                print(len(await backend.read_log("r")))
                try:
                    await backend.append("r", 1, b'[{{"k": "x"}}]')
                except BackendUnavailable as exc:
                    print(exc)
            asyncio.run(main())
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        assert out.splitlines()[0] == "1"  # reading still works
        assert "Permission denied" in out and "give this process's user read and write" in out
    finally:
        for directory in base.rglob("*"):
            if directory.is_dir():
                directory.chmod(0o755)
        shutil.rmtree(base)


# -- the due index ------------------------------------------------------------

_touched: list[str] | None = None
_hooked = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _touched is not None and event in ("os.listdir", "os.scandir", "open"):
        _touched.append(os.fsdecode(args[0]) if isinstance(args[0], str | bytes) else str(args[0]))


@pytest.fixture
def file_accesses() -> Iterator[list[str]]:
    """Record the paths the process lists or opens while the test holds the list."""
    global _touched, _hooked
    if not _hooked:
        sys.addaudithook(_audit)  # hooks cannot be removed: install one, switch it on and off
        _hooked = True
    _touched = []
    try:
        yield _touched
    finally:
        _touched = None


async def test_due_reads_only_the_buckets_up_to_the_next_key(
    store: Path, file_accesses: list[str]
) -> None:
    backend = FSBackend(store)
    now = time.time()
    for i in range(10_000):  # five thousand far-future hours
        await backend.set_due(f"later{i}", now + 3600 * (2 + i // 2))
    await backend.set_due("ready", now - 5)
    file_accesses.clear()
    due = await backend.due(now)
    assert due == [("ready", pytest.approx(now - 5, abs=0.01))]
    # The next time comes from the first later bucket: its first key, and nothing after.
    assert due.next_at == pytest.approx(now + 7200, abs=0.01)
    buckets = {int(Path(p).name) for p in file_accesses if "/due/" in p}
    assert buckets == {int(now // 3600), int((now + 7200) // 3600)}, buckets
    assert not any("later" in p for p in file_accesses)  # a run's pointer is a link, not a file
    assert len(file_accesses) < 10, file_accesses


async def test_keys_left_by_a_crashed_schedule_are_ignored_and_removed(store: Path) -> None:
    backend = FSBackend(store)
    now = time.time()
    await backend.schedule("a", now - 10)
    await backend.schedule("b", now + 7200)
    due_dir = store / "due"
    bucket = f"{int((now - 60) * 1e6) // 3_600_000_000:08d}"
    (due_dir / bucket).mkdir(exist_ok=True)
    # "a" crashed after writing a new key but before moving its pointer;
    # "b" crashed after moving its pointer but before dropping its old key;
    # "gone" is a key of a run whose directory was deleted by hand.
    stale = [
        due_dir / bucket / f"{int((now - 60) * 1e6):017d}-a",
        due_dir / bucket / f"{int((now - 30) * 1e6):017d}-b",
        due_dir / bucket / f"{int((now - 20) * 1e6):017d}-gone",
    ]
    for path in stale:
        path.touch()
    due = await backend.due(now)
    assert [r for r, _ in due] == ["a"]
    assert due[0][1] == pytest.approx(now - 10, abs=0.01)  # the key its pointer names
    assert not any(p.exists() for p in stale)
    assert await backend.next_due_at() == pytest.approx(now - 10, abs=0.01)
    await backend.unschedule("a")
    await backend.unschedule("b")
    assert await backend.next_due_at() is None
    assert [p for p in due_dir.rglob("*") if p.is_file()] == []


async def test_schedule_recreates_a_bucket_pruned_as_empty(store: Path) -> None:
    backend = FSBackend(store)
    past = time.time() - 3 * 3600
    await backend.schedule("r", past)
    await backend.unschedule("r")
    assert await backend.due(time.time()) == []  # prunes the empty past bucket
    assert os.listdir(store / "due") == []
    await backend.schedule("r", past)
    assert [r for r, _ in await backend.due(time.time())] == ["r"]


async def test_unscheduling_an_unknown_run_creates_nothing(store: Path) -> None:
    backend = FSBackend(store)
    await backend.unschedule("ghost")
    await backend.release_lease("ghost", "me")
    assert not (store / "runs" / "ghost").exists()


# -- inbox, metadata, leases across processes ------------------------------


async def test_events_carry_strictly_increasing_arrival_stamps(store: Path) -> None:
    backend = FSBackend(store)
    for i in range(20):
        await backend.post_event("r", f"z{19 - i}", str(i).encode())
    events = await backend.read_inbox("r")
    assert [int(e.data) for e in events] == list(range(20))
    stamps = [e.posted_at for e in events]
    assert stamps == sorted(stamps)
    raw = (store / "runs" / "r" / "inbox" / "z19").read_bytes()
    head, _, data = raw.partition(b"\n")
    assert head.isdigit() and data == b"0"


async def test_list_runs_skips_runs_without_metadata(store: Path) -> None:
    backend = FSBackend(store)
    await backend.post_event("only-events", "e", b"1")
    await backend.append("half-started", 0, entry(0))
    await backend.put_run(info("real"))
    assert [r.run_id for r in await backend.list_runs()] == ["real"]


_LEASE_RACE = """
import asyncio, sys, time
from substantial.backends import from_url

async def main(url, tag, start_at):
    backend = from_url(url)
    await backend.get_lease("hot")
    await asyncio.sleep(max(0.0, start_at - time.time()))
    print("won" if await backend.acquire_lease("hot", tag, 60) else "lost")
    await backend.close()

asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def lease_race(url: str, processes: int = 12) -> list[str]:
    """Race ``processes`` processes for one lease; return what each printed."""
    start_at = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LEASE_RACE, url, f"p{i}", str(start_at)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


async def test_the_lease_is_rewritten_in_place_in_the_run_lock_file(store: Path) -> None:
    backend = FSBackend(store)
    run_dir = store / "runs" / "r"
    assert await backend.acquire_lease("r", "me", 30)
    lock = run_dir / "lock"
    inode = lock.stat().st_ino
    assert os.listdir(run_dir) == ["lock"]  # no lease file, no temporaries
    assert await backend.acquire_lease("r", "me", 60)  # renewed
    assert not await backend.acquire_lease("r", "other", 30)
    lease = await FSBackend(store).get_lease("r")
    assert lease is not None and lease.owner == "me" and lease.expires_at > time.time() + 50
    await backend.release_lease("r", "me")
    assert await backend.get_lease("r") is None
    assert lock.stat().st_ino == inode and lock.read_bytes().strip() == b""
    # A lease file of layout 1 is not read: leases only save work, the log fences.
    (run_dir / "lease").write_bytes(b'{"owner": "old", "expires_at": 9999999999}')
    assert await backend.get_lease("r") is None
    assert await backend.acquire_lease("r", "me", 30)


async def test_one_lease_holder_among_processes(store: Path) -> None:
    outputs = lease_race(f"file://{store}")
    assert outputs.count("won") == 1, outputs
    lease = await FSBackend(store).get_lease("hot")
    assert lease is not None and lease.owner == f"p{outputs.index('won')}"


# -- wake-ups ---------------------------------------------------------------

_SEND = """
import asyncio, sys
from substantial.backends import from_url

async def main(url):
    backend = from_url(url)
    await backend.send_event("w", "from-child", b"1")
    await backend.close()

asyncio.run(main(sys.argv[1]))
"""


async def wake_from_another_process(url: str, waiter: Any) -> float:
    """Wait on ``waiter`` while a child process sends an event; return the delay."""
    await waiter.due(time.time())
    task = asyncio.create_task(waiter.wait_for_work(20))
    await asyncio.sleep(0.05)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _SEND, url, cwd=ROOT)
    woken = await asyncio.wait_for(task, 20)
    t_woken = time.perf_counter()
    assert await proc.wait() == 0
    assert woken is True
    return t_woken


async def test_an_event_from_another_process_wakes_the_waiter(store: Path) -> None:
    waiter = FSBackend(store)
    t0 = time.perf_counter()
    await wake_from_another_process(f"file://{store}", waiter)
    # Python start-up dominates; polling would take the full 20 s timeout.
    assert time.perf_counter() - t0 < 10
    await waiter.close()


async def test_dead_wake_sockets_are_removed_and_live_ones_kept(store: Path) -> None:
    waiter = FSBackend(store)
    sender = FSBackend(store)
    await waiter.due(time.time())
    wake_dir = store / "wake"
    # A process killed while waiting leaves its socket file behind, bound to nobody.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(wake_dir / "999999-deadbeef"))
    dead.close()
    (live,) = [p for p in wake_dir.iterdir() if p.name != "999999-deadbeef"]
    await sender.send_event("r", "e", b"1")
    assert sorted(p.name for p in wake_dir.iterdir()) == [live.name]
    assert await waiter.wait_for_work(1) is True
    await waiter.close()
    assert list(wake_dir.iterdir()) == []  # close() removes the socket
    await sender.close()


async def test_a_full_wake_queue_does_not_block_the_sender(store: Path) -> None:
    waiter = FSBackend(store)
    sender = FSBackend(store)
    await waiter.due(time.time())
    t0 = time.perf_counter()
    for i in range(2000):  # far more than a datagram queue holds, with nobody reading
        await sender.schedule(f"r{i % 5}", 0)
    assert time.perf_counter() - t0 < 30
    assert len(list((store / "wake").iterdir())) == 1  # a busy waiter is not taken for dead
    await waiter.close()
    await sender.close()


async def test_a_long_store_path_wakes_through_a_short_socket_path(tmp_path: Path) -> None:
    store = tmp_path / ("deep-" * 20) / "store"
    assert len(str(store / "wake")) > 108
    wake_dir = wake_dir_for(str(store / "wake"))
    assert wake_dir.startswith(tempfile.gettempdir()) and len(wake_dir) < 90
    waiter = FSBackend(store)
    try:
        await wake_from_another_process(f"file://{store}", waiter)
        assert len(os.listdir(wake_dir)) == 1
    finally:
        await waiter.close()
        shutil.rmtree(wake_dir, ignore_errors=True)


async def test_a_signal_between_due_and_wait_is_not_lost(store: Path) -> None:
    waiter = FSBackend(store)
    sender = FSBackend(store)
    assert await waiter.due(time.time()) == []
    await sender.send_event("r", "e", b"1")  # arrives while the worker is busy
    await asyncio.sleep(0.05)
    t0 = time.perf_counter()
    assert await waiter.wait_for_work(5) is True
    assert time.perf_counter() - t0 < 0.5
    await waiter.close()
    await sender.close()
