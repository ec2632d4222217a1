"""``metis-stream doctor`` on the real test cluster (Slurm 22.05 with its PBS wrappers,
behind sshd), run as the operator runs it: the command line, with the server's own
configuration file, while that server runs.

As in tests/test_spool_cluster.py, the server listens on this machine's 127.0.0.1, which
the cluster's namespace cannot reach; ``public_url`` names an address on the cluster's
side where a :class:`TcpProxy` forwards to the server when the test starts one. No proxy
is the route from the compute node to the server blocked.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.proxy import TcpProxy
from tests.support.server import ServerProcess, free_port
from tests.test_cluster_e2e import cluster_block

pytestmark = pytest.mark.cluster

BASE = f"doctor-{secrets.token_hex(3)}"
"""Everything this module puts in the cluster user's home lives under this folder."""
SECRET = "shared-by-the-server-and-doctor-of-this-module"
DOCTOR_TIMEOUT = 60
"""The probe job's wait: the test cluster's queue is short."""


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess
    public_port: int

    def doctor(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "metis_stream.cli", "doctor", "--config",
             str(self.server.config_path), "--timeout", str(DOCTOR_TIMEOUT), *args],
            capture_output=True, text=True, timeout=DOCTOR_TIMEOUT + 60,
            env={**os.environ, "PYTHONIOENCODING": "utf-8"})

    def doctor_json(self, cluster: str) -> tuple[int, dict[str, Any]]:
        run = self.doctor(cluster, "--json")
        assert run.stdout.count("\n") == 1, run.stdout + run.stderr
        return run.returncode, json.loads(run.stdout)


def block(cluster: TestCluster, name: str, *, delivery: str = "",
          known_hosts: Path | None = None) -> str:
    text = cluster_block(cluster, name, "pbs", known_hosts=known_hosts or cluster.known_hosts,
                         workdir=f"{BASE}/work")
    return text + (f'delivery = "{delivery}"\n' if delivery else "")


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("doctor")
    forged = test_cluster.forge_known_hosts(folder / "forged_known_hosts")
    public_port = free_port(test_cluster.server_address)
    config = (block(test_cluster, "healthy") + block(test_cluster, "http", delivery="http")
              + block(test_cluster, "spooled", delivery="spool")
              + block(test_cluster, "forged", known_hosts=forged))
    server = ServerProcess(state_dir=folder, host="127.0.0.1", extra_config=config,
                           server_settings={
                               "secret": SECRET,
                               "public_url": f"http://{test_cluster.server_address}:"
                                             f"{public_port}"})
    server.start()
    try:
        yield Env(test_cluster, server, public_port)
    finally:
        server.stop()
        listed = test_cluster.run_as_user(["squeue", "-h", "-u", test_cluster.user,
                                           "-o", "%i %o"]).stdout
        leftover = [line.split()[0] for line in listed.splitlines() if f"/{BASE}/" in line]
        if leftover:
            test_cluster.run_as_user(["scancel", *leftover])
        test_cluster.run_as_user(["rm", "-rf", BASE])


def checks(report: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {check["check"]: check for check in report["checks"]}


def test_a_healthy_cluster_passes_and_keeps_both_paths(env: Env) -> None:
    proxy = TcpProxy(env.cluster.server_address, env.public_port, "127.0.0.1", env.server.port)
    proxy.start()
    try:
        status, report = env.doctor_json("healthy")
    finally:
        proxy.stop()
    found = checks(report)
    assert status == 0, report
    assert report["ok"] is True
    assert report["recommended_delivery"] == "both"
    assert {check["status"] for check in report["checks"]} == {"ok"}, report
    assert list(found) == ["connection", "scheduler", "finished jobs", "workdir", "server",
                           "probe job", "qsub -v", "route", "spool", "delivery"]
    assert found["scheduler"]["found"].startswith("Slurm 22.05")
    assert found["scheduler"]["found"].endswith("behind its PBS wrappers")
    assert found["finished jobs"]["found"] == "stay visible 300 s (MinJobAge = 300 sec)"
    assert found["route"]["found"].endswith(
        f"reaches http://{env.cluster.server_address}:{env.public_port}")
    # The probe cleans up after itself: its folder is gone, its job not queued.
    jobs = env.cluster.run_as_user(["sh", "-c", f"ls {BASE}/work/jobs"]).stdout
    assert jobs.split() == []


def test_a_blocked_route_says_so_and_recommends_the_spool(env: Env) -> None:
    url = f"http://{env.cluster.server_address}:{env.public_port}"
    run = env.doctor("http")
    # delivery = "http" needs the route: real jobs could post nothing.
    assert run.returncode == 1, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    route = next(line for line in lines if line.startswith("✗ route: "))
    assert f"cannot reach {url} (curl: (7) Failed to connect" in route
    assert ('    → set delivery = "spool" in [clusters.http]' in
            lines[lines.index(route) + 1])
    assert "✓ spool: the job's events come back through the shared filesystem" in lines
    assert ('✗ delivery: delivery = "http" needs a path that does not work here' in lines)
    assert 'recommended: delivery = "spool" in [clusters.http]' in lines
    assert lines[-1] == "http: something above blocks real jobs"
    # The server check from here could not reach public_url either: a warning that says
    # the probe decides.
    assert any(line.startswith(f"! server: no server answers at public_url {url}")
               for line in lines)
    # With delivery = "spool" the same cluster is fine: jobs never use the route.
    status, report = env.doctor_json("spooled")
    assert status == 0, report
    assert report["recommended_delivery"] == "spool"
    # The route still fails, but these jobs do not need it: a warning.
    assert checks(report)["route"]["status"] == "warning"
    assert checks(report)["delivery"] == {
        "check": "delivery", "status": "ok", "found": 'delivery = "spool" is the right one here',
        "change": ""}


def test_a_wrong_host_key_is_refused_in_plain_words(env: Env) -> None:
    status, report = env.doctor_json("forged")
    assert status == 1
    assert [check["check"] for check in report["checks"]] == ["connection"]
    connection = report["checks"][0]
    assert connection["status"] == "problem"
    assert "host key of" in connection["found"] and "has CHANGED" in connection["found"]
    assert "[clusters.forged] known_hosts" in connection["change"]


def test_an_unknown_cluster_is_bad_usage_and_lists_the_known_ones(env: Env) -> None:
    run = env.doctor("nowhere")
    assert run.returncode == 2
    assert run.stdout == ""
    assert ("no cluster named 'nowhere' in the configuration; it has: healthy, http, "
            "spooled, forged") in run.stderr
