"""Scheduler truth on the real test cluster (Slurm 22.05 and its PBS wrappers, behind
sshd): the flavour in the cluster's status, a node failure in words, and dependencies.
A real server process; jobs call back with curl. The walltime kill and the ``qdel`` on
the cluster are in tests/test_cluster_e2e.py and tests/test_launcher_cluster.py.

The node failure takes the test cluster's only node down: its module runs no other job
meanwhile (the other tests here run before it and wait for their jobs' ends).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.server import ServerProcess, script_templates
from tests.test_cluster_e2e import (
    HEADERS,
    cluster_block,
    follow,
    get_job,
    make_server,
    submit,
    until_type,
)

pytestmark = pytest.mark.cluster

SCHEDULERS = ("pbs", "slurm")
SCRIPTS = {
    "quick": '"$METIS_EMIT" completed\n',
    # Ends after the test has had time to submit a job that waits for it.
    "slow_ok": 'sleep 4\n"$METIS_EMIT" completed\n',
    "slow_fail": 'sleep 4\necho "no input" >&2\nexit 1\n',
    "after": '"$METIS_EMIT" step "$(date +%s.%N)"\n"$METIS_EMIT" completed\n',
    "sleepy": '"$METIS_EMIT" step "Sleeping"\nexec sleep 300\n',
}


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess
    base: str


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("truth")
    base = f"truth-{folder.name}"
    config = ""
    for name in SCHEDULERS:
        config += cluster_block(test_cluster, name, name, known_hosts=test_cluster.known_hosts,
                                workdir=f"{base}/{name}")
        config += script_templates(folder / "scripts" / name, SCRIPTS, cluster=name,
                                   suffix=f"_{name}")
    server = make_server(test_cluster, folder / "server", config)
    try:
        yield Env(test_cluster, server, base)
    finally:
        server.stop()
        test_cluster.run_as_user(["scancel", "--user", test_cluster.user])
        test_cluster.run_as_user(["rm", "-rf", base])


def clusters(server: ServerProcess) -> dict[str, dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/clusters", headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    return {c["name"]: c for c in response.json()["clusters"]}


def scheduler_id(server: ServerProcess, job_id: str) -> str:
    events = follow(server, job_id, until=until_type("submitted"))
    return str(events[-1]["data"])


def slurm_state(cluster: TestCluster, job: str) -> str:
    shown = cluster.run_as_user(["scontrol", "-o", "show", "job", job]).stdout
    return next((w.split("=", 1)[1] for w in shown.split() if w.startswith("JobState=")), "")


# ---------------------------------------------------------------------------- flavour


def test_the_cluster_status_names_slurm_behind_the_pbs_wrappers(env: Env) -> None:
    """Both clusters are this Slurm: the `pbs` one through its qsub/qstat wrappers."""
    version = env.cluster.run_as_user(["sinfo", "--version"], check=True).stdout.split()[1]
    for name in SCHEDULERS:
        follow(env.server, submit(env.server, f"quick_{name}")["id"])
    deadline = time.monotonic() + 30
    while True:
        seen = clusters(env.server)
        if all(seen[n]["flavour"] for n in SCHEDULERS) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name in SCHEDULERS:
        assert (seen[name]["flavour"], seen[name]["version"]) == ("slurm", version), seen


# ---------------------------------------------------------------------------- dependencies


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_dependent_job_waits_then_runs_after_its_parent(env: Env, scheduler: str) -> None:
    parent = submit(env.server, f"slow_ok_{scheduler}")
    child = submit(env.server, f"after_{scheduler}", after=[parent["id"]])
    child_on_cluster = scheduler_id(env.server, child["id"])
    parent_on_cluster = get_job(env.server, parent["id"])["scheduler_id"]
    shown = env.cluster.run_as_user(["scontrol", "show", "job", child_on_cluster]).stdout
    assert f"Dependency=afterok:{parent_on_cluster}" in shown, shown
    parent_events = follow(env.server, parent["id"], timeout=60)
    child_events = follow(env.server, child["id"], timeout=60)
    assert parent_events[-1]["type"] == "completed", parent_events
    assert child_events[-1]["type"] == "completed", child_events
    started = float(next(e["data"] for e in child_events if e["type"] == "step"))
    assert started >= parent_events[-1]["time"] - 1.0, (started, parent_events[-1])


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_job_whose_parent_failed_ends_with_that_reason(env: Env, scheduler: str) -> None:
    parent = submit(env.server, f"slow_fail_{scheduler}")
    child = submit(env.server, f"after_{scheduler}", after=[parent["id"]])
    child_on_cluster = scheduler_id(env.server, child["id"])
    assert follow(env.server, parent["id"], timeout=60)[-1]["type"] == "fatal"
    end = follow(env.server, child["id"], timeout=60)[-1]
    assert end["type"] == "fatal", end
    assert end["data"] == {
        "error": "will never run: a job it depends on did not end as required",
        "exit_status": None, "scheduler_state": "PENDING, DependencyNeverSatisfied"}
    assert get_job(env.server, child["id"])["state"] == "failed"
    # Slurm would have kept it pending for ever (no kill_invalid_depend): it is gone.
    deadline = time.monotonic() + 10
    while slurm_state(env.cluster, child_on_cluster) not in ("CANCELLED", ""):
        assert time.monotonic() < deadline, slurm_state(env.cluster, child_on_cluster)
        time.sleep(0.5)


def test_a_dependency_on_a_job_of_another_cluster_is_refused(env: Env) -> None:
    parent = submit(env.server, "quick_slurm")
    response = httpx.post(f"{env.server.url}/api/jobs", headers=HEADERS, timeout=30, json={
        "template": "quick_pbs", "params": {}, "after": [parent["id"]]})
    assert response.status_code == 400, response.text
    assert "only for jobs of its own cluster" in response.json()["error"]
    unknown = httpx.post(f"{env.server.url}/api/jobs", headers=HEADERS, timeout=30, json={
        "template": "quick_pbs", "params": {}, "after": ["j_01HX0000000000000000000000"]})
    assert unknown.status_code == 404, unknown.text
    follow(env.server, parent["id"])


# ---------------------------------------------------------------------------- node failure


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_zz_a_node_failure_ends_the_job_in_words(env: Env, scheduler: str,
                                                 tmp_path: Path) -> None:
    """Last: the node goes down (slurmd killed, the node set DOWN; see
    TestCluster.failed_node for why not SlurmdTimeout) under a running job."""
    with env.cluster.without_requeue():
        job = submit(env.server, f"sleepy_{scheduler}")
        follow(env.server, job["id"], until=until_type("step"))
    failed_at = time.monotonic()
    with env.cluster.failed_node():
        end = follow(env.server, job["id"], timeout=30)[-1]
    print(f"[{scheduler}] node failure -> fatal in {time.monotonic() - failed_at:.1f} s")
    assert end["type"] == "fatal", end
    data = end["data"]
    assert data["error"] == "the node failed", data
    assert data["scheduler_state"].startswith("NODE_FAIL"), data
    # The node died before the script's end: no exit file, and Slurm has no status.
    assert data["exit_status"] is None, data
    assert get_job(env.server, job["id"])["state"] == "failed"
