"""Build the backend and the schedulers that a configuration names."""

from __future__ import annotations

from metis_stream.backends.base import Backend
from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import EMIT_SCRIPT, ClusterConfig, Config, ConfigError
from metis_stream.schedulers.base import Scheduler
from metis_stream.schedulers.local import LocalScheduler


def build_backend(config: Config) -> Backend:
    server = config.server
    if server.redis_url:
        raise ConfigError("the redis backend is not available yet")
    return MemoryBackend(max_events_per_job=server.max_events_per_job)


def build_schedulers(config: Config) -> dict[str, Scheduler]:
    return {name: _scheduler(config, cluster) for name, cluster in config.clusters.items()}


def _scheduler(config: Config, cluster: ClusterConfig) -> Scheduler:
    if cluster.scheduler == "local":
        return LocalScheduler(cluster.name, jobs_dir=config.state_dir / "jobs" / cluster.name,
                              emit_script=EMIT_SCRIPT, poll_interval=cluster.poll_interval)
    raise ConfigError(f"[clusters.{cluster.name}]: scheduler {cluster.scheduler!r} "
                      "is not available yet")
