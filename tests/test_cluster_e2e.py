"""Issue 4, end to end against the real components: a real server process, real sshd,
real Slurm 22.05 and its PBS wrappers (qsub/qstat/qdel), real jobs that call back with
curl through the uploaded metis-emit.

Two named clusters point at the same test cluster: ``pbs`` (the qsub wrappers) and
``slurm`` (sbatch). The node has as many job slots as this machine has CPUs (often 2):
one of them is taken for 60-90 s by the walltime job, which is submitted first (module
fixture) and checked last, so that its wait overlaps every other test.

SSH connections are counted from outside the server: every "Accepted publickey" line
in sshd's log is one connection, and ``ss`` in this machine's namespace tells which
process holds a connection's local port. Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import json
import pwd
import re
import secrets
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream import tokens
from metis_stream.config import EMIT_SCRIPT, JOBSCRIPTS_DIR, load_config
from metis_stream.launcher import launcher_script
from metis_stream.schedulers import pbs
from metis_stream.schedulers.base import Submission
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.schedulers.dialects import DIALECTS
from metis_stream.shells.ssh import SSHShell
from metis_stream.templates import Template
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.server import ServerProcess, free_port

pytestmark = pytest.mark.cluster

API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SCHEDULERS = tuple(DIALECTS)
TERMINAL = {"completed", "fatal", "cancelled"}
CANCEL_COMMAND = {"pbs": "qdel", "slurm": "scancel"}
RUN_ID = secrets.token_hex(3)
BASE = f"e2e-{RUN_ID}"
"""Everything this module puts in the cluster user's home lives under this folder."""

REMOTE_SCRIPTS = {
    "fatal.sh": '"$METIS_EMIT" step "Failing"\n'
                '"$METIS_EMIT" fatal "disk full: /scratch"\nexit 1\n',
    # `|| exit`: qdel may kill the sleep before the shell; the script must stop there,
    # not go on to report completed (the README's advice to script authors).
    "sleepy.sh": '"$METIS_EMIT" step "Sleeping"\nsleep 300 || exit\n"$METIS_EMIT" completed\n',
    # `exec`: nothing may run after the kill. With `sleep; metis-emit completed`, Slurm's
    # SIGTERM can end sleep first and the shell start metis-emit before its own SIGTERM
    # arrives; that new process escapes until SIGKILL (KillWait) and reports completion.
    "walltime.sh": '"$METIS_EMIT" step "Running past the walltime"\nexec sleep 600\n',
    "quick.sh": '"$METIS_EMIT" completed\n',
    "true.sh": "exit 0\n",
    # Reports its parameters exactly (the trailing x keeps trailing newlines), and whether
    # they arrived in the environment or had to be fetched from the spec (no longer
    # needed since the launcher exports what -v could not carry; kept as a witness).
    "echo.sh": """\
if [ -n "${WORD+set}" ]; then from=env; else from=spec; fi
word=$("$METIS_EMIT" param word; echo x) || exit 1
word=${word%x}
note=$("$METIS_EMIT" param note; echo x) || exit 1
note=${note%x}
"$METIS_EMIT" result "{\\"word\\": $("$METIS_EMIT" quote "$word"), \\
\\"note\\": $("$METIS_EMIT" quote "$note"), \\"from\\": \\"$from\\"}"
"$METIS_EMIT" completed
""",
}

# ---------------------------------------------------------------------------- evidence


@dataclass
class Figures:
    """What the module measured, printed at the end (``-s``) and in the summary test."""

    lines: list[str] = field(default_factory=list)
    connections: dict[str, int] = field(default_factory=dict)

    def add(self, line: str) -> None:
        print(line)
        self.lines.append(line)


FIGURES = Figures()
_ACCEPTED = re.compile(r"Accepted publickey for \S+ from \S+ port ([0-9]+)")


def sshd_log(cluster: TestCluster) -> Path:
    return cluster.state_dir / "log" / "sshd.out"


def sshd_log_size(cluster: TestCluster) -> int:
    return sshd_log(cluster).stat().st_size


def accepted_ports(cluster: TestCluster, since: int) -> list[int]:
    """The client ports of the SSH connections sshd accepted after byte ``since``."""
    with sshd_log(cluster).open("rb") as log:
        log.seek(since)
        text = log.read().decode(errors="replace")
    return [int(port) for port in _ACCEPTED.findall(text)]


def ssh_ports_by_pid(cluster: TestCluster) -> dict[int, set[int]]:
    """Established connections to sshd from this namespace: local port, by owning pid."""
    out = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    owners: dict[int, set[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 5 or parts[3] != f"{cluster.host}:{cluster.port}":
            continue
        port = int(parts[2].rsplit(":", 1)[1])
        for pid in re.findall(r"pid=([0-9]+)", " ".join(parts[4:])):
            owners.setdefault(int(pid), set()).add(port)
    return owners


def home_of(cluster: TestCluster) -> Path:
    return Path(pwd.getpwnam(cluster.user).pw_dir)


def remote_exists(cluster: TestCluster, path: str) -> bool:
    return cluster.run_as_user(["test", "-e", path]).returncode == 0


# ---------------------------------------------------------------------------- config


def cluster_block(cluster: TestCluster, name: str, scheduler: str, *, known_hosts: Path,
                  poll_interval: float = 1.0, workdir: str | None = None) -> str:
    """A ``[clusters.NAME]`` block; its workdir is under this module's folder unless given."""
    return (f"\n[clusters.{name}]\nscheduler = \"{scheduler}\"\nhost = \"{cluster.host}\"\n"
            f"port = {cluster.port}\nuser = \"{cluster.user}\"\n"
            f"key_file = \"{cluster.key_file}\"\nknown_hosts = \"{known_hosts}\"\n"
            f"use_agent = false\nworkdir = \"{workdir or f'{BASE}/{name}'}\"\n"
            f"poll_interval = {poll_interval}\n")


def templates_for(cluster_name: str, remote_dir: str, suffix: str | None = None) -> str:
    suffix = suffix or cluster_name
    tokens_pbs = JOBSCRIPTS_DIR / "tokens.pbs"
    download_pbs = JOBSCRIPTS_DIR / "download.pbs"
    out = f"""
[templates.tokens_{suffix}]
cluster = "{cluster_name}"
script = "{tokens_pbs}"
resources = {{ walltime = "00:05:00" }}
params.text = {{ type = "str", max_length = 2000, default = "Hello from the cluster" }}
params.delay = {{ type = "float", min = 0, max = 5, default = 0 }}

[templates.download_{suffix}]
cluster = "{cluster_name}"
script = "{download_pbs}"
params.url = {{ type = "url", required = true }}

[templates.echo_{suffix}]
cluster = "{cluster_name}"
remote_script = "{remote_dir}/echo.sh"
params.word = {{ type = "str", max_length = 2000 }}
params.note = {{ type = "str", default = "plain" }}
params.count = {{ type = "int", min = 0, max = 10, default = 1 }}
params.ratio = {{ type = "float", min = 0, max = 1, default = 0.5 }}
params.link = {{ type = "url", default = "http://example.org/" }}
"""
    for name in ("fatal", "sleepy", "quick"):
        out += (f'\n[templates.{name}_{suffix}]\ncluster = "{cluster_name}"\n'
                f'remote_script = "{remote_dir}/{name}.sh"\n')
    out += (f'\n[templates.walltime_{suffix}]\ncluster = "{cluster_name}"\n'
            f'remote_script = "{remote_dir}/walltime.sh"\n'
            'resources = { walltime = "00:00:05" }\n')
    return out


def make_server(cluster: TestCluster, folder: Path, config: str) -> ServerProcess:
    port = free_port(cluster.server_address)
    server = ServerProcess(
        state_dir=folder, host=cluster.server_address, port=port, extra_config=config,
        server_settings={
            "api_keys": [tokens.hash_api_key(API_KEY)],
            "public_url": f"http://{cluster.server_address}:{port}",
            "submissions_per_minute": 100_000.0,
        })
    server.start()
    return server


# ---------------------------------------------------------------------------- client


def submit(server: ServerProcess, template: str, params: dict[str, Any] | None = None,
           inputs: list[str] | None = None, **body: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/api/jobs", headers=HEADERS, timeout=30,
                          json={"template": template, "params": params or {},
                                "inputs": inputs or [], **body})
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def get_job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/api/jobs/{job_id}", headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def history(server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/jobs/{job_id}/events", headers=HEADERS, timeout=30)
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = response.json()["events"]
    return events


def follow(server: ServerProcess, job_id: str, *, timeout: float = 90.0,
           until: Callable[[dict[str, Any]], bool] | None = None) -> list[dict[str, Any]]:
    """The job's events over SSE, until the terminal one (the response ends there) or the
    first that ``until`` accepts."""
    deadline = time.monotonic() + timeout
    events: list[dict[str, Any]] = []
    headers = {**HEADERS, "Accept": "text/event-stream"}
    with httpx.stream("GET", f"{server.url}/api/jobs/{job_id}/events", headers=headers,
                      timeout=httpx.Timeout(timeout)) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[len("data: "):])
                events.append(event)
                if until is not None and until(event):
                    return events
            if time.monotonic() > deadline:
                break
    if until is None and events and events[-1]["type"] in TERMINAL:
        return events
    raise AssertionError(f"job {job_id}: timed out or ended early; events so far: {events}"
                         f"\n{server.log()[-3000:]}")


def until_type(kind: str) -> Callable[[dict[str, Any]], bool]:
    def accept(event: dict[str, Any]) -> bool:
        if event["type"] in TERMINAL and kind not in TERMINAL:
            raise AssertionError(f"ended before a {kind} event: {event}")
        return bool(event["type"] == kind)
    return accept


def without_monitor_running(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitor may add `running` when it sees the job before the job's first event."""
    return [e for e in events
            if not (e["type"] == "running" and e["data"] == {"source": "scheduler"})]


def job_token(server: ServerProcess, job_id: str) -> str:
    return tokens.job_token(load_config(server.config_path).server.secret, job_id)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# ---------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess
    remote_dir: str
    marker: str
    module_log_start: int
    scheduler_ids: list[str] = field(default_factory=list)
    direct_connections: int = 0
    """SSH connections this test module opened itself (latency measurement)."""
    other_servers: dict[str, int] = field(default_factory=dict)
    """Connections opened by the test's own dedicated servers, by label."""

    def job_dir(self, cluster_name: str, job_id: str) -> str:
        return f"{home_of(self.cluster)}/{BASE}/{cluster_name}/jobs/{job_id}"


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    cluster = test_cluster
    folder = tmp_path_factory.mktemp("e2e")
    log_start = sshd_log_size(cluster)
    remote_dir = f"{home_of(cluster)}/{BASE}/scripts"
    cluster.run_as_user(["mkdir", "-p", remote_dir], check=True)
    for name, body in REMOTE_SCRIPTS.items():
        path = f"{remote_dir}/{name}"
        encoded = base64.b64encode(f"#!/bin/sh\n{body}".encode()).decode()
        cluster.run_as_user(["sh", "-c", 'printf %s "$1" | base64 -d > "$2" && chmod 700 "$2"',
                             "sh", encoded, path], check=True)
    forged = cluster.forge_known_hosts(folder / "forged_known_hosts")
    config = (cluster_block(cluster, "pbs", "pbs", known_hosts=cluster.known_hosts)
              + cluster_block(cluster, "slurm", "slurm", known_hosts=cluster.known_hosts)
              + cluster_block(cluster, "badhost", "pbs", known_hosts=forged)
              + templates_for("pbs", remote_dir) + templates_for("slurm", remote_dir)
              + templates_for("badhost", remote_dir))
    server = make_server(cluster, folder / "server", config)
    state = Env(cluster, server, remote_dir, f"{home_of(cluster)}/{BASE}/pwned", log_start)
    try:
        yield state
    finally:
        server.stop()
        for scheduler_id in state.scheduler_ids:
            cluster.run_as_user(["scancel", scheduler_id])
        cluster.run_as_user(f"rm -rf {BASE} metis-download-j_*")


@dataclass
class WalltimeJob:
    job_id: str
    submitted: float


@pytest.fixture(scope="module")
def walltime_job(env: Env) -> WalltimeJob:
    """Submitted before every other test and checked by the last one: Slurm keeps time
    limits in whole minutes, so the kill takes 60 to 90 s."""
    job = submit(env.server, "walltime_pbs")
    return WalltimeJob(job["id"], time.monotonic())


@pytest.fixture(scope="module")
def file_server(env: Env, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """A tiny HTTP server on the address that jobs can reach."""
    folder = tmp_path_factory.mktemp("files")
    files = {"data.bin": bytes(range(256)) * 4000 + b"tail", "notes.txt": b"hello, cluster\n"}
    for name, payload in files.items():
        (folder / name).write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((env.cluster.server_address, 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{env.cluster.server_address}:{httpd.server_port}", files
    finally:
        httpd.shutdown()
        httpd.server_close()


def record(env: Env, job: dict[str, Any]) -> None:
    if job.get("scheduler_id"):
        env.scheduler_ids.append(job["scheduler_id"])


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_job_completes_with_exact_event_order(env: Env, walltime_job: WalltimeJob,
                                              scheduler: str) -> None:
    text = "the quick brown fox"
    job = submit(env.server, f"tokens_{scheduler}", {"text": text, "delay": 0})
    events = follow(env.server, job["id"])
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    own = without_monitor_running(events)
    assert [e["type"] for e in own[:2]] == ["starting", "submitted"]
    words = text.split()
    expected: list[tuple[str, Any]] = [("step", "Loading model"), ("step", "Generating")]
    for index, word in enumerate(words):
        expected.append(("token", word if index == 0 else " " + word))
        expected.append(("progress", {"current": index + 1, "total": len(words)}))
    assert [(e["type"], e["data"]) for e in own[2:-1]] == expected
    assert (own[-1]["type"], own[-1]["data"]) == ("completed", {"text": text,
                                                                "tokens": len(words)})
    record_ = get_job(env.server, job["id"])
    record(env, record_)
    assert record_["state"] == "completed"
    scheduler_id = own[1]["data"]
    assert record_["scheduler_id"] == scheduler_id

    # It ran in the cluster, as the cluster user, under the scheduler's id and our name.
    def show() -> str:
        return env.cluster.run_as_user(["scontrol", "show", "job", scheduler_id]).stdout

    # The job reports `completed` just before its script exits: give Slurm a moment.
    wait_until(lambda: "JobState=COMPLETED" in show(), 15, f"job {scheduler_id} to end")
    shown = show()
    assert f"JobId={scheduler_id} " in shown
    assert f"UserId={env.cluster.user}(" in shown
    assert f"JobName=ms-{job['id'][-12:]}" in shown
    # The script was uploaded by content hash, and metis-emit with it; the scheduler ran
    # the launcher (also by content hash), which ran the script.
    script = (JOBSCRIPTS_DIR / "tokens.pbs").read_bytes()
    digest = hashlib.sha256(script).hexdigest()[:16]
    emit_digest = hashlib.sha256(EMIT_SCRIPT.read_bytes()).hexdigest()[:16]
    launcher_digest = hashlib.sha256(launcher_script(script)).hexdigest()[:16]
    workdir = f"{home_of(env.cluster)}/{BASE}/{scheduler}"
    assert f"Command={workdir}/bin/launch-{launcher_digest}" in shown
    assert remote_exists(env.cluster, f"{workdir}/scripts/{digest}-tokens.pbs")
    assert remote_exists(env.cluster, f"{workdir}/bin/metis-emit-{emit_digest}")
    exit_file = env.cluster.run_as_user(["cat", f"{env.job_dir(scheduler, job['id'])}/exit"])
    assert exit_file.stdout == "0\n"
    # It called back with curl on the public URL, from the cluster's own address.
    if env.cluster.mode == "netns":
        posts = re.findall(rf'([0-9.]+):[0-9]+ - "POST /api/jobs/{job["id"]}/events',
                           env.server.log())
        assert posts and set(posts) == {env.cluster.host}
    # Its token file is removed once it has ended.
    token_file = f"{env.job_dir(scheduler, job['id'])}/token"
    wait_until(lambda: not remote_exists(env.cluster, token_file), 10, "the token file to go")


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_job_reports_fatal(env: Env, scheduler: str) -> None:
    job = submit(env.server, f"fatal_{scheduler}")
    events = without_monitor_running(follow(env.server, job["id"]))
    assert [e["type"] for e in events] == ["starting", "submitted", "step", "fatal"]
    assert events[-1]["data"] == {"error": "disk full: /scratch"}
    time.sleep(2.5)  # two monitor polls: the scheduler's view adds nothing after the end
    assert len(without_monitor_running(history(env.server, job["id"]))) == 4
    record_ = get_job(env.server, job["id"])
    record(env, record_)
    assert record_["state"] == "failed"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_the_end_user_is_in_the_jobs_name_on_the_cluster(env: Env, scheduler: str) -> None:
    """A cluster account shared by a web app's users tells them apart: the job's name
    (qsub -N through Slurm's wrappers, sbatch --job-name) ends with the end user's id, and
    sbatch also gets it as the comment."""
    job = submit(env.server, f"fatal_{scheduler}", user="u-42")
    follow(env.server, job["id"])
    record_ = get_job(env.server, job["id"])
    record(env, record_)
    assert record_["user"] == "u-42"
    shown = env.cluster.run_as_user(["scontrol", "show", "job",
                                     record_["scheduler_id"]]).stdout
    assert f"JobName=ms-{job['id'][-12:]}-u-42" in shown
    if scheduler == "slurm":
        assert "Comment=u-42" in shown


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_job_cancelled_outside_the_server_becomes_fatal(env: Env, scheduler: str) -> None:
    job = submit(env.server, f"sleepy_{scheduler}")
    events = follow(env.server, job["id"], until=until_type("step"))
    scheduler_id = next(e["data"] for e in events if e["type"] == "submitted")
    env.scheduler_ids.append(scheduler_id)
    cancelled_at = time.monotonic()
    done = env.cluster.run_as_user([CANCEL_COMMAND[scheduler], scheduler_id])
    assert done.returncode == 0, done.stdout + done.stderr
    events = follow(env.server, job["id"], timeout=30)
    elapsed = time.monotonic() - cancelled_at
    FIGURES.add(f"[{scheduler}] {CANCEL_COMMAND[scheduler]} behind the server's back -> fatal "
                f"in {elapsed:.1f} s")
    last = events[-1]
    assert last["type"] == "fatal", events
    # Slurm's scontrol does not say who cancelled (sacct would: "CANCELLED by 1001").
    assert last["data"]["error"] == "cancelled on the cluster (scancel or qdel)", last
    assert last["data"]["scheduler_state"].startswith("CANCELLED"), last
    assert (last["data"]["exit_status"], last["data"].get("signal")) == (143, "SIGTERM"), last
    assert get_job(env.server, job["id"])["state"] == "failed"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cancel_through_the_api_removes_the_job_from_the_scheduler(env: Env,
                                                                   scheduler: str) -> None:
    job = submit(env.server, f"sleepy_{scheduler}")
    events = follow(env.server, job["id"], until=until_type("step"))
    scheduler_id = next(e["data"] for e in events if e["type"] == "submitted")
    env.scheduler_ids.append(scheduler_id)
    token_file = f"{env.job_dir(scheduler, job['id'])}/token"
    assert remote_exists(env.cluster, token_file)
    response = httpx.delete(f"{env.server.url}/api/jobs/{job['id']}", headers=HEADERS,
                            timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "cancelled"

    def gone() -> bool:
        alive = env.cluster.run_as_user(
            ["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING", "-j", scheduler_id]).stdout
        return not alive.strip()

    wait_until(gone, 15, f"job {scheduler_id} to leave the scheduler")
    shown = env.cluster.run_as_user(["scontrol", "show", "job", scheduler_id]).stdout
    assert "JobState=CANCELLED" in shown
    assert not remote_exists(env.cluster, token_file)
    time.sleep(2.5)  # the monitor must not add a fatal after the cancel
    events = history(env.server, job["id"])
    assert events[-1]["type"] == "cancelled"
    assert [e["type"] for e in events].count("cancelled") == 1
    assert "fatal" not in [e["type"] for e in events]
    # The job's own late report is refused: it has ended.
    late = httpx.post(f"{env.server.url}/api/jobs/{job['id']}/events", timeout=10,
                      headers={"Authorization": f"Bearer {job_token(env.server, job['id'])}"},
                      json={"type": "completed"})
    assert late.status_code == 409


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_cancel_right_after_submitting_leaves_no_job_behind(env: Env, scheduler: str) -> None:
    """DELETE while the submission may still be on its way: whichever comes first, the
    scheduler must end up without the job."""
    job = submit(env.server, f"sleepy_{scheduler}")
    response = httpx.delete(f"{env.server.url}/api/jobs/{job['id']}", headers=HEADERS,
                            timeout=30)
    assert response.status_code == 200, response.text
    name = f"ms-{job['id'][-12:]}"

    def no_live_job() -> bool:
        live = env.cluster.run_as_user(
            ["squeue", "-h", "-t", "PENDING,RUNNING,COMPLETING", "-n", name]).stdout
        return not live.strip()

    time.sleep(1.5)  # a submission still in flight lands, and is cancelled, by then
    wait_until(no_live_job, 15, f"no live job named {name}")
    events = history(env.server, job["id"])
    assert events[-1]["type"] == "cancelled"
    assert [e["type"] for e in events].count("cancelled") == 1
    known = env.cluster.run_as_user(["squeue", "-h", "-t", "all", "-n", name, "-o", "%i"])
    env.scheduler_ids.extend(known.stdout.split())
    FIGURES.add(f"[{scheduler}] cancel right after POST: the scheduler "
                f"{'had' if known.stdout.strip() else 'never had'} the job")


def test_cancel_during_submission_removes_the_token_file(env: Env, tmp_path: Path) -> None:
    # A server whose first submission must connect and stage first: the DELETE then
    # surely arrives while the submission is on its way.
    cluster = env.cluster
    server = make_server(cluster, tmp_path / "server",
                         cluster_block(cluster, "slurm", "slurm",
                                       known_hosts=cluster.known_hosts)
                         + templates_for("slurm", env.remote_dir))
    try:
        job = submit(server, "sleepy_slurm")
        response = httpx.delete(f"{server.url}/api/jobs/{job['id']}", headers=HEADERS,
                                timeout=30)
        assert response.status_code == 200, response.text
        time.sleep(1.5)
        known = cluster.run_as_user(
            ["squeue", "-h", "-t", "all", "-n", f"ms-{job['id'][-12:]}", "-o", "%i"])
        env.scheduler_ids.extend(known.stdout.split())
        env.other_servers["cancel during submission"] = 1  # it connected to stage
        token_file = f"{env.job_dir('slurm', job['id'])}/token"
        wait_until(lambda: not remote_exists(cluster, token_file), 5, "the token file to go")
    finally:
        server.stop()


def test_changed_host_key_is_refused_and_nothing_is_submitted(env: Env) -> None:
    before = accepted_ports(env.cluster, env.module_log_start)
    job = submit(env.server, "tokens_badhost", {"text": "never"})
    events = follow(env.server, job["id"], timeout=30)
    assert [e["type"] for e in events] == ["starting", "fatal"]
    # Watchers read the plain cause; the API key holder reads the details.
    assert events[-1]["data"]["error"].startswith(
        "submission failed: the cluster's host key is not trusted (reference ")
    record = get_job(env.server, job["id"])
    assert "host key" in record["error_detail"] and "CHANGED" in record["error_detail"], record
    assert record["scheduler_id"] is None
    named = env.cluster.run_as_user(
        ["squeue", "-h", "-t", "all", "-n", f"ms-{job['id'][-12:]}"]).stdout
    assert named.strip() == ""
    assert not remote_exists(env.cluster, f"{home_of(env.cluster)}/{BASE}/badhost")
    # Refused before authentication: sshd accepted no login for it.
    assert accepted_ports(env.cluster, env.module_log_start) == before


def test_unsafe_parameters_are_rejected_before_reaching_the_cluster(env: Env) -> None:
    listed = httpx.get(f"{env.server.url}/api/jobs?limit=1000", headers=HEADERS,
                       timeout=30).json()["jobs"]
    log_at = sshd_log_size(env.cluster)
    bad: list[tuple[str, dict[str, Any], list[str]]] = [
        ("download_pbs", {"url": "http://example.org/a b"}, []),
        ("download_pbs", {"url": "http://example.org/a\nb"}, []),
        ("download_slurm", {"url": "http://example.org/;touch x"}, ["file:///etc/passwd"]),
        ("download_slurm", {"url": "file:///etc/passwd"}, []),
        ("download_pbs", {"url": "http://user:pw@example.org/"}, []),
        ("download_pbs", {"url": "$(touch /tmp/x)"}, []),
        ("echo_pbs", {"word": "w", "count": "1;touch x"}, []),
        ("echo_slurm", {"word": "w", "ratio": "$(id)"}, []),
        ("echo_slurm", {"word": "w", "link": "http://a b/"}, []),
        ("echo_pbs", {"word": "a\0b"}, []),
        ("echo_pbs", {"word": "w", "extra; rm -rf ~": "x"}, []),
        ("tokens_pbs", {"text": "ok"}, ["http://example.org/x y"]),
    ]
    for template, params, inputs in bad:
        response = httpx.post(f"{env.server.url}/api/jobs", headers=HEADERS, timeout=30,
                              json={"template": template, "params": params, "inputs": inputs})
        assert response.status_code == 422, (template, params, response.text)
        assert "error" in response.json()
    after = httpx.get(f"{env.server.url}/api/jobs?limit=1000", headers=HEADERS,
                      timeout=30).json()["jobs"]
    assert len(after) == len(listed)
    assert accepted_ports(env.cluster, log_at) == []


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_shell_metacharacters_reach_the_job_intact(env: Env, scheduler: str) -> None:
    marker = env.marker
    word = (f"a;touch {marker}; b & touch {marker} & c|touch {marker}|d "
            f"$(touch {marker}) `touch {marker}` 'single' \"double\" ${{HOME}} "
            f"e,f=g,METIS_TOKEN_FILE=/tmp/x h\nnew line\ttab \\back\\slash *?[x] ~ end")
    note = f"x',touch {marker},\"$(touch {marker})\"\n"
    job = submit(env.server, f"echo_{scheduler}", {"word": word, "note": note})
    events = follow(env.server, job["id"])
    record(env, get_job(env.server, job["id"]))
    assert events[-1]["type"] == "completed", events
    result = next(e["data"] for e in events if e["type"] == "result")
    # Too wild for qsub -v / sbatch --export: they came in files of the job's folder,
    # env/NAME, which the launcher exports into the script's environment.
    assert result == {"word": word, "note": note, "from": "env"}
    job_dir = env.job_dir(scheduler, job["id"])
    assert remote_exists(env.cluster, f"{job_dir}/env/WORD")
    assert remote_exists(env.cluster, f"{job_dir}/env/NOTE")
    assert not remote_exists(env.cluster, marker)
    assert not Path(marker).exists()
    # A plain value travels in the environment list itself.
    plain = submit(env.server, f"echo_{scheduler}", {"word": "plain-word_1.2"})
    events = follow(env.server, plain["id"])
    result = next(e["data"] for e in events if e["type"] == "result")
    assert result == {"word": "plain-word_1.2", "note": "plain", "from": "env"}
    assert not remote_exists(env.cluster, f"{env.job_dir(scheduler, plain['id'])}/env/WORD")


def _slurm_saved_environment(cluster: TestCluster, scheduler_id: str) -> bytes:
    """The environment slurmctld keeps for a batch job (what `scontrol` and the job see)."""
    found = list((cluster.state_dir / "slurmctld").glob(f"hash.*/job.{scheduler_id}/environment"))
    assert found, f"no saved environment for job {scheduler_id}"
    return found[0].read_bytes()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_token_stays_out_of_qstat_and_scontrol(env: Env, scheduler: str) -> None:
    job = submit(env.server, f"sleepy_{scheduler}")
    events = follow(env.server, job["id"], until=until_type("step"))
    scheduler_id = next(e["data"] for e in events if e["type"] == "submitted")
    env.scheduler_ids.append(scheduler_id)
    token = job_token(env.server, job["id"])
    token_file = f"{env.job_dir(scheduler, job['id'])}/token"

    for argv in (["qstat", "-f", scheduler_id], ["scontrol", "show", "job", scheduler_id],
                 ["scontrol", "-dd", "show", "job", scheduler_id],
                 ["squeue", "-h", "-j", scheduler_id, "-o", "%all"]):
        shown = env.cluster.run_as_user(argv)
        assert shown.returncode == 0, (argv, shown.stderr)
        assert scheduler_id in shown.stdout
        assert token not in shown.stdout + shown.stderr, argv
    saved = _slurm_saved_environment(env.cluster, scheduler_id)
    assert f"METIS_TOKEN_FILE={token_file}".encode() in saved
    assert token.encode() not in saved

    stat = env.cluster.run_as_user(["stat", "-c", "%a %U", token_file])
    assert stat.stdout.split() == ["600", env.cluster.user]
    content = env.cluster.run_as_user(["cat", token_file]).stdout
    assert content.strip() == token
    folder = env.cluster.run_as_user(["stat", "-c", "%a", str(Path(token_file).parent)])
    assert folder.stdout.strip() == "700"

    response = httpx.delete(f"{env.server.url}/api/jobs/{job['id']}", headers=HEADERS,
                            timeout=30)
    assert response.status_code == 200
    wait_until(lambda: not remote_exists(env.cluster, token_file), 10, "the token file to go")
    assert not remote_exists(env.cluster, f"{env.job_dir(scheduler, job['id'])}/spec.json")


def test_a_server_on_the_login_node_passes_none_of_its_environment_to_jobs(
        test_cluster: TestCluster, tmp_path: Path) -> None:  # noqa: F811
    """A cluster without host: the server runs sbatch itself (LocalShell), on the login
    node, here the cluster's network. Neither its secret, nor its API key, nor anything
    else of its environment but the allowlist reaches sbatch, and sbatch exports none of it
    into the job, which gets the cluster user's login environment instead."""
    cluster = test_cluster
    host = cluster.host if cluster.mode == "netns" else "127.0.0.1"
    port = free_port()
    secret = f"login-node-secret-{secrets.token_hex(16)}"
    key = f"login-node-key-{secrets.token_hex(16)}"
    canary = f"canary-{secrets.token_hex(8)}"
    script = tmp_path / "print-env.sh"
    script.write_text('#!/bin/sh\nenv\n"$METIS_EMIT" completed\n')
    home = tmp_path / "home"  # the server's: LocalShell stages the job's files under it
    home.mkdir()
    server = ServerProcess(
        state_dir=tmp_path / "server", host=host, port=port,
        launcher=tuple(cluster.in_cluster([])),
        server_settings={"api_keys": [tokens.hash_api_key(key)],
                         "public_url": f"http://{host}:{port}"},
        env={"HOME": str(home), "SLURM_CONF": str(cluster.slurm_conf),
             "METIS_SECRET": secret, "METIS_API_KEYS": key, "SERVER_ONLY": canary},
        extra_config=(f'\n[clusters.login]\nscheduler = "slurm"\nworkdir = "{BASE}/login"\n'
                      f'poll_interval = 1\n\n[templates.print_env]\ncluster = "login"\n'
                      f'script = "{script}"\n'))
    server.start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        created = httpx.post(f"{server.url}/api/jobs", headers=headers, timeout=30,
                             json={"template": "print_env"})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        deadline = time.monotonic() + 60
        while (job := httpx.get(f"{server.url}/api/jobs/{job_id}", headers=headers,
                                timeout=30).json())["state"] not in ("completed", "failed"):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.3)
        assert job["state"] == "completed", server.log()[-3000:]
        printed = (home / BASE / "login" / "jobs" / job_id / "stdout").read_text()
        saved = _slurm_saved_environment(cluster, job["scheduler_id"]).decode(errors="replace")
    finally:
        server.stop()
    for what in (printed, saved):
        for withheld in (secret, key, canary, "METIS_SECRET", "METIS_API_KEYS", "SERVER_ONLY"):
            assert withheld not in what, (withheld, what)
    environ = dict(line.split("=", 1) for line in printed.splitlines() if "=" in line)
    # What the job needs came from its login environment and from the listed variables.
    assert environ["PATH"] and environ["HOME"] != str(home), environ
    assert environ["METIS_TOKEN_FILE"].endswith(f"/jobs/{job_id}/token")
    assert environ["SLURM_GET_USER_ENV"] == "1"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_download_template_fetches_param_and_inputs(
        env: Env, file_server: tuple[str, dict[str, bytes]], scheduler: str) -> None:
    base, files = file_server
    url = f"{base}/data.bin?x=1&y=2;z=$(id)"
    inputs = [f"{base}/notes.txt", f"{base}/data.bin"]
    job = submit(env.server, f"download_{scheduler}", {"url": url}, inputs)
    events = follow(env.server, job["id"])
    record(env, get_job(env.server, job["id"]))
    assert events[-1]["type"] == "completed", events

    def entry(link: str, payload: bytes) -> dict[str, Any]:
        return {"url": link, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}

    assert events[-1]["data"] == {
        **entry(url, files["data.bin"]),
        "inputs": [entry(inputs[0], files["notes.txt"]), entry(inputs[1], files["data.bin"])],
    }
    steps = [e["data"] for e in events if e["type"] == "step"]
    assert steps == ["Downloading input", "Hashing"]


async def test_twenty_jobs_at_once_over_one_connection(env: Env, tmp_path: Path) -> None:
    cluster = env.cluster
    server = make_server(cluster, tmp_path / "server",
                         cluster_block(cluster, "pbs", "pbs", known_hosts=cluster.known_hosts)
                         + templates_for("pbs", env.remote_dir))
    log_at = sshd_log_size(cluster)
    try:
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=server.url, headers=HEADERS,
                                     timeout=60) as client:
            responses = await asyncio.gather(*(
                client.post("/api/jobs", json={"template": "tokens_pbs",
                                               "params": {"text": f"job {n}", "delay": 0}})
                for n in range(20)))
        assert [r.status_code for r in responses] == [201] * 20
        ids = [r.json()["id"] for r in responses]
        results = await asyncio.gather(*(asyncio.to_thread(follow, server, job_id,
                                                           timeout=150) for job_id in ids))
        elapsed = time.monotonic() - started
        for n, events in enumerate(results):
            assert events[-1]["type"] == "completed", events
            assert events[-1]["data"] == {"text": f"job {n}", "tokens": 2}
        scheduler_ids = {next(e["data"] for e in ev if e["type"] == "submitted")
                         for ev in results}
        assert len(scheduler_ids) == 20
        env.scheduler_ids.extend(scheduler_ids)
        held = ssh_ports_by_pid(cluster).get(server.process.pid if server.process else -1,
                                             set())
        others = {p for pid, ports in ssh_ports_by_pid(cluster).items()
                  if server.process is not None and pid != server.process.pid
                  for p in ports}
        opened = [p for p in accepted_ports(cluster, log_at) if p not in others]
        FIGURES.add(f"20 jobs at once on one server: all completed in {elapsed:.1f} s; "
                    f"SSH connections opened: {len(opened)} (held now: {len(held)})")
        assert len(held) == 1
        assert opened == sorted(held)
        env.other_servers["twenty jobs"] = len(opened)
    finally:
        server.stop()


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sshd_restart_while_jobs_run(env: Env, scheduler: str, tmp_path: Path) -> None:
    cluster = env.cluster
    server = make_server(cluster, tmp_path / "server",
                         cluster_block(cluster, scheduler, scheduler,
                                       known_hosts=cluster.known_hosts, poll_interval=3)
                         + templates_for(scheduler, env.remote_dir))
    assert server.process is not None
    pid = server.process.pid
    log_at = sshd_log_size(cluster)
    try:
        text = " ".join(f"w{n}" for n in range(12))
        first = submit(server, f"tokens_{scheduler}", {"text": text, "delay": 0.4})
        follow(server, first["id"], until=until_type("token"))
        before = ssh_ports_by_pid(cluster).get(pid, set())
        assert len(before) == 1
        cluster.restart_sshd()
        # A submission right after the restart needs the connection again.
        second = submit(server, f"tokens_{scheduler}", {"text": "after the restart",
                                                        "delay": 0})
        events_first = follow(server, first["id"])
        events_second = follow(server, second["id"])
        assert events_first[-1]["type"] == "completed", events_first
        assert events_first[-1]["data"] == {"text": text, "tokens": 12}
        assert events_second[-1]["type"] == "completed", events_second
        assert [e["type"] for e in without_monitor_running(events_second)][:2] == [
            "starting", "submitted"]
        # Releasing the first job's token file needed the new connection too.
        token_file = f"{home_of(cluster)}/{BASE}/{scheduler}/jobs/{first['id']}/token"
        wait_until(lambda: not remote_exists(cluster, token_file), 10, "the token file to go")
        owners = ssh_ports_by_pid(cluster)
        after = owners.get(pid, set())
        assert len(after) == 1 and after != before
        others = {p for other, ports in owners.items() if other != pid for p in ports}
        opened = [p for p in accepted_ports(cluster, log_at) if p not in others]
        FIGURES.add(f"[{scheduler}] sshd restarted under running jobs: both completed; the "
                    f"server opened {len(opened)} SSH connections")
        assert sorted(opened) == sorted(before | after)
        env.other_servers[f"sshd restart ({scheduler})"] = len(opened)
        for events in (events_first, events_second):
            env.scheduler_ids.append(next(e["data"] for e in events if e["type"] == "submitted"))
    finally:
        server.stop()


def _direct_scheduler(env: Env, shell: SSHShell) -> BatchScheduler:
    return BatchScheduler("direct", pbs.DIALECT, shell, workdir=f"{BASE}/direct",
                          poll_interval=1, emit_script=EMIT_SCRIPT)


async def test_submit_latency_kept_transport_vs_fresh_connection(env: Env) -> None:
    runs = 10
    cluster = env.cluster
    # Through the server: POST /api/jobs -> `submitted` (server clock, same machine).
    through_server, server_side = [], []
    for _ in range(runs):
        posted = time.time()
        job = await asyncio.to_thread(submit, env.server, "quick_pbs")
        events = await asyncio.to_thread(follow, env.server, job["id"],
                                         until=until_type("submitted"))
        submitted = events[-1]
        env.scheduler_ids.append(submitted["data"])
        through_server.append((submitted["time"] - posted) * 1000)
        server_side.append((submitted["time"] - events[0]["time"]) * 1000)

    # The same BatchScheduler submit, from here: one kept SSHShell, and a fresh one each.
    template = Template(name="true", cluster="direct", remote_script=f"{env.remote_dir}/true.sh")

    def submission() -> Submission:
        job_id = f"j_direct{secrets.token_hex(6)}"
        return Submission(job_id=job_id, name=f"ms-{job_id[-12:]}", template=template,
                          env={"METIS_JOB_ID": job_id}, token=secrets.token_hex(16))

    def shell() -> SSHShell:
        return SSHShell(cluster.host, port=cluster.port, user=cluster.user,
                        known_hosts=cluster.known_hosts, key_file=cluster.key_file,
                        use_agent=False)

    kept_shell = shell()
    kept = _direct_scheduler(env, kept_shell)
    env.scheduler_ids.append(await kept.submit(submission()))  # connect and stage first
    kept_times = []
    for _ in range(runs):
        started = time.perf_counter()
        env.scheduler_ids.append(await kept.submit(submission()))
        kept_times.append((time.perf_counter() - started) * 1000)
    env.direct_connections += kept_shell.connections_opened
    await kept.close()
    fresh_times = []
    for _ in range(runs):
        fresh_shell = shell()
        fresh = _direct_scheduler(env, fresh_shell)
        started = time.perf_counter()
        env.scheduler_ids.append(await fresh.submit(submission()))
        fresh_times.append((time.perf_counter() - started) * 1000)
        env.direct_connections += fresh_shell.connections_opened
        await fresh.close()

    def line(label: str, times: list[float]) -> str:
        return (f"{label:<58} median {statistics.median(times):7.1f} ms  "
                f"min {min(times):7.1f}  max {max(times):7.1f}  (n={len(times)})")

    FIGURES.add(line("submit latency, POST -> `submitted` (server, kept SSH)", through_server))
    FIGURES.add(line("  of which server-side, `starting` -> `submitted`", server_side))
    FIGURES.add(line("BatchScheduler.submit (qsub), kept SSH transport", kept_times))
    FIGURES.add(line("BatchScheduler.submit (qsub), new SSH connection each", fresh_times))
    assert statistics.median(kept_times) < statistics.median(fresh_times)


def test_walltime_kill_becomes_fatal(env: Env, walltime_job: WalltimeJob) -> None:
    """Last: the job was submitted when the module started (Slurm rounds the 5 s walltime
    up to one minute and checks limits about every 30 s)."""
    events = follow(env.server, walltime_job.job_id,
                    timeout=max(10.0, 150 - (time.monotonic() - walltime_job.submitted)))
    record(env, get_job(env.server, walltime_job.job_id))
    own = without_monitor_running(events)
    started = next(e["time"] for e in own if e["type"] == "step")
    FIGURES.add(f"[pbs] walltime 00:00:05 (Slurm: 1 min): the job started, then was killed "
                f"and turned fatal {own[-1]['time'] - started:.0f} s later")
    assert [e["type"] for e in own] == ["starting", "submitted", "step", "fatal"], events
    data = own[-1]["data"]
    assert data["scheduler_state"].startswith("TIMEOUT, TimeLimit"), data
    # Slurm keeps the 5 s limit as one minute, and says so.
    assert data["error"] == "killed: ran past its 00:01:00 walltime", data
    assert (data["exit_status"], data.get("signal")) == (143, "SIGTERM"), data
    assert get_job(env.server, walltime_job.job_id)["state"] == "failed"


def test_zz_ssh_connections_of_the_module(env: Env) -> None:
    """The SSH connections opened while this module ran, as sshd logged them."""
    total = len(accepted_ports(env.cluster, env.module_log_start))
    others = sum(env.other_servers.values())
    main = total - others - env.direct_connections
    assert env.server.process is not None
    held = ssh_ports_by_pid(env.cluster).get(env.server.process.pid, set())
    restarts = sum(1 for label in env.other_servers if label.startswith("sshd restart"))
    FIGURES.add(f"SSH connections accepted by sshd during the module: {total} = main server "
                f"{main} (holds {len(held)} now; 2 clusters, {restarts} sshd restarts) + "
                f"dedicated servers {env.other_servers} + the test's own "
                f"{env.direct_connections} (latency: 1 kept + 10 fresh)")
    print("\n=== figures ===\n" + "\n".join(FIGURES.lines))
    # One per cluster, plus at most one per cluster for each sshd restart.
    assert 2 <= main <= 2 * (1 + restarts)
    assert len(held) <= 2
