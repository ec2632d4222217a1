"""How the Redis backend connects: the same settings for the command pool and the
pub/sub connection, and a lost or refused connection turned into BackendUnavailable.

No I/O here: the pools open connections when they are first used.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from metis_stream.errors import BackendUnavailable

CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


def _options(socket_timeout: float) -> dict[str, Any]:
    return {
        "socket_timeout": socket_timeout, "socket_connect_timeout": socket_timeout,
        "socket_keepalive": True, "protocol": 2,
        # No automatic retry: a retried EVALSHA whose reply was lost would append twice.
        # The caller gets BackendUnavailable and retries with idempotency ids instead.
        "retry": Retry(NoBackoff(), 0),
    }


def command_client(url: str, *, name: str, socket_timeout: float,
                   max_connections: int) -> Redis:
    """The client for every command but pub/sub; a caller waits up to ``socket_timeout``
    for one of its ``max_connections`` connections."""
    pool = BlockingConnectionPool.from_url(url, max_connections=max_connections,
                                           timeout=socket_timeout, client_name=name,
                                           **_options(socket_timeout))
    return Redis.from_pool(pool)


def pubsub_factory(url: str, *, name: str, socket_timeout: float) -> ConnectionPool:
    """Used only to make the one pub/sub connection with the same settings."""
    return ConnectionPool.from_url(url, client_name=f"{name}:pubsub",
                                   **_options(socket_timeout))


@contextmanager
def unavailable_on_errors() -> Iterator[None]:
    """Turn a lost or refused connection into BackendUnavailable: the caller may retry."""
    try:
        yield
    except CONNECTION_ERRORS as exc:
        raise BackendUnavailable(f"Redis is unreachable: {exc}") from exc
