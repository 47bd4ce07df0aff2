"""The fs backend's log segment: torn tails, damage, fencing across processes, descriptors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from substantial.backends.fs import FSBackend
from substantial.backends.fs._segment import HEADER_SIZE, frame
from substantial.errors import CorruptRecord, InvalidArgument, PositionTaken
from substantial.records import decode_entry, encode_entry

ROOT = Path(__file__).resolve().parent.parent


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def values(run_id: str, log: list[bytes], start: int = 0) -> list[object]:
    return [decode_entry(run_id, start + i, e)[0]["value"] for i, e in enumerate(log)]


def run_child(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


# -- torn tails --------------------------------------------------------------------

_KILLED_MID_APPEND = """
import asyncio, os, signal, sys
from substantial.backends.fs import FSBackend
from substantial.records import encode_entry

def entry(value):
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])

async def main(root):
    backend = FSBackend(root)
    for i in range(5):
        await backend.append("r", i, entry(i))
    real = os.pwrite

    def half_then_die(fd, data, offset):
        # The record's first half reaches the file, then the process is killed.
        real(fd, bytes(data[: len(data) // 2]), offset)
        os.kill(os.getpid(), signal.SIGKILL)

    os.pwrite = half_then_die
    await backend.append("r", 5, entry("torn " * 20))

asyncio.run(main(sys.argv[1]))
"""


async def test_a_writer_killed_mid_append_leaves_a_tail_readers_skip_and_appenders_cut(
    store: Path,
) -> None:
    proc = run_child(_KILLED_MID_APPEND, str(store))
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    backend = FSBackend(store)
    path = backend.segment_path("r")
    whole = HEADER_SIZE + sum(len(frame(entry(i))) for i in range(5))
    assert path.stat().st_size > whole  # the half record is there
    assert values("r", await backend.read_log("r")) == [0, 1, 2, 3, 4]
    # The killed writer held the file's lock: it went with the process. Position 5 is free.
    with pytest.raises(PositionTaken):
        await backend.append("r", 4, entry("late"))
    await backend.append("r", 5, entry(5))
    assert values("r", await backend.read_log("r")) == [0, 1, 2, 3, 4, 5]
    assert path.stat().st_size == whole + len(frame(entry(5)))  # the tail was cut, not kept


@pytest.mark.parametrize(
    "tail",
    ["header", "entry", "checksum", "zeros", "first"],
)
async def test_every_kind_of_torn_tail_reads_as_the_end_and_is_cut(store: Path, tail: str) -> None:
    backend = FSBackend(store)
    for i in range(3):
        await backend.append("r", i, entry(i))
    path = backend.segment_path("r")
    record = frame(entry("next"))
    damaged = {
        "header": record[:7],  # fewer bytes than a record header
        "entry": record[:-3],  # the header announces more bytes than follow
        "checksum": record[:-1] + bytes([record[-1] ^ 0xFF]),  # whole, but the last bytes wrong
        "zeros": b"\x00" * 100,  # space a power loss left unwritten
        "first": b"",
    }[tail]
    if tail == "first":
        path.write_bytes(path.read_bytes()[: HEADER_SIZE - 3])  # the file's own header torn
    else:
        with path.open("ab") as f:
            f.write(damaged)
    expected = [] if tail == "first" else [0, 1, 2]
    assert values("r", await backend.read_log("r")) == expected
    other = FSBackend(store)  # a process that never saw this file
    with pytest.raises(InvalidArgument, match="gap"):
        await other.append("r", len(expected) + 1, entry("gap"))
    await other.append("r", len(expected), entry("next"))
    assert values("r", await backend.read_log("r")) == [*expected, "next"]


async def test_a_read_from_late_in_a_long_log_starts_near_it(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer, reader = FSBackend(store), FSBackend(store)  # as two processes
    for i in range(1000):
        await writer.append("r", i, entry(i))
    assert values("r", await reader.read_log("r")) == list(range(1000))
    for start in (1, 255, 256, 257, 700, 999, 1000):
        assert values("r", await reader.read_log("r", start), start) == list(range(start, 1000))
    read: list[int] = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: read.append(n) or real(fd, n, at))
    whole = (store / "runs" / "r" / "log.seg").stat().st_size
    for client in (reader, writer):
        read.clear()
        assert values("r", await client.read_log("r", 990), 990) == list(range(990, 1000))
        # From the mark at 768: a quarter of the file, not all of it (the header aside).
        assert sum(read) < whole / 3, (read, whole)
    # Entries appended by another client are found, and marks go on past them.
    for i in range(1000, 1300):
        await writer.append("r", i, entry(i))
    assert values("r", await reader.read_log("r", 1290), 1290) == list(range(1290, 1300))
    # A log deleted and started again under the same id is read afresh.
    shutil.rmtree(store / "runs" / "r")
    await writer.append("r", 0, entry("new"))
    assert values("r", await reader.read_log("r")) == ["new"]
    assert await reader.read_log("r", 990) == []


# -- damage ------------------------------------------------------------------------


async def test_a_damaged_entry_is_a_corrupt_record_and_the_rest_stays_readable(
    store: Path,
) -> None:
    backend = FSBackend(store)
    for i in range(4):
        await backend.append("r", i, entry(i))
    path = backend.segment_path("r")
    data = bytearray(path.read_bytes())
    second = HEADER_SIZE + len(frame(entry(0)))
    data[second + 12 + 5] ^= 0x01  # one bit of entry 1's bytes flips on disk
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord, match="checksum") as err:
        await backend.read_log("r")
    assert err.value.position == 1 and err.value.run_id == "r"
    assert values("r", await backend.read_log("r", 2), 2) == [2, 3]
    # Appending goes on after it: its position is counted, only its bytes are bad.
    await FSBackend(store).append("r", 4, entry(4))
    assert values("r", await backend.read_log("r", 2), 2) == [2, 3, 4]


async def test_a_damaged_header_is_never_cut_off_as_a_tail(store: Path) -> None:
    backend = FSBackend(store)
    for i in range(4):
        await backend.append("r", i, entry(i))
    path = backend.segment_path("r")
    data = bytearray(path.read_bytes())
    third = HEADER_SIZE + 2 * len(frame(entry(0)))
    data[third + 2] ^= 0x40  # entry 2's length: the records after it cannot be found
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptRecord, match="header") as err:
        await backend.read_log("r")
    assert err.value.position == 2
    with pytest.raises(CorruptRecord, match="header"):
        await FSBackend(store).append("r", 4, entry(4))
    assert path.read_bytes() == bytes(data)  # nothing was cut or written


async def test_a_file_that_is_not_a_segment_is_reported(store: Path) -> None:
    backend = FSBackend(store)
    await backend.append("r", 0, entry(0))
    backend.segment_path("r").write_bytes(b"[" + b" " * 40 + b"]")
    with pytest.raises(CorruptRecord, match="not a log segment"):
        await backend.read_log("r")
    with pytest.raises(CorruptRecord, match="not a log segment"):
        await backend.append("r", 1, entry(1))


# -- fencing across processes -------------------------------------------------------

_APPENDER = """
import asyncio, sys
from substantial.backends.fs import FSBackend
from substantial.errors import PositionTaken
from substantial.records import encode_entry

async def main(root, tag, total, start_at):
    backend = FSBackend(root)
    await backend.read_log("hot")
    while time.time() < start_at:
        await asyncio.sleep(0.001)
    won = 0
    position = 0
    while position < total:
        try:
            await backend.append("hot", position, encode_entry([{"k": "step", "c": 0,
                                 "name": "s", "value": f"{tag}:{position}"}]))
            won += 1
            position += 1
        except PositionTaken:
            position = len(await backend.read_log("hot"))
    print(won)

import time
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
"""


async def test_processes_appending_to_one_run_each_win_distinct_positions(store: Path) -> None:
    total, processes = 200, 4
    start_at = str(time.time() + 1.5)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _APPENDER, str(store), f"p{i}", str(total), start_at],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(processes)
    ]
    wins = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        wins.append(int(out))
    log = values("hot", await FSBackend(store).read_log("hot"))
    # Every position holds exactly one entry, written by the one appender that won it.
    assert len(log) == total == sum(wins)
    assert [int(str(v).split(":")[1]) for v in log] == list(range(total))


_EXTEND = """
import asyncio, sys
from substantial.backends.fs import FSBackend
from substantial.records import encode_entry

async def main(root):
    backend = FSBackend(root)
    for i in (3, 4):
        await backend.append("r", i, encode_entry([{"k": "step", "c": 0, "name": "s",
                                                     "value": f"new owner {i}"}]))

asyncio.run(main(sys.argv[1]))
"""


async def test_a_stale_writer_is_fenced_after_another_process_extends_the_log(
    store: Path,
) -> None:
    stale = FSBackend(store)
    for i in range(3):
        await stale.append("r", i, entry(i))  # this process now knows the log ends at 3
    proc = run_child(_EXTEND, str(store))
    assert proc.returncode == 0, proc.stderr
    with pytest.raises(PositionTaken):
        await stale.append("r", 3, entry("stale"))
    with pytest.raises(PositionTaken):
        await stale.append("r", 4, entry("stale"))
    await stale.append("r", 5, entry(5))
    assert values("r", await stale.read_log("r", 3), 3) == ["new owner 3", "new owner 4", 5]


async def test_a_deleted_run_started_again_is_not_extended_from_memory(store: Path) -> None:
    backend = FSBackend(store)
    for i in range(3):
        await backend.append("r", i, entry(i))
    shutil.rmtree(store / "runs" / "r")  # deleted by another process, then started afresh
    with pytest.raises(InvalidArgument, match="gap"):
        await backend.append("r", 3, entry("into the old log"))
    await FSBackend(store).append("r", 0, entry("again"))
    with pytest.raises(PositionTaken):
        await backend.append("r", 0, entry("second start"))
    await backend.append("r", 1, entry(1))
    assert values("r", await backend.read_log("r")) == ["again", 1]


# -- descriptors ------------------------------------------------------------------

_MANY_RUNS = """
import asyncio, os, resource, sys
from substantial.backends.fs import FSBackend
from substantial.records import encode_entry

resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
peak = 0

def entry(value):
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])

async def one_run(backend, run_id):
    global peak
    for i in range(3):
        await backend.append(run_id, i, entry(i))
        peak = max(peak, len(os.listdir("/proc/self/fd")))
        await asyncio.sleep(0)  # every run's log is in use before any is done
    return len(await backend.read_log(run_id))

async def main(root, n):
    backend = FSBackend(root)
    lengths = await asyncio.gather(*(one_run(backend, f"r{i}") for i in range(n)))
    print(sum(lengths), peak)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def test_2000_runs_appended_at_once_stay_within_a_small_descriptor_limit(store: Path) -> None:
    # A worker drives each run's log through the backend: what the backend keeps open
    # between calls is what grows with the number of runs it drives.
    proc = run_child(_MANY_RUNS, str(store), "2000", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    total, peak = map(int, proc.stdout.split())
    assert total == 3 * 2000
    assert peak < 64


# -- stores written by layout 1 -------------------------------------------------------


async def test_a_log_of_layout_1_is_read_and_extended_in_its_own_layout(store: Path) -> None:
    log_dir = store / "runs" / "old" / "log"
    log_dir.mkdir(parents=True)
    for i in range(3):
        (log_dir / f"{i:012d}").write_bytes(entry(i))
    backend = FSBackend(store)
    assert values("old", await backend.read_log("old")) == [0, 1, 2]
    assert values("old", await backend.read_log("old", 2), 2) == [2]
    with pytest.raises(PositionTaken):
        await backend.append("old", 2, entry("taken"))
    with pytest.raises(InvalidArgument, match="gap"):
        await backend.append("old", 4, entry("gap"))
    await backend.append("old", 3, entry(3))
    assert (log_dir / f"{3:012d}").read_bytes() == entry(3)
    assert not backend.segment_path("old").exists()  # one run, one layout
    assert values("old", await backend.read_log("old")) == [0, 1, 2, 3]
    # New runs in the same store get a segment.
    await backend.append("new", 0, entry(0))
    assert backend.segment_path("new").exists()
    assert not os.path.exists(store / "runs" / "new" / "log")
