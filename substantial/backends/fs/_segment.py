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
from substantial.backends.fs._files import Files, fdatasync, sync_dir
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
# Per-run cache entries are small; the bound only stops a long-lived worker from growing.
_CACHE_RUNS = 4096
# A read starts at the last remembered record start at or before its first position.
_MARK_EVERY = 256


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


@dataclass
class _Seen:
    """What this process knows of one segment: records before ``end`` are whole for good."""

    file_id: bytes
    end: int
    count: int
    #: marks[i]: where record i * _MARK_EVERY begins, for the records before ``end``.
    marks: list[int]

    def extend(self, found: Parsed, first_position: int) -> None:
        """Take in what a scan from a record at or before ``end`` found."""
        marks = self.marks
        # marks holds one offset per _MARK_EVERY records before ``count``, no more.
        for i, (at, _) in enumerate(found.records):
            if len(marks) * _MARK_EVERY == first_position + i:
                marks.append(at - _RECORD_HEAD)
        self.end = found.end
        self.count = first_position + len(found.records)


class Segments:
    """Append to and read the runs' segment files under ``runs``."""

    def __init__(self, files: Files, runs: str) -> None:
        self._files = files
        self._runs = runs
        # run id -> what this process last saw of its segment (readers and appenders alike).
        self._seen: OrderedDict[str, _Seen] = OrderedDict()

    def path(self, run_id: str) -> str:
        """Return the run's segment file name."""
        return f"{self._runs}/{run_id}/{SEGMENT}"

    def _known(self, run_id: str, file_id: bytes, size: int) -> _Seen:
        """Return what is known of this very file (none of a file it replaced)."""
        seen = self._seen.get(run_id)
        # Records once whole are never cut (only a torn tail after them), so a size
        # below ``end`` can only be another file: the file id tells (an inode may be reused).
        if seen is None or seen.file_id != file_id or seen.end > size:
            seen = _Seen(file_id, HEADER_SIZE, 0, [])
        return self._keep(run_id, seen)

    def _keep(self, run_id: str, seen: _Seen) -> _Seen:
        self._seen[run_id] = seen
        self._seen.move_to_end(run_id)
        if len(self._seen) > _CACHE_RUNS:
            self._seen.popitem(last=False)
        return seen

    def _head(self, run_id: str, fd: int) -> bytes:
        head = os.pread(fd, HEADER_SIZE, 0)
        if head[: len(MAGIC)] != MAGIC:
            raise CorruptRecord(run_id, 0, f"{self.path(run_id)} is not a log segment")
        return head[len(MAGIC) :]

    # -- reading -------------------------------------------------------------

    def read(self, run_id: str, start: int) -> list[bytes] | None:
        """Return the entries from ``start`` on; None if the run has no segment."""
        try:
            fd = os.open(self.path(run_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                return []  # created, first record not written yet (or torn)
            seen = self._known(run_id, self._head(run_id, fd), size)
            # Start at the last mark at or before ``start``: a compacted run's load
            # reads what follows its snapshot, not its whole history (once seen here).
            mark = min(start // _MARK_EVERY, len(seen.marks) - 1)
            first, at = (mark * _MARK_EVERY, seen.marks[mark]) if mark >= 0 else (0, HEADER_SIZE)
            data = os.pread(fd, size - at, at)
        finally:
            os.close(fd)
        found = parse(data, at, first)
        for position in found.bad:
            if position >= start:
                raise CorruptRecord(run_id, position, "its checksum does not match its bytes")
        if found.damage is not None:
            raise CorruptRecord(run_id, first + len(found.records), found.damage)
        if found.end > seen.end and not found.bad:
            seen.extend(found, first)
        return [data[o - at : o - at + n] for o, n in found.records[start - first :]]

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
        seen = self._end(run_id, fd, st.st_size)
        if position < seen.count:
            raise PositionTaken(run_id, position)
        if position > seen.count:
            raise gap_error(run_id, position)
        end = seen.end
        data = frame(entry) if end > HEADER_SIZE else MAGIC + seen.file_id + frame(entry)
        at = end if end > HEADER_SIZE else 0
        try:
            view = memoryview(data)
            while view:
                n = os.pwrite(fd, view, at)
                view, at = view[n:], at + n
            if self._files.fsync:
                fdatasync(fd)
        except OSError:
            # A write that failed half-way leaves a torn tail: cut it now if the disk lets us.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end if end > HEADER_SIZE else 0)
            self._seen.pop(run_id, None)
            raise
        if len(seen.marks) * _MARK_EVERY == seen.count:
            seen.marks.append(at - _RECORD_HEAD - len(entry))  # where this record begins
        seen.end, seen.count = at, seen.count + 1

    def _end(self, run_id: str, fd: int, size: int) -> _Seen:
        """Return what is known of the file once its records to the end are read.

        Cuts a torn tail off (the caller holds the lock, so no writer is half-way).
        An empty file (or one whose first write was torn) starts again with a new id.
        """
        if size < HEADER_SIZE:
            if size:
                os.ftruncate(fd, 0)
            return self._keep(run_id, _Seen(os.urandom(8), HEADER_SIZE, 0, []))
        seen = self._known(run_id, self._head(run_id, fd), size)
        if seen.end == size:
            return seen
        found = parse(os.pread(fd, size - seen.end, seen.end), seen.end, seen.count)
        if found.damage is not None:
            # Appending after damage would put the entry at a position no reader can reach.
            raise CorruptRecord(run_id, seen.count + len(found.records), found.damage)
        if found.end < size:
            os.ftruncate(fd, found.end)  # a torn tail
        seen.extend(found, seen.count)
        return seen


class Replaced(Exception):
    """The segment was removed or replaced between its opening and its lock: open it again."""
