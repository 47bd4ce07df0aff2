"""Child processes the backend suite starts: racing appenders, and appenders killed mid-write.

``python -m substantial.testing._children append-race URL RUN POSITION TAG START_AT``
appends one entry at a fixed position once the wall clock reaches START_AT
and prints ``won`` or ``lost``.

``python -m substantial.testing._children append-forever URL RUN`` appends
large entries until it is killed, at most :data:`MAX_ENTRIES` of them: a
writer faster than its reader must not fill the disk (the reader of a log
that grows faster than it reads would never reach its end).
"""

from __future__ import annotations

import asyncio
import sys
import time

from substantial.backends import from_url
from substantial.errors import PositionTaken

__all__ = ["MAX_ENTRIES", "big_entry", "race_entry"]

#: How many entries one ``append-forever`` child writes before it only waits to be killed.
MAX_ENTRIES = 100


def race_entry(tag: str) -> bytes:
    """Return the entry a racing appender writes: its tag."""
    return b'{"tag":"' + tag.encode() + b'"}'


def big_entry(position: int) -> bytes:
    """Return the large entry ``append-forever`` writes at ``position``."""
    return b"%d:" % position + b"x" * 200_000


async def _append_race(url: str, run_id: str, position: int, tag: str, start_at: float) -> None:
    backend = from_url(url)
    try:
        await backend.read_log(run_id)  # connect before the start line
        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await backend.append(run_id, position, race_entry(tag))
            print("won", flush=True)
        except PositionTaken:
            print("lost", flush=True)
    finally:
        await backend.close()


async def _append_forever(url: str, run_id: str) -> None:
    backend = from_url(url)
    start = len(await backend.read_log(run_id))
    print("ready", flush=True)
    for position in range(start, start + MAX_ENTRIES):
        await backend.append(run_id, position, big_entry(position))
    await asyncio.sleep(3600)


def main() -> None:
    """Run one child command from the command line."""
    cmd, *args = sys.argv[1:]
    if cmd == "append-race":
        asyncio.run(_append_race(args[0], args[1], int(args[2]), args[3], float(args[4])))
    elif cmd == "append-forever":
        asyncio.run(_append_forever(args[0], args[1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
