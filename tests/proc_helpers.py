"""Entry points run in child processes by the race and crash tests.

``python -m tests.proc_helpers append-race URL RUN POSITION TAG START_AT``
appends one entry at a fixed position once the wall clock reaches START_AT
and prints ``won`` or ``lost``.

``python -m tests.proc_helpers append-forever URL RUN`` appends large
entries until it is killed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from substantial.backends import from_url
from substantial.errors import PositionTaken
from substantial.records import encode_entry


async def append_race(url: str, run_id: str, position: int, tag: str, start_at: float) -> None:
    backend = from_url(url)
    try:
        entry = encode_entry([{"k": "step", "c": 0, "name": "race", "value": tag}])
        await backend.read_log(run_id)  # connect before the start line
        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            await backend.append(run_id, position, entry)
            print("won", flush=True)
        except PositionTaken:
            print("lost", flush=True)
    finally:
        await backend.close()


async def append_forever(url: str, run_id: str) -> None:
    backend = from_url(url)
    position = len(await backend.read_log(run_id))
    blob = "x" * 200_000
    print("ready", flush=True)
    while True:
        await backend.append(
            run_id,
            position,
            encode_entry([{"k": "step", "c": position, "name": str(position), "value": blob}]),
        )
        position += 1


def main() -> None:
    cmd, *args = sys.argv[1:]
    if cmd == "append-race":
        asyncio.run(append_race(args[0], args[1], int(args[2]), args[3], float(args[4])))
    elif cmd == "append-forever":
        asyncio.run(append_forever(args[0], args[1]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")


if __name__ == "__main__":
    main()
