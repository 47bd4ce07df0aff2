"""The one place redis-py's errors become Substantial's, and outages are logged once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from types import TracebackType

from redis import exceptions as rx
from redis.asyncio import Redis, RedisCluster

from substantial.backends._common import release_with_loop
from substantial.errors import BackendError, BackendUnavailable

__all__ = ["Client", "Health", "log"]

log = logging.getLogger("substantial.redis")

Client = Redis | RedisCluster

# Errors that mean "not reachable right now": the call did not happen, or
# can be retried as it is. Authentication errors subclass ConnectionError
# but are not transient, so they are caught before these.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.ReadOnlyError,
    rx.ClusterError,
    rx.SlotNotCoveredError,
    OSError,
    TimeoutError,
)
_DENIED = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)


class Health:
    """Translate driver errors for one client, and say once when its server goes and comes."""

    def __init__(self, client: Client, where: str, release: Callable[[], Awaitable[None]]) -> None:
        self._client = client
        self.where = where
        self._release = release
        self._guard: AsyncGenerator[None, None] | None = None
        # A cluster client must learn the topology once before concurrent
        # use: redis-py 8 breaks connections when many first calls race.
        self._initialized = not isinstance(client, RedisCluster)
        self._init_lock = asyncio.Lock()
        self._down_since: float | None = None

    def io(self, what: str) -> _IO:
        """Translate driver errors into the Substantial tree (the one place that does).

        Use as ``async with health.io("append"): ...``. Also re-raise a
        cancellation that the driver swallowed (see
        :func:`~substantial.backends._common.reraise_lost_cancel`): a
        cancelled worker must stop.
        """
        return _IO(self, what)

    async def _prepare(self) -> None:
        if self._guard is None:
            # Released when this loop shuts down if nobody closes the backend first.
            self._guard = await release_with_loop(self._released)
        if not self._initialized:
            await self.initialize()

    def _translate(self, exc: Exception, what: str) -> Exception | None:
        """Return the Substantial error for a driver error, or None to let it through."""
        if isinstance(exc, _DENIED):
            return BackendError(
                f"Redis at {self.where} refused {what}: {exc}. Check the user and password "
                "in the URL and that the ACL allows this key prefix"
            )
        if isinstance(exc, rx.OutOfMemoryError):
            return BackendError(
                f"Redis at {self.where} is out of memory ({what}): raise maxmemory; "
                "keep maxmemory-policy noeviction, evicting keys would lose runs"
            )
        if isinstance(exc, _UNAVAILABLE):
            self.note_down(exc)
            return BackendUnavailable(
                f"Redis at {self.where} is unavailable ({what}): {type(exc).__name__}: "
                f"{exc}. Nothing was written, or the call can be retried as it is"
            )
        if isinstance(exc, (rx.RedisError, rx.RedisClusterException)):
            return BackendError(f"Redis at {self.where} rejected {what}: {exc}")
        return None

    async def _released(self) -> None:
        self._guard = None
        await self._release()

    async def release(self) -> None:
        """Release the connections now (once), whether or not a loop guards them."""
        guard, self._guard = self._guard, None
        if guard is not None:
            await guard.aclose()
        else:
            await self._release()

    async def initialize(self) -> None:
        """Let a cluster client learn the topology (once)."""
        async with self._init_lock:
            if not self._initialized and isinstance(self._client, RedisCluster):
                await self._client.initialize()
            self._initialized = True

    def note_down(self, exc: BaseException) -> None:
        """Log the start of an outage: one line per outage, however many calls fail during it."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning(
                "Redis at %s is unreachable (%s: %s); reconnecting with backoff, "
                "calls fail with BackendUnavailable until it is back",
                self.where,
                type(exc).__name__,
                exc,
            )

    def note_up(self) -> None:
        """Log the end of an outage."""
        if self._down_since is not None:
            log.info(
                "Redis at %s is reachable again after %.1f s",
                self.where,
                time.monotonic() - self._down_since,
            )
            self._down_since = None


class _IO:
    """The context :meth:`Health.io` returns: a class, not a generator, as it wraps every call."""

    __slots__ = ("_cancels", "_health", "_task", "_what")

    def __init__(self, health: Health, what: str) -> None:
        self._health = health
        self._what = what

    async def __aenter__(self) -> None:
        # As reraise_lost_cancel: the task's cancel count before the call.
        self._task = task = asyncio.current_task()
        self._cancels = task.cancelling() if task is not None else 0
        health = self._health
        if health._guard is None or not health._initialized:
            try:
                await health._prepare()
            except Exception as exc:
                mapped = health._translate(exc, self._what)
                if mapped is None:
                    raise
                raise mapped from exc

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        health = self._health
        if exc is None:
            task = self._task
            if task is not None and task.cancelling() > self._cancels:
                raise asyncio.CancelledError  # a cancel the driver swallowed
            if health._down_since is not None:
                health.note_up()
            return
        if isinstance(exc, Exception):
            mapped = health._translate(exc, self._what)
            if mapped is not None:
                raise mapped from exc
