"""Backends: the job database and the event log with publish/subscribe.

``contract`` says what a backend does; ``memory`` is the embedded default (one
process), ``redis`` is for production. ``hub`` fans events out to this process's
watchers and ``follow`` turns any backend into the stream every watcher reads.
"""

from metis_stream.backends.contract import AppendResult, Backend
from metis_stream.backends.follow import follow
from metis_stream.backends.hub import Hub, Subscription
from metis_stream.backends.memory import MemoryBackend
from metis_stream.backends.redis import RedisBackend

__all__ = [
    "AppendResult",
    "Backend",
    "Hub",
    "MemoryBackend",
    "RedisBackend",
    "Subscription",
    "follow",
]
