"""One round trip: commands written at once on one connection, their replies read in order.

redis-py's ``Pipeline`` does the same with more around it: a pipeline
object per batch, a timer armed and cancelled per reply, a task per socket
write, observability hooks. For the backend's many small batches that
doubles the client's CPU per command and adds tens of microseconds per
round trip (bench/bench_redis_pipe.py measures both). This uses redis-py's
own connection, packing, parsing, reply callbacks and retry policy, and
one timeout for the whole exchange. A cluster client keeps its pipeline,
which routes each command to the node of its slot.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

from redis import exceptions as rx
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection

from substantial.backends.redis._errors import Client

try:
    from hiredis import pack_command as hiredis_pack
except ImportError:  # the redis extra installs it; without it redis-py packs in Python
    hiredis_pack = None  # type: ignore[assignment]

__all__ = ["Command", "RoundTrip"]

#: One Redis command as redis-py's ``execute_command`` takes it.
Command = tuple[Any, ...]


class RoundTrip:
    """Send commands of one client as one write; replies come back in their places."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        #: Each command name's reply callback (None: the reply as parsed), looked up once.
        self._callbacks: dict[Any, Callable[..., Any] | None] = {}
        #: Connections taken from the pool and kept between round trips (at most as
        #: many as were ever in flight at once): checking one out of redis-py's
        #: pool and back costs a lock, a condition and a timer each time.
        self._kept: list[AbstractConnection] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Counts releases: a round trip in flight during one gives its connection back.
        self._releases = 0
        #: Round trips sent again after their connection dropped: a write among them may
        #: have landed the first time, and its reply now says so ambiguously (an append's
        #: "taken" may be its own first send).
        self.resends = 0

    async def send(self, commands: Sequence[Command]) -> list[Any]:
        """Run the commands in this order in one round trip; an error reply is returned in place.

        A dropped connection or a timeout sends them all again on a new
        connection, as redis-py's retry policy says (every command the
        backend sends may run twice); when the retries are spent it raises.
        """
        if self._cluster:  # isinstance once: RedisCluster's is a slow Protocol check
            client = cast(RedisCluster, self._client)
            if len(commands) == 1:
                try:
                    return [await client.execute_command(*commands[0])]
                except rx.ResponseError as exc:
                    return [exc]
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))
        pool = cast(Redis, self._client).connection_pool
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Connections opened in a loop that ended go back to the pool, as redis-py's own.
            await self.release()
            self._loop = loop
        releases = self._releases
        if self._kept:
            conn = self._kept.pop()
        else:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        tries = 0

        def exchange() -> Awaitable[list[Any]]:
            nonlocal tries
            tries += 1
            return self._exchange(conn, commands)

        try:
            replies: list[Any] = await conn.retry.call_with_retry(
                exchange, lambda _: conn.disconnect()
            )
            if tries > 1:
                self.resends += 1  # before any caller sees these replies
        except BaseException:
            # Failed or cancelled half-way (a caller's timeout, a shutdown), replies may
            # still be on their way: on this connection the next command would read them as
            # its own. Closed, the pool opens it afresh for the next user.
            await conn.disconnect(nowait=True)
            await pool.release(conn)
            raise
        if releases == self._releases:
            self._kept.append(conn)  # every reply read: clean for the next round trip
        else:
            await pool.release(conn)  # released (closed) while it was in flight
        return replies

    async def release(self) -> None:
        """Give the connections kept between round trips back to the client's pool."""
        kept, self._kept = self._kept, []
        self._releases += 1
        for conn in kept:
            await cast(Redis, self._client).connection_pool.release(conn)

    async def _exchange(self, conn: AbstractConnection, commands: Sequence[Command]) -> list[Any]:
        # The connection is ours until released: its own per-call timeouts (a task
        # per write, a timer per reply) give way to one for the whole exchange.
        timeout, conn.socket_timeout = conn.socket_timeout, None
        try:
            async with asyncio.timeout(timeout):
                await conn.send_packed_command(_pack(conn, commands))
                replies: list[Any] = []
                for command in commands:
                    try:
                        reply = await conn.read_response(timeout=math.inf)
                    except rx.ResponseError as exc:
                        replies.append(exc)
                        continue
                    callback = self._callback(command[0])
                    replies.append(reply if callback is None else callback(reply))
                return replies
        except TimeoutError:
            # The exchange stopped half-way: what is left on the socket is not ours.
            await conn.disconnect(nowait=True)
            raise rx.TimeoutError(
                f"Timeout after {timeout} s waiting for {len(commands)} replies"
            ) from None
        finally:
            conn.socket_timeout = timeout

    def _callback(self, name: Any) -> Callable[..., Any] | None:
        try:
            return self._callbacks[name]
        except KeyError:
            found = cast(Redis, self._client).response_callbacks.get(name)
            self._callbacks[name] = found
            return found


def _pack(conn: AbstractConnection, commands: Sequence[Command]) -> list[bytes]:
    """Return the commands in the wire protocol, packed by hiredis where it can.

    hiredis packs a command in a sixth of the time redis-py's Python packer
    takes, and the same bytes for what the backend sends (str, bytes, int;
    one-word command names), with the connection's default UTF-8 encoding.
    """
    encoder = conn.encoder
    if hiredis_pack is None or encoder.encoding != "utf-8" or encoder.encoding_errors != "strict":
        return conn.pack_commands(commands)
    return [b"".join([hiredis_pack(command) for command in commands])]
