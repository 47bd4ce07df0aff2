"""Wake-ups over LISTEN/NOTIFY, on a connection of the listener's own.

Writes that make work due send ``pg_notify(<prefix>_wake, <due time>)`` in
the same statement, so the notification is delivered at commit. The
listener turns a time that has come into ``Waker.notify()`` and arms a local
timer for a later one. Notifications sent while it is disconnected are lost,
so after every reconnection it wakes its worker once, and workers keep
polling with a timeout as the fallback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from substantial.backends.base import Waker

__all__ = ["Listener"]

log = logging.getLogger("substantial.postgres")

# How often the idle listening connection is checked with a query, in seconds.
_PING_EVERY = 5.0


class Listener:
    """Keep one connection LISTENing on the prefix's channel; reconnect with backoff."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        waker: Waker,
        where: str,
        is_connection_error: Callable[[BaseException], bool],
    ) -> None:
        self._connect = connect
        self._channel = channel
        self._waker = waker
        self._where = where
        self._is_connection_error = is_connection_error
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        #: Set while the LISTEN is in place.
        self.listening = asyncio.Event()

    def start(self) -> None:
        """Start listening in the background (once), from the running event loop."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"substantial.postgres listener {self._where}"
            )

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            at = float(payload)
        except ValueError:
            at = 0.0
        delay = at - time.time()
        if delay <= 0:
            self._waker.notify()
            return
        # Work due later (a timer set by any process): wake when it falls due. Only
        # the earliest is kept; a later one is found by the poll after that wake.
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._waker.notify()

    async def _run(self) -> None:
        failures = 0
        connected_before = False
        while not self._closed:
            if failures:
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
            conn: Any = None
            try:
                conn = await self._connect()
                lost = asyncio.Event()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(self._channel, self._on_notify)
                self.listening.set()
                if failures:
                    log.info("Postgres wake-ups from %s are back", self._where)
                if connected_before:
                    # Notifications sent while we were away are lost: make waiters poll.
                    self._waker.notify()
                connected_before = True
                failures = 0
                await self._watch(conn, lost)
            except Exception as exc:
                if not self._is_connection_error(exc):
                    log.exception(
                        "Postgres wake-up listener of %s failed; restarting it", self._where
                    )
                elif not failures:
                    log.warning(
                        "Postgres wake-ups from %s stopped (%s); reconnecting, workers poll "
                        "meanwhile",
                        self._where,
                        type(exc).__name__,
                    )
                failures += 1
            finally:
                self.listening.clear()
                if conn is not None:
                    conn.terminate()

    async def _watch(self, conn: Any, lost: asyncio.Event) -> None:
        """Return when the connection is lost; a silent dead peer is found by a periodic query."""
        while not self._closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_PING_EVERY):
                    await lost.wait()
                raise ConnectionError("the listening connection was closed")
            await conn.fetchval("SELECT 1", timeout=_PING_EVERY)

    async def close(self) -> None:
        """Stop listening and close the connection; the listener cannot start again."""
        self._closed = True
        await self.stop()

    async def stop(self) -> None:
        """Stop listening and close the connection; :meth:`start` starts again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            # wait(), not await task: a cancel of close() itself must not be swallowed.
            await asyncio.wait({task})


def _setter(event: asyncio.Event) -> Callable[[Any], None]:
    return lambda _conn: event.set()
