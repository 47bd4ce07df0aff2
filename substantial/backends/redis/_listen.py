"""Wake-ups over Redis pub/sub, on a connection of the listener's own.

Writes that make work due ``PUBLISH`` their due time on the prefix's
channel. The listener turns a time that has come into ``Waker.notify()``
and arms a local timer for a later one. Messages sent while it is
disconnected are lost, so after every reconnection it wakes its worker
once, and workers keep polling with a timeout as the fallback.
"""

from __future__ import annotations

import asyncio
import time

from redis import exceptions as rx
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from substantial.backends.base import Waker
from substantial.backends.redis._errors import Client, Health, log

__all__ = ["Listener"]

# How often an idle pub/sub connection is checked with PING, in seconds; a
# connection silent for three times as long is treated as dead.
_PING_EVERY = 5.0


class Listener:
    """Keep one subscription to the wake channel; reconnect with backoff."""

    def __init__(self, client: Client, channel: str, waker: Waker, health: Health) -> None:
        self._client = client
        self._channel = channel
        self._waker = waker
        self._health = health
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._closed = False
        #: Set while the subscription is in place.
        self.subscribed = asyncio.Event()

    def start(self) -> None:
        """Start listening in the background (once), from the running event loop."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(
                self._listen(), name=f"substantial.redis listener {self._health.where}"
            )

    def _on_signal(self, data: bytes) -> None:
        try:
            at = float(data)
        except ValueError:
            at = 0.0
        delay = at - time.time()
        if delay <= 0:
            self._waker.notify()
            return
        # A timer set by another process: wake when it falls due. Only the
        # earliest is kept; a later one is found by the poll after that wake.
        if self._timer is not None and self._timer_at <= at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._waker.notify()

    async def _pubsub_client(self) -> Redis:
        """Return a client for the subscription whose errors reach us at once.

        Its own reconnection loop (below) backs off, logs and wakes waiters
        after a reconnect; the driver's silent retries would hide the gap in
        which messages were lost. On a cluster, PUBLISH reaches every node,
        so subscribing on any one node is enough.
        """
        connection_class: type[AbstractConnection]
        if isinstance(self._client, RedisCluster):
            await self._health.initialize()
            node = self._client.get_random_node()
            kwargs = dict(node.connection_kwargs)
            kwargs.update(host=node.host, port=node.port)
            connection_class = node.connection_class
        else:
            kwargs = dict(self._client.connection_pool.connection_kwargs)
            connection_class = self._client.connection_pool.connection_class
        kwargs["retry"] = Retry(NoBackoff(), 0)
        pool = ConnectionPool(connection_class=connection_class, **kwargs)
        return Redis.from_pool(pool)

    async def _listen(self) -> None:
        failures = 0
        while not self._closed:
            if failures:
                await asyncio.sleep(min(1.0, 0.05 * 2**failures))
            try:
                client = await self._pubsub_client()
            except (rx.RedisError, OSError, TimeoutError) as exc:
                self._health.note_down(exc)
                failures += 1
                continue
            pubsub = client.pubsub()
            try:
                await self._subscribe(pubsub, resubscribed=failures > 0)
                failures = 0
                await self._receive(pubsub)
            except (rx.RedisError, OSError, TimeoutError) as exc:
                self.subscribed.clear()
                self._health.note_down(exc)
                failures += 1
            except Exception:
                # Never let wake-ups die: log the surprise and start over.
                self.subscribed.clear()
                log.exception(
                    "Redis wake-up listener of %s failed; restarting it", self._health.where
                )
                failures += 1
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()

    async def _subscribe(self, pubsub: PubSub, *, resubscribed: bool) -> None:
        await pubsub.subscribe(self._channel)
        while not self._closed and await pubsub.get_message(timeout=_PING_EVERY) is None:
            pass  # the subscribe confirmation
        self.subscribed.set()
        self._health.note_up()
        if resubscribed:
            # Signals sent while we were away are lost: make waiters poll.
            self._waker.notify()

    async def _receive(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()
        pinged = False
        while not self._closed:
            message = await pubsub.get_message(timeout=_PING_EVERY)
            if message is not None:
                heard = loop.time()
                pinged = False
                if message["type"] == "message":
                    self._on_signal(message["data"])
                continue
            if loop.time() - heard > 3 * _PING_EVERY:
                raise rx.ConnectionError("no answer to PING on the pub/sub connection")
            if not pinged:
                await pubsub.ping()
                pinged = True

    async def close(self) -> None:
        """Stop listening; the listener cannot be started again."""
        self._closed = True
        await self.stop()

    async def stop(self) -> None:
        """Stop listening; :meth:`start` (in this loop or another) starts again."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        task, self._task = self._task, None
        # Repeated: redis-py can swallow a cancel that lands mid-call.
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.1)
