"""Opening a redis-py client from a URL, and naming it without its credentials."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from substantial.backends._redact import redact_text, redact_url
from substantial.backends.redis._errors import Client
from substantial.errors import InvalidArgument

__all__ = ["describe_client", "open_client"]


def open_client(
    url: str,
    *,
    cluster: bool,
    socket_timeout: float,
    connect_timeout: float,
    retries: int,
    max_connections: int,
) -> Client:
    """Open a client (or a cluster client) whose commands retry with exponential backoff."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries),
    }
    try:
        if cluster:
            return RedisCluster.from_url(url, **options)
        # A blocking pool makes a burst of calls queue for a
        # connection instead of failing with "too many connections".
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout, **options
        )
        return Redis.from_pool(pool)
    except ValueError as exc:
        raise InvalidArgument(
            f"invalid Redis URL {redact_url(url)!r}: {redact_text(str(exc), url)}"
        ) from None


def describe_client(client: Client) -> str:
    """Return where the client connects (host:port/db, a socket, or cluster nodes)."""
    if isinstance(client, RedisCluster):
        return "cluster " + ",".join(client.nodes_manager.startup_nodes)
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
