"""A cluster reached only through metis-agent (docs/agent.md), end to end on the real test
cluster: the agent runs as the cluster user inside the cluster's network namespace,
fetched there with ``curl`` from the server's ``GET /agent``, and dials out to the server;
the server never logs in to the cluster.

The server listens on this machine's 127.0.0.1, which the namespace cannot reach; a
:class:`TcpProxy` on the cluster's side forwards to it, for the agent (plain http to that
address: ``--allow-http``). The cluster delivers by the spool only, so that every job
event reaches the server through the agent's own spool reader.
"""

from __future__ import annotations

import pwd
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream import tokens
from metis_stream.config import JOBSCRIPTS_DIR
from tests.support.agent import AGENT_KEY, AgentProcess, agent_cluster_config
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.proxy import TcpProxy
from tests.support.server import ServerProcess, free_port, script_templates
from tests.test_cluster_e2e import API_KEY, HEADERS, follow, get_job, submit, wait_until
from tests.test_spool_cluster import all_events, assert_tokens_job_whole, from_the_job

pytestmark = pytest.mark.cluster

RUN_ID = secrets.token_hex(3)
BASE = f"agent-{RUN_ID}"
"""Everything this module puts in the cluster user's home lives under this folder."""
CLUSTER = "dialed"
WORKDIR = f"{BASE}/{CLUSTER}"
POLL_INTERVAL = 1.0
WORDS = [f"w{n}" for n in range(20)]

SCRIPTS = {
    # A step every 0.1 s until the test says stop (at most 90 s).
    "beat": "i=1\n"
            'while [ $i -le 900 ] && [ ! -e "$METIS_JOB_DIR/stop" ]; do\n'
            '    "$METIS_EMIT" step "beat $i" || exit\n'
            "    sleep 0.1; i=$((i + 1))\ndone\n",
}


def config(folder: Path) -> str:
    return (agent_cluster_config(CLUSTER, workdir=WORKDIR, poll_interval=POLL_INTERVAL,
                                 agent_wait=3.0, delivery="spool", spool_interval=0.3)
            + f'\n[templates.tokens]\ncluster = "{CLUSTER}"\n'
            f'script = "{JOBSCRIPTS_DIR / "tokens.pbs"}"\n'
            'resources = { walltime = "00:05:00" }\n'
            'params.text = { type = "str", max_length = 2000 }\n'
            'params.delay = { type = "float", min = 0, max = 5, default = 0 }\n'
            + script_templates(folder / "scripts", SCRIPTS, cluster=CLUSTER))


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess
    agent: AgentProcess

    def job_dir(self, job_id: str) -> str:
        return f"{pwd.getpwnam(self.cluster.user).pw_dir}/{WORKDIR}/jobs/{job_id}"

    def touch(self, job_id: str, name: str) -> None:
        self.cluster.run_as_user(["touch", f"{self.job_dir(job_id)}/{name}"], check=True)

    def scheduler_id(self, job_id: str) -> str:
        return str(get_job(self.server, job_id)["scheduler_id"])

    def in_scheduler(self, scheduler_id: str) -> bool:
        listed = self.cluster.run_as_user(
            ["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING", "-j", scheduler_id]).stdout
        return bool(listed.strip())

    def cluster_status(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.server.url}/api/clusters", headers=HEADERS, timeout=30)
        assert answer.status_code == 200, answer.text
        clusters: dict[str, Any] = {c["name"]: c for c in answer.json()["clusters"]}
        return dict(clusters[CLUSTER])


def the_agent(cluster: TestCluster, folder: Path, url: str) -> AgentProcess:
    """The agent as a cluster user starts it: fetched with curl from the server and
    checked against its published hash, its key in a file only that user reads."""
    home = pwd.getpwnam(cluster.user).pw_dir
    fetched = cluster.run_as_user(
        f"mkdir -p {WORKDIR} && cd {BASE} && curl -fsSo metis-agent {url}/agent "
        f"&& curl -fsS {url}/agent.sha256 | sha256sum -c - "
        f"&& umask 077 && printf '%s\\n' '{AGENT_KEY}' > agent-key")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr
    assert "metis-agent: OK" in fetched.stdout
    as_user = ["setpriv", f"--reuid={cluster.user}", f"--regid={cluster.user}",
               "--init-groups", "--"]
    return AgentProcess(
        url, Path(home, BASE, "agent-key"), folder / "agent.log", workdir=WORKDIR,
        allow_http=[cluster.server_address], script=Path(home, BASE, "metis-agent"),
        interpreter="/usr/bin/python3", launcher=cluster.in_cluster(as_user),
        env={"HOME": home, "USER": cluster.user, "LOGNAME": cluster.user,
             "PATH": "/usr/local/bin:/usr/bin:/bin", "SLURM_CONF": str(cluster.slurm_conf),
             "LANG": "C.UTF-8"},
        cwd=Path(home))


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("agent-cluster")
    port = free_port(test_cluster.server_address)
    public_url = f"http://{test_cluster.server_address}:{port}"
    server = ServerProcess(state_dir=folder / "server", host="127.0.0.1",
                           extra_config=config(folder),
                           server_settings={"api_keys": [tokens.hash_api_key(API_KEY)],
                                            "public_url": public_url})
    proxy = TcpProxy(test_cluster.server_address, port, "127.0.0.1", server.port)
    agent: AgentProcess | None = None
    server.start()
    try:
        proxy.start()
        agent = the_agent(test_cluster, folder, public_url)
        agent.start()
        agent.wait_connected()
        yield Env(test_cluster, server, agent)
    finally:
        if agent is not None:
            agent.stop()
        proxy.stop()
        server.stop()
        listed = test_cluster.run_as_user(["squeue", "-h", "-u", test_cluster.user,
                                           "-o", "%i %o"]).stdout
        leftover = [line.split()[0] for line in listed.splitlines() if f"/{BASE}/" in line]
        if leftover:
            test_cluster.run_as_user(["scancel", *leftover])
        test_cluster.run_as_user(["rm", "-rf", BASE])


def beats(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"] for e in events if e["type"] == "step"]


def test_a_job_submitted_through_the_agent_streams_and_completes(env: Env) -> None:
    job_id = submit(env.server, "tokens", {"text": " ".join(WORDS), "delay": 0.02})["id"]
    events = follow(env.server, job_id, timeout=60)
    assert events == all_events(env.server, job_id)
    assert_tokens_job_whole(events, WORDS)
    assert all(e.get("via") == "spool" for e in from_the_job(events))
    assert get_job(env.server, job_id)["state"] == "completed"
    status = env.cluster_status()
    assert status["state"] == "ok", status
    assert status["agent"]["connected"] is True, status


def test_cancel_through_the_api_reaches_the_scheduler_through_the_agent(env: Env) -> None:
    job_id = submit(env.server, "beat")["id"]
    follow(env.server, job_id, timeout=30, until=lambda e: e["type"] == "step")
    scheduler_id = env.scheduler_id(job_id)
    response = httpx.delete(f"{env.server.url}/api/jobs/{job_id}", headers=HEADERS,
                            timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"
    wait_until(lambda: not env.in_scheduler(scheduler_id), 15,
               f"job {scheduler_id} to leave the scheduler")
    time.sleep(2 * POLL_INTERVAL)  # the monitor must not add a fatal after the cancel
    kinds = [e["type"] for e in all_events(env.server, job_id)]
    assert kinds[-1] == "cancelled" and kinds.count("cancelled") == 1, kinds
    assert "fatal" not in kinds


def test_a_job_cancelled_outside_the_server_ends_fatal_with_the_right_words(
        env: Env) -> None:
    job_id = submit(env.server, "beat")["id"]
    follow(env.server, job_id, timeout=30, until=lambda e: e["type"] == "step")
    done = env.cluster.run_as_user(["scancel", env.scheduler_id(job_id)])
    assert done.returncode == 0, done.stdout + done.stderr
    last = follow(env.server, job_id, timeout=30)[-1]
    assert last["type"] == "fatal", last
    assert last["data"]["error"] == "cancelled on the cluster (scancel or qdel)", last
    assert last["data"]["scheduler_state"].startswith("CANCELLED"), last
    assert get_job(env.server, job_id)["state"] == "failed"


def test_the_agent_killed_mid_job_is_an_outage_not_a_death(env: Env) -> None:
    """SIGKILL (no goodbye) while the job keeps writing to its spool: the cluster shows
    unreachable, watchers get stale, nothing fails; the agent back, they get recovered
    and every event the job wrote meanwhile, once and in order."""
    job_id = submit(env.server, "beat")["id"]
    follow(env.server, job_id, timeout=30, until=lambda e: e["data"] == "beat 5")
    env.agent.kill()
    # An operation the agent had taken fails once its presence lapses
    # (clusters.AGENT_AWAY_AFTER), not at the operation's own limit.
    wait_until(lambda: env.cluster_status()["state"] == "unreachable", 30,
               "the cluster to show unreachable")
    # AgentAway (an operation nobody took) or ConnectionLost (one the agent took).
    assert f"the agent of cluster {CLUSTER}" in env.cluster_status()["last_error"]
    wait_until(lambda: env.cluster_status()["agent"]["connected"] is False, 30,
               "the agent's presence to lapse")
    wait_until(lambda: "stale" in [e["type"] for e in all_events(env.server, job_id)], 20,
               "watchers to be told their news is stale")
    assert get_job(env.server, job_id)["state"] == "running"
    during = beats(all_events(env.server, job_id))
    # The agent comes back "a minute later"; two poll intervals show the same
    # (the monitor keeps failing, nothing ends the job) and keep the suite short.
    time.sleep(2 * POLL_INTERVAL)
    assert get_job(env.server, job_id)["state"] == "running"
    env.agent.start()
    env.agent.wait_connected()
    wait_until(lambda: "recovered" in [e["type"] for e in all_events(env.server, job_id)],
               20, "watchers to be told the cluster recovered")
    assert env.cluster_status()["state"] == "ok"
    env.touch(job_id, "stop")
    events = follow(env.server, job_id, timeout=30)
    assert events == all_events(env.server, job_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    kinds = [e["type"] for e in events]
    assert kinds.count("stale") == 1 and kinds.count("recovered") == 1, kinds
    assert kinds.index("stale") < kinds.index("recovered")
    assert kinds[-1] == "completed" and "fatal" not in kinds, kinds
    written = beats(events)
    assert written == [f"beat {n}" for n in range(1, len(written) + 1)]
    assert len(written) > len(during) + 20, "the job wrote on through the outage"
    notices = ("stale", "recovered")  # the server's own
    assert all(e.get("via") == "spool" for e in from_the_job(events)
               if e["type"] not in notices)
    # And the link works again: a cancel reaches the scheduler.
    test_cancel_through_the_api_reaches_the_scheduler_through_the_agent(env)
