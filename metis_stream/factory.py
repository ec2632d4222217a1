"""Build the backend and the schedulers that a configuration names."""

from __future__ import annotations

from pathlib import Path

from metis_stream.backends.contract import Backend
from metis_stream.backends.memory import MemoryBackend
from metis_stream.backends.redis import RedisBackend
from metis_stream.config import EMIT_SCRIPT, ClusterConfig, Config
from metis_stream.errors import ConfigError
from metis_stream.schedulers.base import Scheduler
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.schedulers.dialects import DIALECTS
from metis_stream.schedulers.local import LocalScheduler
from metis_stream.shells.agent import AgentShell
from metis_stream.shells.base import Shell
from metis_stream.shells.local import LocalShell
from metis_stream.shells.ssh import SSHShell


def build_backend(config: Config) -> Backend:
    server = config.server
    # The journal of changes is for webhooks; it is kept as long as the events it points to.
    changes_kept = server.event_retention if config.webhooks else 0.0
    if server.redis_url:
        return RedisBackend(server.redis_url, max_events_per_job=server.max_events_per_job,
                            max_job_bytes=server.max_job_bytes, retention=server.event_retention,
                            max_job_lifetime=server.max_job_lifetime, changes_kept=changes_kept)
    return MemoryBackend(max_events_per_job=server.max_events_per_job,
                         max_job_bytes=server.max_job_bytes, changes_kept=changes_kept)


def build_schedulers(config: Config, backend: Backend) -> dict[str, Scheduler]:
    return {name: build_scheduler(config, cluster, backend=backend)
            for name, cluster in config.clusters.items()}


def build_scheduler(config: Config, cluster: ClusterConfig, shell: Shell | None = None, *,
                    backend: Backend | None = None) -> Scheduler:
    """The cluster's scheduler; a batch system's over ``shell`` (which it then owns), or
    over the shell the cluster's config names (an agent's goes through ``backend``)."""
    if cluster.scheduler == "local":
        return LocalScheduler(cluster.name, jobs_dir=config.state_dir / "jobs" / cluster.name,
                              emit_script=EMIT_SCRIPT, poll_interval=cluster.poll_interval,
                              stop_jobs_on_close=cluster.stop_jobs_on_exit)
    return BatchScheduler(cluster.name, DIALECTS[cluster.scheduler],
                          shell if shell is not None else build_shell(cluster, backend),
                          workdir=cluster.workdir, poll_interval=cluster.poll_interval,
                          emit_script=EMIT_SCRIPT, command_timeout=cluster.command_timeout)


def build_shell(cluster: ClusterConfig, backend: Backend | None = None) -> Shell:
    """SSH to the cluster's login node; with no host, the scheduler's commands run here
    (a server that runs on the login node itself); with ``link = "agent"``, the cluster's
    agent, reached through the server's ``backend``."""
    if cluster.link == "agent":
        if backend is None:
            raise ConfigError(f"cluster {cluster.name} is reached through its agent, which "
                              "only a running server talks to")
        return AgentShell(cluster.name, backend, wait=cluster.agent_wait)
    if not cluster.host:
        return LocalShell()
    return SSHShell(
        cluster.host, port=cluster.port, user=cluster.user,
        known_hosts=Path(cluster.known_hosts).expanduser(),
        key_file=Path(cluster.key_file).expanduser() if cluster.key_file else None,
        passphrase=cluster.key_passphrase or None, use_agent=cluster.use_agent,
        max_sessions=cluster.max_sessions, cluster=cluster.name,
        second_factor=cluster.second_factor,
    )
