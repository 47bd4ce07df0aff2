"""Processes the backend suite starts: racing appenders, and appenders killed mid-write.

:func:`race` starts processes that each connect to the store, wait at one
barrier, then append one entry at one position: it returns each one's
``won`` or ``lost``. :func:`appender` starts a process that appends large
entries until it is killed, at most :data:`MAX_ENTRIES` of them: a writer
faster than its reader must not fill the disk (the reader of a log that
grows faster than it reads would never reach its end).

They are forked from a server process that has imported substantial and
the stores' drivers once (``forkserver``), so a race of 32 processes does
not pay for 32 interpreters importing them. A forked process is a process
like any other: SIGKILL ends it mid-write.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import queue
import traceback
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType
from typing import Any

from substantial.backends import from_url
from substantial.errors import PositionTaken

__all__ = ["MAX_ENTRIES", "appender", "big_entry", "race", "race_entry"]

#: What the processes import before they are forked: the stores shipped and their drivers.
_PRELOAD = [
    "__main__",  # else each process imports the parent's main module (pytest) again
    "substantial.testing._children",
    "substantial.backends.fs",
    "substantial.backends.sqlite",
    "substantial.backends.redis",
    "substantial.backends.s3",
    "substantial.backends.postgres",
    "aiobotocore.session",
]

#: How many entries one appender writes before it only waits to be killed.
MAX_ENTRIES = 100


def race_entry(tag: str) -> bytes:
    """Return the entry a racing appender writes: its tag."""
    return b'{"tag":"' + tag.encode() + b'"}'


def big_entry(position: int) -> bytes:
    """Return the large entry an appender writes at ``position``."""
    return b"%d:" % position + b"x" * 200_000


def _context(preload: Sequence[str]) -> ForkServerContext:
    ctx = multiprocessing.get_context("forkserver")
    # Imported once by the server, before its first fork; a module that is not installed
    # is skipped. The server lives as long as this process: the first call's store
    # module is the one added.
    ctx.set_forkserver_preload([*_PRELOAD, *preload])
    return ctx


async def _append_race(
    url: str, run_id: str, position: int, tag: str, ready: Any, go: EventType
) -> str:
    backend = from_url(url)
    try:
        await backend.read_log(run_id)  # connected before the start line
        ready.put(tag)
        go.wait()  # every process waits here; blocking the loop a moment harms nothing
        try:
            await backend.append(run_id, position, race_entry(tag))
            return "won"
        except PositionTaken:
            return "lost"
    finally:
        await backend.close()


def _race_child(
    url: str, run_id: str, position: int, tag: str, ready: Any, go: EventType, out: Any
) -> None:
    try:
        out.put((tag, asyncio.run(_append_race(url, run_id, position, tag, ready, go))))
    except BaseException:
        ready.put(tag)  # never leave the others waiting at the barrier
        out.put((tag, traceback.format_exc()))


def race(
    url: str, run_id: str, position: int, n: int, timeout: float, preload: Sequence[str] = ()
) -> list[str]:
    """Release ``n`` processes at once to append at ``position``; return each one's outcome.

    Process ``i`` writes :func:`race_entry` of ``p{i}``; its outcome is
    ``won``, ``lost``, or the traceback of what went wrong. ``preload``
    names modules the processes need (the store's backend module). Blocking:
    call it from a thread in async code.
    """
    ctx = _context(preload)
    ready, out, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_race_child, args=(url, run_id, position, f"p{i}", ready, go, out))
        for i in range(n)
    ]
    for proc in procs:
        proc.start()
    try:
        for _ in range(n):
            ready.get(timeout=timeout)
        go.set()
        outcomes = dict(out.get(timeout=timeout) for _ in range(n))
    except queue.Empty:
        raise AssertionError(f"the racing processes did not all report within {timeout}s") from None
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for q in (ready, out):
            q.close()
            q.join_thread()
    return [outcomes[f"p{i}"] for i in range(n)]


async def _append_forever(url: str, run_id: str, ready: Any) -> None:
    backend = from_url(url)
    start = len(await backend.read_log(run_id))
    ready.put(start)
    for position in range(start, start + MAX_ENTRIES):
        await backend.append(run_id, position, big_entry(position))
    await asyncio.sleep(3600)


def _appender_child(url: str, run_id: str, ready: Any) -> None:
    asyncio.run(_append_forever(url, run_id, ready))


def appender(url: str, run_id: str, timeout: float, preload: Sequence[str] = ()) -> BaseProcess:
    """Start a process appending :func:`big_entry` to ``run_id``; return it once connected.

    Blocking: call it from a thread in async code. End it with ``kill()``.
    """
    ctx = _context(preload)
    ready = ctx.Queue()
    proc = ctx.Process(target=_appender_child, args=(url, run_id, ready), daemon=True)
    proc.start()
    try:
        ready.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.join()
        raise AssertionError(f"the appender did not connect within {timeout}s") from None
    finally:
        ready.close()
        ready.join_thread()
    return proc
