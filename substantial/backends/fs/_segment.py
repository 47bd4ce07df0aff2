r"""A run's log as one append-only segment file: framed records and a fenced append.

``runs/<run_id>/log.seg`` is the magic ``\x89SBLOG1\n`` and 8 random bytes
(the file's id), followed by records, each a 12-byte header and the entry::

    <u32 length> <u32 crc32(entry)> <u32 crc32(the 8 header bytes before)>  entry

Positions are implicit: the n-th record holds position n. An append takes
an exclusive ``flock`` on the file, learns where the log ends (from this
process's cache, checked against the file's id and size), and writes the
record there only if its position is the first free one: the lock decides
between concurrent appenders, so it is the fence. The file is opened for
each append and closed after, so a worker holds no descriptor between
calls, however many runs it drives.

A writer killed mid-append leaves a torn tail: too few bytes for a header or
for the length it announces, zeros, or a last record whose checksum fails.
Readers stop before it; the next appender, holding the lock (so no writer
is half-way), cuts it off. Damage anywhere else (a checksum that fails with
records after it, a header that does not check out) is a corrupt record,
reported by position and never cut off.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from substantial.backends._common import gap_error
from substantial.backends.fs._files import Files, fdatasync, read_fd, sync_dir
from substantial.errors import CorruptRecord, PositionTaken

__all__ = ["HEADER_SIZE", "MAGIC", "SEGMENT", "Parsed", "Replaced", "Segments", "frame", "parse"]

#: The segment's name in the run's directory.
SEGMENT = "log.seg"
#: The first bytes of every segment (a non-ASCII first byte, as PNG's, catches text-mode copies).
MAGIC = b"\x89SBLOG1\n"
#: The file's header: the magic, then 8 random bytes naming this file among any that
#: held the run's log before it (a deleted run's inode may be reused).
HEADER_SIZE = len(MAGIC) + 8
_HEAD = struct.Struct("<II")
_CRC = struct.Struct("<I")
_RECORD = struct.Struct("<III")
_RECORD_HEAD = _RECORD.size
# Per-run cache entries are tiny; the bound only stops a long-lived worker from growing.
_CACHE_RUNS = 4096


def frame(entry: bytes) -> bytes:
    """Return ``entry`` with its record header."""
    head = _HEAD.pack(len(entry), zlib.crc32(entry))
    return head + _CRC.pack(zlib.crc32(head)) + entry


@dataclass
class Parsed:
    """What a scan of segment bytes found."""

    #: (offset, length) of each record's entry, in position order, from the scan's start.
    records: list[tuple[int, int]]
    #: Positions (absolute) whose entry fails its checksum, with records after them.
    bad: list[int]
    #: Offset just after the last record found.
    end: int
    #: Why the bytes from ``end`` on cannot be read, when they are damage rather than a
    #: torn tail (None: a clean end or a torn tail).
    damage: str | None


def parse(data: bytes | memoryview, offset: int, first_position: int) -> Parsed:
    """Scan records in ``data`` (which starts at file ``offset``) up to a torn tail or damage."""
    view = memoryview(data)
    size = len(view)
    records: list[tuple[int, int]] = []
    bad: list[int] = []
    at = 0
    damage = None
    unpack, crc, add = _RECORD.unpack_from, zlib.crc32, records.append
    while size - at >= _RECORD_HEAD:
        length, entry_crc, head_crc = unpack(view, at)
        body = at + _RECORD_HEAD
        stop = body + length
        # The common case: a non-empty entry that checks out also proves its length
        # (a wrong one would not), so the header's own checksum is left for the rest.
        if length and stop <= size and crc(view[body:stop]) == entry_crc:
            add((offset + body, length))
            at = stop
            continue
        if crc(view[at : at + 8]) != head_crc:
            if view[at:].tobytes().strip(b"\x00"):
                damage = f"its header at byte {offset + at} does not check out"
            break  # zeros: space a crash extended the file by, never written
        if stop > size:
            break  # the rest of a record that was being written
        if crc(view[body:stop]) != entry_crc:
            if stop == size:
                break  # the last record, only partly written
            bad.append(first_position + len(records))
        add((offset + body, length))
        at = stop
    return Parsed(records, bad, offset + at, damage)


class Segments:
    """Append to and read the runs' segment files under ``runs``."""

    def __init__(self, files: Files, runs: str) -> None:
        self._files = files
        self._runs = runs
        # run id -> (file id, end offset, entry count) of its segment, as last seen.
        self._known: OrderedDict[str, tuple[bytes, int, int]] = OrderedDict()

    def path(self, run_id: str) -> str:
        """Return the run's segment file name."""
        return f"{self._runs}/{run_id}/{SEGMENT}"

    # -- reading -------------------------------------------------------------

    def read(self, run_id: str, start: int) -> list[bytes] | None:
        """Return the entries from ``start`` on; None if the run has no segment."""
        try:
            fd = os.open(self.path(run_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            data = read_fd(fd)
        finally:
            os.close(fd)
        if len(data) < HEADER_SIZE:
            return []  # created, first record not written yet (or torn)
        if data[: len(MAGIC)] != MAGIC:
            raise CorruptRecord(run_id, 0, f"{self.path(run_id)} is not a log segment")
        found = parse(memoryview(data)[HEADER_SIZE:], HEADER_SIZE, 0)
        for position in found.bad:
            if position >= start:
                raise CorruptRecord(run_id, position, "its checksum does not match its bytes")
        if found.damage is not None:
            raise CorruptRecord(run_id, len(found.records), found.damage)
        return [data[at : at + length] for at, length in found.records[start:]]

    # -- appending -----------------------------------------------------------

    def open_for_append(
        self, run_id: str, position: int, legacy: Callable[[str], bool]
    ) -> int | None:
        """Open the run's segment; None if the run's log is in the older layout.

        ``legacy(run_id)`` tells whether the run has entries in the older
        layout (asked only when it has no segment). A first append creates
        the segment; any other append to a run without one is a gap.
        """
        path = self.path(run_id)
        try:
            return os.open(path, os.O_RDWR)
        except FileNotFoundError:
            pass
        if legacy(run_id):
            return None
        if position:
            raise gap_error(run_id, position)
        for attempt in range(3):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return os.open(path, os.O_RDWR)
            except FileNotFoundError:
                if attempt == 2:
                    raise
                self._files.makedirs(os.path.dirname(path))
                continue
            if self._files.fsync:
                sync_dir(os.path.dirname(path))  # the new name must survive power loss
            return fd
        raise AssertionError("unreachable")

    def append(self, run_id: str, fd: int, position: int, entry: bytes) -> None:
        """Write the entry at ``position`` if it is the first free one, under the file's lock."""
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when the caller closes fd
        st = os.fstat(fd)
        try:
            here = os.stat(self.path(run_id))
        except FileNotFoundError:
            raise Replaced from None
        if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
            raise Replaced  # deleted (and maybe started again) since fd was opened
        file_id, end, count = self._end(run_id, fd, st.st_size)
        if position < count:
            raise PositionTaken(run_id, position)
        if position > count:
            raise gap_error(run_id, position)
        data = frame(entry) if end else MAGIC + file_id + frame(entry)
        try:
            view = memoryview(data)
            at = end
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if self._files.fsync:
                fdatasync(fd)
        except OSError:
            # A write that failed half-way leaves a torn tail: cut it now if the disk lets us.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            self._known.pop(run_id, None)
            raise
        self._remember(run_id, file_id, end + len(data), count + 1)

    def _end(self, run_id: str, fd: int, size: int) -> tuple[bytes, int, int]:
        """Return the file's id, the offset after its last whole record and the count.

        Cuts a torn tail off (the caller holds the lock, so no writer is half-way).
        """
        if size < HEADER_SIZE:
            if size:
                os.ftruncate(fd, 0)  # a torn first write: start the file again
            return os.urandom(8), 0, 0
        head = os.pread(fd, HEADER_SIZE, 0)
        if head[: len(MAGIC)] != MAGIC:
            raise CorruptRecord(run_id, 0, f"{self.path(run_id)} is not a log segment")
        file_id = head[len(MAGIC) :]
        known = self._known.get(run_id)
        # The file id tells this file from one deleted before it (its inode may be reused).
        if known is not None and known[0] == file_id and known[1] <= size:
            # Records once whole are never cut: only what follows them can have changed.
            _, end, count = known
            if end == size:
                return file_id, end, count
        else:
            end, count = HEADER_SIZE, 0
        found = parse(os.pread(fd, size - end, end), end, count)
        if found.damage is not None:
            # Appending after damage would put the entry at a position no reader can reach.
            raise CorruptRecord(run_id, count + len(found.records), found.damage)
        count += len(found.records)
        if found.end < size:
            os.ftruncate(fd, found.end)  # a torn tail
        self._remember(run_id, file_id, found.end, count)
        return file_id, found.end, count

    def _remember(self, run_id: str, file_id: bytes, end: int, count: int) -> None:
        known = self._known
        known[run_id] = (file_id, end, count)
        known.move_to_end(run_id)
        if len(known) > _CACHE_RUNS:
            known.popitem(last=False)


class Replaced(Exception):
    """The segment was removed or replaced between its opening and its lock: open it again."""
