"""The launcher on the real test cluster (Slurm 22.05 and its PBS wrappers, behind sshd):
unmodified batch scripts stream their output, keep their exit status, and say why they
died. A real server process; jobs call back with curl through the uploaded metis-emit.

The walltime job is submitted first (module fixture) and checked last: Slurm keeps time
limits in whole minutes, so its kill takes 60 to 90 s, which overlaps the other tests.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from metis_stream import tokens
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess, free_port, script_templates
from tests.test_cluster_e2e import (
    API_KEY,
    WalltimeJob,
    cluster_block,
    follow,
    get_job,
    home_of,
    make_server,
    submit,
)

pytestmark = pytest.mark.cluster

SCHEDULERS = ("pbs", "slurm")
TERMINAL = {"completed", "fatal", "cancelled"}
FLOOD_LINES = 200_000

SCRIPTS = {
    # Unmodified scripts: nothing in them knows of metis-stream.
    "loop": "i=1\nwhile [ $i -le 20 ]; do echo \"line $i\"; sleep 0.2; i=$((i + 1)); done\n",
    "python": "exec /usr/bin/python3 - <<'EOF'\nimport time\nfor i in range(1, 21):\n"
              "    print(f'py line {i}')\n    time.sleep(0.2)\nEOF\n",
    "raises": "exec /usr/bin/python3 - <<'EOF'\nprint('loading')\n"
              "raise ValueError('the input has no rows')\nEOF\n",
    "walltime": "echo 'step 1 done' >&2\necho 'step 2 is slow' >&2\nexec sleep 600\n",
    "flood": "exec /usr/bin/python3 -c "
             f"'for i in range(1, {FLOOD_LINES + 1}): print(\"line\", i)'\n",
    # Reports the time it sends each step: the server's clock is the same machine's.
    "ticker": "i=1\nwhile [ $i -le 25 ]; do\n"
              '    "$METIS_EMIT" step "$(date +%s.%N)" || exit\n'
              "    sleep 0.2; i=$((i + 1))\ndone\n",
    "hostile": ("/usr/bin/python3 - <<'EOF'\nimport sys\nout = sys.stdout.buffer\n"
                "out.write(b'\\xc3\\xa9' + b'x' * (1 << 20) + b'\\n')\n"
                "out.write(b'bad \\xff\\xfe utf8\\n')\n"
                "out.write(b'\\r 10%\\r 50%\\r100%\\n')\n"
                "out.write(b'\\x1b[1;32mgreen\\x1b[0m\\n')\nEOF\necho done\n"),
    # Waits for the test's go (the server is stopped by then), takes its token away so
    # that the launcher cannot report, and exits 3.
    "vanish": 'while [ ! -e "$METIS_JOB_DIR/go" ]; do sleep 0.2; done\n'
              'rm -f "$METIS_TOKEN_FILE"\nexit 3\n',
}


def templates(folder: Path, cluster: str) -> str:
    return script_templates(folder, SCRIPTS, {
        "walltime": 'resources = { walltime = "00:00:05" }\n',
        "hostile": "log_max_bytes = 4000000\n",  # the 1 MB line, whole
    }, cluster=cluster, suffix=f"_{cluster}")


@dataclass
class Env:
    cluster: TestCluster
    server: ServerProcess
    folder: Path
    base: str
    scheduler_ids: list[str] = field(default_factory=list)

    def job_dir(self, cluster_name: str, job_id: str) -> str:
        return f"{home_of(self.cluster)}/{self.base}/{cluster_name}/jobs/{job_id}"


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster,  # noqa: F811
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    folder = tmp_path_factory.mktemp("launcher")
    base = f"launcher-{folder.name}"
    state = Env(test_cluster, None, folder, base)  # type: ignore[arg-type]
    state.server = make_server(test_cluster, folder / "server", launcher_config(state))
    try:
        yield state
    finally:
        state.server.stop()
        for scheduler_id in state.scheduler_ids:
            test_cluster.run_as_user(["scancel", scheduler_id])
        test_cluster.run_as_user(["rm", "-rf", base])


def launcher_config(state: Env, poll_interval: float = 1.0) -> str:
    out = ""
    for name in SCHEDULERS:
        block = cluster_block(state.cluster, name, name, known_hosts=state.cluster.known_hosts,
                              poll_interval=poll_interval)
        # cluster_block names the e2e module's folder: this module has its own.
        out += block.replace(block[block.index("workdir"):].split("\n", 1)[0],
                             f'workdir = "{state.base}/{name}"')
        out += templates(state.folder / "scripts", name)
    return out


def record(env: Env, job_id: str, server: ServerProcess | None = None) -> dict[str, Any]:
    job = get_job(server or env.server, job_id)
    if job.get("scheduler_id"):
        env.scheduler_ids.append(job["scheduler_id"])
    return job


@dataclass
class Watched:
    events: list[dict[str, Any]] = field(default_factory=list)
    received: list[float] = field(default_factory=list)
    """When each event arrived at the watcher (time.time())."""


def watch(server: ServerProcess, job_id: str, timeout: float = 120) -> Watched:
    """A websocket watcher from the job's first event to its terminal one."""
    seen = Watched()
    url = f"{server.ws_url}/ws/jobs/{job_id}"
    with connect(url, additional_headers={"Authorization": f"Bearer {API_KEY}"},
                 open_timeout=30) as socket:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = json.loads(socket.recv(timeout=deadline - time.monotonic()))
            seen.events.append(event)
            seen.received.append(time.time())
            if event["type"] in TERMINAL:
                return seen
    raise AssertionError(f"job {job_id}: no terminal event in {timeout} s: {seen.events}")


def log_lines(events: list[dict[str, Any]], stream: str = "stdout") -> list[str]:
    return [line for e in events if e["type"] == "log" and e["data"]["stream"] == stream
            for line in e["data"]["lines"]]


@pytest.fixture(scope="module")
def walltime_job(env: Env) -> WalltimeJob:
    """Submitted before every other test of the module and checked by the last one."""
    job = submit(env.server, "walltime_slurm")
    return WalltimeJob(job["id"], time.monotonic())


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("script", "prefix"), [("loop", "line"), ("python", "py line")])
def test_an_unmodified_script_streams_every_line_once_in_order_while_it_runs(
        env: Env, walltime_job: WalltimeJob, scheduler: str, script: str, prefix: str) -> None:
    job = submit(env.server, f"{script}_{scheduler}")
    seen = watch(env.server, job["id"])
    record(env, job["id"])
    events = seen.events
    assert events[-1]["type"] == "completed", events
    assert events[-1]["data"] == {"exit_status": 0}
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert log_lines(events) == [f"{prefix} {i}" for i in range(1, 21)]
    assert log_lines(events, "stderr") == []
    # The first line came while the job ran: its 20 lines take 4 s.
    first = next(i for i, e in enumerate(events) if e["type"] == "log")
    assert seen.received[-1] - seen.received[first] > 2.5, seen.received
    # Lines that come 0.2 s apart need no grouping, but never more events than lines.
    assert 1 < len([e for e in events if e["type"] == "log"]) <= 20
    stdout = env.cluster.run_as_user(["cat", f"{env.job_dir(scheduler, job['id'])}/stdout"])
    assert stdout.stdout == "".join(f"{prefix} {i}\n" for i in range(1, 21))
    exit_file = env.cluster.run_as_user(["cat", f"{env.job_dir(scheduler, job['id'])}/exit"])
    assert exit_file.stdout == "0\n"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_python_script_that_raises_is_fatal_with_its_traceback(env: Env,
                                                                 scheduler: str) -> None:
    job = submit(env.server, f"raises_{scheduler}")
    events = follow(env.server, job["id"])
    record(env, job["id"])
    end = events[-1]
    assert end["type"] == "fatal", events
    assert end["data"]["exit_status"] == 1
    assert end["data"]["error"] == "the script exited with status 1"
    assert end["data"]["stderr_tail"][0] == "Traceback (most recent call last):"
    assert end["data"]["stderr_tail"][-1] == "ValueError: the input has no rows"
    assert log_lines(events) == ["loading"]
    assert log_lines(events, "stderr")[-1] == "ValueError: the input has no rows"
    assert [e["type"] for e in events].count("fatal") == 1
    assert get_job(env.server, job["id"])["state"] == "failed"


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_hostile_output_never_breaks_the_stream(env: Env, scheduler: str) -> None:
    job = submit(env.server, f"hostile_{scheduler}")
    events = follow(env.server, job["id"])
    record(env, job["id"])
    assert events[-1]["type"] == "completed", [e["type"] for e in events]
    lines = log_lines(events)
    assert lines[-4:] == ["bad \ufffd\ufffd utf8", "100%", "\x1b[1;32mgreen\x1b[0m", "done"]
    assert "".join(lines[:-4]) == "é" + "x" * (1 << 20)
    printed = ("é" + "x" * (1 << 20) + "\n").encode() + (
        b"bad \xff\xfe utf8\n\r 10%\r 50%\r100%\n\x1b[1;32mgreen\x1b[0m\ndone\n")
    digest = env.cluster.run_as_user(["sha256sum",
                                      f"{env.job_dir(scheduler, job['id'])}/stdout"])
    assert digest.stdout.split()[0] == hashlib.sha256(printed).hexdigest()


def test_a_flood_of_output_stays_within_the_budget_and_slows_no_one(env: Env) -> None:
    def latencies() -> list[float]:
        job = submit(env.server, "ticker_pbs")
        events = follow(env.server, job["id"])
        record(env, job["id"])
        assert events[-1]["type"] == "completed", events
        return [e["time"] - float(e["data"]) for e in events if e["type"] == "step"]

    quiet = latencies()
    flood = submit(env.server, "flood_slurm")
    during: list[float] = []
    measuring = threading.Thread(target=lambda: during.extend(latencies()))
    measuring.start()
    events = follow(env.server, flood["id"], timeout=180)
    measuring.join(120)
    record(env, flood["id"])
    assert events[-1]["type"] == "completed", events[-3:]
    logs = [e for e in events if e["type"] == "log"]
    assert len(logs) <= 5000
    assert sum(len(line.encode()) for e in logs for line in e["data"]["lines"]
               if e["data"]["stream"] == "stdout") <= 1 << 20
    notices = [e for e in logs if e["data"]["stream"] == "notice"]
    sent = log_lines(events)
    assert [n["data"]["lines"] for n in notices] == [
        [f"output truncated after {len(sent)} lines; the files hold all of it"]]
    assert sent == [f"line {i}" for i in range(1, len(sent) + 1)]
    counted = env.cluster.run_as_user(["wc", "-l", f"{env.job_dir('slurm', flood['id'])}/stdout"])
    assert counted.stdout.split()[0] == str(FLOOD_LINES)
    last = env.cluster.run_as_user(["tail", "-n", "1",
                                    f"{env.job_dir('slurm', flood['id'])}/stdout"])
    assert last.stdout == f"line {FLOOD_LINES}\n"
    print(f"flood: {len(logs)} log events for {len(sent)} lines sent of {FLOOD_LINES}; "
          f"step latency median quiet {statistics.median(quiet) * 1000:.0f} ms, "
          f"during the flood {statistics.median(during) * 1000:.0f} ms")
    assert len(during) == 25
    assert statistics.median(during) <= 2 * max(statistics.median(quiet), 0.02)


@pytest.mark.redis
def test_a_job_the_scheduler_forgot_ends_with_the_status_of_its_exit_file(
        env: Env, tmp_path: Path, private_redis: RedisServer) -> None:
    """Slurm forgets a finished job MinJobAge seconds after its end (PBS Pro without job
    history, Torque after keep_completed do the same). The server is away while the jobs
    end, so that it never sees them ended; their launchers cannot report (the scripts
    took their tokens away); the monitor then finds only their exit files."""
    cluster = env.cluster
    port = free_port(cluster.server_address)
    # On Redis: the server restarts, and its jobs must still be there.
    server = ServerProcess(
        state_dir=tmp_path / "server", host=cluster.server_address, port=port,
        extra_config=launcher_config(env), server_settings={
            "api_keys": [tokens.hash_api_key(API_KEY)], "redis_url": private_redis.url,
            "public_url": f"http://{cluster.server_address}:{port}"})
    server.start()
    try:
        with cluster.slurm_setting("MinJobAge", "2"):
            jobs = {name: submit(server, f"vanish_{name}")["id"] for name in SCHEDULERS}
            ids = {}
            for name, job_id in jobs.items():
                events = follow(server, job_id, until=lambda e: e["type"] == "submitted")
                ids[name] = events[-1]["data"]
                env.scheduler_ids.append(ids[name])
            # Whether they run yet or wait for a free CPU, they end after this.
            server.stop()
            for name, job_id in jobs.items():
                cluster.run_as_user(["touch", f"{env.job_dir(name, job_id)}/go"], check=True)
            # slurmctld purges old jobs once a minute; a job may wait for the walltime
            # job's CPU first.
            for scheduler_id in ids.values():
                wait_for(lambda i=scheduler_id: job_state(cluster, i) == "", 240,
                         f"Slurm to forget job {scheduler_id}")
            server.start()
            for name, job_id in jobs.items():
                end = follow(server, job_id, timeout=60)[-1]
                assert end["type"] == "fatal", end
                assert end["data"] == {
                    "error": "the job is no longer known to the scheduler: the script exited "
                             "with status 3",
                    "exit_status": 3, "scheduler_state": "unknown"}, name
    finally:
        server.stop()


def test_a_walltime_kill_is_fatal_with_its_cause_and_last_stderr_lines(
        env: Env, walltime_job: WalltimeJob) -> None:
    """Last: the job was submitted when the module started."""
    events = follow(env.server, walltime_job.job_id,
                    timeout=max(10.0, 150 - (time.monotonic() - walltime_job.submitted)))
    record(env, walltime_job.job_id)
    end = events[-1]
    assert end["type"] == "fatal", events
    data = end["data"]
    assert data["error"] == "killed: ran past its 00:01:00 walltime", data
    assert data["scheduler_state"].startswith("TIMEOUT, TimeLimit"), data
    assert (data["exit_status"], data["signal"]) == (143, "SIGTERM")
    assert data["stderr_tail"] == ["step 1 done", "step 2 is slow"]
    assert log_lines(events, "stderr") == ["step 1 done", "step 2 is slow"]
    assert [e["type"] for e in events].count("fatal") == 1


def job_state(cluster: TestCluster, scheduler_id: str) -> str:
    """The job's state as Slurm says it, or "" when Slurm no longer knows it."""
    shown = cluster.run_as_user(["scontrol", "-o", "show", "job", scheduler_id])
    found = [part.split("=", 1)[1] for part in shown.stdout.split()
             if part.startswith("JobState=")]
    return found[0] if found else ""


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.5)
