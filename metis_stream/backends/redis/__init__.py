"""The Redis backend: :class:`RedisBackend`. docs/redis.md has the operator's view."""

from metis_stream.backends.redis.backend import RedisBackend

__all__ = ["RedisBackend"]
