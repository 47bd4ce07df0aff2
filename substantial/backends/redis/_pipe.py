"""Group commit for Redis: the commands of one event-loop iteration share one round trip.

A worker drives many runs in one process. Their appends, leases and
metadata writes, issued by tasks woken together, are sent as one pipeline
(on a cluster, one pipeline per node, sent side by side) instead of one
round trip each. Each command keeps its own outcome: a reply that is an
error (a refused append, a wrong key type) fails only the command that got
it. When the connection drops, the whole pipeline is sent again (redis-py's
retry policy, ``_trip.py``); every command the backend pipelines may run
twice (an append is recognised by its token, the rest are idempotent), and
if the retries fail every command of the batch fails with the same error.
At most :data:`MAX_IN_FLIGHT` round trips are in flight at once; commands
issued meanwhile join the next batch.

Why a round trip is worth saving: on a loaded 2-core machine the client
spends 80-130 us of CPU on one command sent alone (the socket write and
read, the connection pool), the server 10-25 us; in a pipeline of sixty,
each command costs the client 8-12 us (packing and parsing), see
bench/bench_redis_pipe.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from substantial.backends.redis._errors import Client
from substantial.backends.redis._trip import Command, RoundTrip

__all__ = ["MAX_IN_FLIGHT", "Command", "Pipe"]

#: Round trips one client keeps in flight at once. Commands issued meanwhile
#: wait in the next batch, which grows instead of taking more connections (a
#: cluster node refuses a client past its connection limit).
MAX_IN_FLIGHT = 4


class _Item:
    """A queued group of commands and the future of their replies."""

    __slots__ = ("commands", "fut")

    def __init__(self, commands: Sequence[Command], fut: asyncio.Future[list[Any]]) -> None:
        self.commands = commands
        self.fut = fut


class Pipe:
    """Queue the commands of one loop iteration and send them together.

    ``enabled`` False sends every call on its own (one round trip each), as
    a backend without group commit does.
    """

    def __init__(
        self, client: Client, *, enabled: bool = True, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        self._client = client
        self._trip = RoundTrip(client)
        self.enabled = enabled
        self._max_in_flight = max_in_flight
        self._in_flight = 0
        #: A batch is open and waits for a round trip in flight to end.
        self._waiting = False
        self._batch: list[_Item] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loading: dict[str, asyncio.Task[Any]] = {}

    @property
    def resends(self) -> int:
        """Round trips sent again after their connection dropped (not counted on a cluster)."""
        return self._trip.resends

    async def call(self, *command: Any) -> Any:
        """Send one command with the others of this iteration; return its reply or raise."""
        (reply,) = await self.group((command,))
        return reply

    async def group(self, commands: Sequence[Command], *, raise_on_error: bool = True) -> list[Any]:
        """Send the commands together, with the others of this iteration; return their replies.

        On a single server they run in this order, none of this client's
        between them. A cluster pipeline gives each node its own commands, so
        there the order across keys is not kept: send those one by one.
        ``raise_on_error`` raises the first error a command got (the others
        still ran); otherwise errors come back in their places.
        """
        loop = asyncio.get_running_loop()
        if self._alone(loop):
            self._in_flight += 1
            try:
                replies = await self._trip.send(commands)
            finally:
                self._landed()
        else:
            replies = await self._queue(loop, commands)
        if raise_on_error:
            for reply in replies:
                if isinstance(reply, BaseException):
                    raise reply
        return replies

    def _alone(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Return whether to send a call at once rather than with a batch."""
        if loop is not self._loop:
            # A loop that ended may have left a batch that never left, or a count
            # of round trips that never landed: they belong to it, not to this one.
            self._loop, self._batch, self._waiting, self._in_flight = loop, None, False, 0
            self._flushes = set()
        if not self.enabled:
            return True
        return (
            self._batch is None
            and self._in_flight < self._max_in_flight
            and _nobody_else_ready(loop)
        )

    def _landed(self) -> None:
        """Note that a round trip ended; send the batch that waited for it."""
        self._in_flight -= 1
        if self._waiting:
            self._waiting = False
            self._send()

    async def _queue(
        self, loop: asyncio.AbstractEventLoop, commands: Sequence[Command]
    ) -> list[Any]:
        if self._batch is None:
            self._batch = []
            # Runs after every callback already queued: each task that is ready in
            # this iteration gets to add its commands before the batch leaves.
            loop.call_soon(self._send)
        fut: asyncio.Future[list[Any]] = loop.create_future()
        self._batch.append(_Item(commands, fut))
        return await fut

    def _send(self) -> None:
        if self._batch is None:
            return
        if self._in_flight >= self._max_in_flight:
            self._waiting = True  # the batch grows until a round trip ends
            return
        batch, self._batch = self._batch, None
        self._in_flight += 1
        self._flushes.add(asyncio.get_running_loop().create_task(self._flush(batch)))

    async def _flush(self, batch: list[_Item]) -> None:
        try:
            await self._send_batch(batch)
        finally:
            # Not a done callback: that would sit in the loop's ready queue and keep
            # the next lone command from going out at once.
            self._flushes.discard(asyncio.current_task())
            self._landed()

    async def _send_batch(self, batch: list[_Item]) -> None:
        # A caller cancelled before the batch left gets no command sent: its
        # cancel means "did not happen".
        live = [item for item in batch if not item.fut.done()]
        if not live:
            return
        try:
            # A reply that is an error comes back in its place: it fails one command.
            replies = await self._trip.send([c for item in live for c in item.commands])
        except BaseException as exc:
            for item in live:
                if item.fut.done():
                    continue
                if isinstance(exc, Exception):
                    item.fut.set_exception(_own_copy(exc))
                else:
                    item.fut.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for item in live:
            end = start + len(item.commands)
            if not item.fut.done():
                item.fut.set_result(replies[start:end])
            start = end

    async def load_script(self, sha: str, source: Any) -> None:
        """Load a script the server lost: once, however many calls found it missing.

        A batch of appends that all got NOSCRIPT would otherwise send as many
        SCRIPT LOADs at once, and on a cluster exhaust a node's connections.
        """
        loop = asyncio.get_running_loop()
        loading = self._loading.get(sha)
        if loading is None or loading.get_loop() is not loop:
            loading = loop.create_task(self._load(source))
            self._loading[sha] = loading
            loading.add_done_callback(lambda done: _forget(self._loading, sha, done))
        await asyncio.shield(loading)

    async def _load(self, source: Any) -> str:
        return str(await self._client.script_load(source))

    async def release(self) -> None:
        """Give the connections kept between round trips back to the client's pool."""
        await self._trip.release()

    async def drain(self) -> None:
        """Wait until every batch that has left is settled."""
        while self._batch is not None or self._flushes:
            if self._flushes:
                await asyncio.wait(set(self._flushes))
            else:
                await asyncio.sleep(0)


def _nobody_else_ready(loop: asyncio.AbstractEventLoop) -> bool:
    """Return whether no other callback is queued before the next poll.

    Then no other task can join a batch before this command would leave, so
    waiting for one only adds latency (asyncio's private queue; other loops
    always batch).
    """
    ready = getattr(loop, "_ready", None)
    return ready is not None and not ready


def _forget(loading: dict[str, asyncio.Task[Any]], sha: str, done: asyncio.Task[Any]) -> None:
    if loading.get(sha) is done:
        del loading[sha]
    if not done.cancelled():
        done.exception()  # retrieved: each waiter raises it through the shield


def _own_copy(exc: Exception) -> Exception:
    """Return an instance of its own for each caller, so tracebacks stay apart."""
    try:
        own = type(exc)(*exc.args)
    except Exception:
        return exc
    own.__cause__ = exc.__cause__
    return own
