"""The Redis backend, a module a concept:

- ``backend``: :class:`RedisBackend`, the job store and event log (and the key layout);
- ``scripts``: the Lua scripts, their tables generated from jobs.py and events.py;
- ``codec``: the job hash and the event wire JSON, to and from Python values;
- ``connection``: the connection settings, and lost connections as BackendUnavailable;
- ``coalescer``: concurrent appends pipelined into one round trip;
- ``listener``: the one pub/sub connection and its reader.

docs/redis.md has the operator's view.
"""

from metis_stream.backends.redis.backend import RedisBackend

__all__ = ["RedisBackend"]
