"""Outages of the real test cluster while its jobs run (docs/clusters.md): sshd down (the
cluster is ``unreachable``) and slurmctld down (``degraded``), through Slurm itself and
through its PBS wrappers. A real server process polls every second; its watchers are real
websockets.

Each test runs two jobs through one outage of a few polls: the ``waiter`` runs through it
and reports its own end after it; the ``quitter`` ends during it, having taken its token
away, so that only the scheduler and the job's ``exit`` file can tell how it ended, and
the monitor must ask them once the cluster answers again. No job may be judged from the
outage: both keep running while it lasts, their watchers hear of it exactly once each
way, and each ends with its real exit status. (A job whose token is gone stands for one
that cannot call back either: on a real cluster the compute nodes may lose the server
when the login node does.) Two jobs a test: the node has a job slot per CPU, often two.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from metis_stream.clusters import CAUSES, ClusterState
from metis_stream.monitor import MISSES_BEFORE_VANISHED
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.server import ServerProcess, script_templates
from tests.test_cluster_e2e import HEADERS, cluster_block, get_job, home_of, make_server, submit
from tests.test_launcher_cluster import log_lines, watch

pytestmark = pytest.mark.cluster

SCHEDULERS = ("slurm", "pbs")
POLL_INTERVAL = 1.0

SCRIPTS = {
    # Runs through the outage, and reports its own end after it.
    "waiter": 'while [ ! -e "$METIS_JOB_DIR/go" ]; do sleep 0.2; done\necho "after the outage"\n',
    # Ends during the outage with the status that its go file holds, without its token:
    # nothing it does can tell the server how it ended.
    "quitter": 'while [ ! -e "$METIS_JOB_DIR/go" ]; do sleep 0.2; done\n'
               'rm -f "$METIS_TOKEN_FILE"\nexit "$(cat "$METIS_JOB_DIR/go")"\n',
}


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess
    base: str
    scheduler_ids: list[str] = field(default_factory=list)

    def job_dir(self, scheduler: str, job_id: str) -> str:
        return f"{home_of(self.cluster)}/{self.base}/{scheduler}/jobs/{job_id}"


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("outage")
    base = f"outage-{folder.name}"
    config = ""
    for name in SCHEDULERS:
        config += cluster_block(test_cluster, name, name, known_hosts=test_cluster.known_hosts,
                                poll_interval=POLL_INTERVAL, workdir=f"{base}/{name}")
        config += script_templates(folder / "scripts", SCRIPTS, cluster=name,
                                   suffix=f"_{name}")
    state = Env(test_cluster, make_server(test_cluster, folder / "server", config), base)
    try:
        yield state
    finally:
        state.server.stop()
        for scheduler_id in state.scheduler_ids:
            test_cluster.run_as_user(["scancel", scheduler_id])
        test_cluster.run_as_user(["rm", "-rf", base])


def cluster_health(server: ServerProcess, name: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/clusters", headers=HEADERS, timeout=10)
    assert response.status_code == 200, response.text
    [health] = [c for c in response.json()["clusters"] if c["name"] == name]
    assert isinstance(health, dict)
    return health


def polls_after(server: ServerProcess, name: str, since: float, count: int,
                timeout: float) -> dict[str, Any]:
    """The cluster's health once ``count`` polls ended after ``since`` (each poll sets
    ``checked``). A poll in an outage may take a while: Slurm's commands retry for about
    10 s (MessageTimeout) before they give up on slurmctld."""
    seen: set[float] = set()
    deadline = time.monotonic() + timeout
    while True:
        health = cluster_health(server, name)
        if health["checked"] > since:
            seen.add(health["checked"])
        if len(seen) >= count:
            return health
        assert time.monotonic() < deadline, f"{len(seen)} polls of {name} in {timeout:.0f} s"
        time.sleep(0.2)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.2)
    return found


@contextlib.contextmanager
def outage(cluster: TestCluster, down: str) -> Iterator[None]:
    """sshd or slurmctld stopped while the block runs, and whole again after it."""
    stop, start = {"sshd": (cluster.stop_sshd, cluster.start_sshd),
                   "slurmctld": (cluster.stop_slurmctld, cluster.start_slurmctld)}[down]
    stop()
    try:
        yield
    finally:
        start()


# Each outage, each scheduler and each way to end meet: exit 3 must be fatal with status
# 3, exit 0 completed, never "vanished".
@pytest.mark.parametrize(("down", "state", "scheduler", "status"), [
    ("sshd", "unreachable", "slurm", 3),
    ("sshd", "unreachable", "pbs", 0),
    ("slurmctld", "degraded", "slurm", 0),
    ("slurmctld", "degraded", "pbs", 3),
])
def test_an_outage_ends_no_job_and_each_ends_with_its_real_exit_status(
        env: Env, down: str, state: ClusterState, scheduler: str, status: int) -> None:
    cluster, server = env.cluster, env.server
    log_at = len(server.log())
    jobs = {name: submit(server, f"{name}_{scheduler}")["id"] for name in SCRIPTS}

    def go(name: str, content: str = "") -> None:
        # Whole at once: the quitter reads its exit status from the file it waits for.
        job_dir = env.job_dir(scheduler, jobs[name])
        cluster.run_as_user(["sh", "-c", 'printf %s "$1" > "$2.new" && mv "$2.new" "$2"',
                             "sh", content, f"{job_dir}/go"], check=True)

    with ThreadPoolExecutor(len(jobs)) as pool:
        watchers = {name: pool.submit(watch, server, job_id, 90)
                    for name, job_id in jobs.items()}
        try:
            # Both run before the outage, so that the quitter can end during it.
            wait_for(lambda: all(get_job(server, j)["state"] == "running"
                                 for j in jobs.values()), 30, "both jobs to run")
            env.scheduler_ids += [get_job(server, j)["scheduler_id"] for j in jobs.values()]
            with outage(cluster, down):
                down_health = wait_for(
                    lambda: ((h := cluster_health(server, scheduler))["state"]
                             not in ("ok", "unknown") and h),
                    20, f"the cluster to be seen {state}")
                go("quitter", str(status))
                exit_file = f"{env.job_dir(scheduler, jobs['quitter'])}/exit"
                wait_for(lambda: cluster.run_as_user(["test", "-e", exit_file]).returncode == 0,
                         15, "the quitter to end")
                # As many failed polls as would count a job missing from a poll that
                # worked as gone.
                last = polls_after(server, scheduler, time.time(), MISSES_BEFORE_VANISHED, 40)
                during = {name: get_job(server, job_id)["state"]
                          for name, job_id in jobs.items()}
            up_health = wait_for(
                lambda: (h := cluster_health(server, scheduler))["state"] == "ok" and h,
                40, "the cluster to be seen ok again")
            go("waiter")
        except BaseException:
            # The jobs end, and their watchers with them.
            for name in jobs:
                with contextlib.suppress(Exception):
                    go(name, "1")
            raise
        seen = {name: watcher.result().events for name, watcher in watchers.items()}

    assert down_health["state"] == state, down_health
    assert down_health["since"] > 0 and down_health["last_error"], down_health
    assert last["state"] == state and last["since"] == down_health["since"], last
    assert during == {"waiter": "running", "quitter": "running"}
    assert up_health["last_error"] == "" and up_health["since"] > down_health["since"]
    for name, events in seen.items():
        kinds = [e["type"] for e in events]
        assert kinds.count("stale") == 1 and kinds.count("recovered") == 1, (name, kinds)
        stale, recovered = kinds.index("stale"), kinds.index("recovered")
        assert stale < recovered < len(kinds) - 1, (name, kinds)
        assert events[stale]["data"] == {"cluster": scheduler, "state": state,
                                         "cause": CAUSES[state]}
        assert events[recovered]["data"]["cluster"] == scheduler
        assert events[recovered]["data"]["stale_for"] == pytest.approx(
            up_health["since"] - down_health["since"], abs=0.06)
    waiter_end, quitter_end = seen["waiter"][-1], seen["quitter"][-1]
    assert (waiter_end["type"], waiter_end["data"]) == ("completed", {"exit_status": 0})
    assert log_lines(seen["waiter"]) == ["after the outage"]
    if status == 0:
        assert quitter_end["type"] == "completed", seen["quitter"]
        assert quitter_end["data"]["exit_status"] == 0
        assert quitter_end["data"]["source"] == "monitor"
    else:
        assert quitter_end["type"] == "fatal", seen["quitter"]
        assert quitter_end["data"]["exit_status"] == status
    # Judged from what the scheduler knows of it, never as a job it forgot.
    assert quitter_end["data"]["scheduler_state"] != "unknown", quitter_end
    assert "vanished" not in str(quitter_end["data"])
    assert get_job(server, jobs["quitter"])["state"] == ("completed" if status == 0
                                                         else "failed")
    # The outage is logged once; a spool read may meet it before the poll does.
    log = server.log()[log_at:]
    assert log.count(f"cluster {scheduler}: {state} (") == 1, log
    assert log.count(f"spool reader of cluster {scheduler}: read failed") <= 1, log
    print(f"[{down} down, {scheduler}] {state} for {up_health['since'] - down_health['since']:.1f}"
          f" s ({down_health['last_error']}); the quitter: {quitter_end['data']}")

