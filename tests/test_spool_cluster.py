"""The spool on the real test cluster (docs/spool.md): events that reach the server only
through the jobs' spools, read over SSH, arrive complete, in order and once, whatever
happens to the route, the server or the lease.

The server listens on this machine's 127.0.0.1, which the cluster's namespace cannot
reach; jobs are given (``public_url``) an address on the cluster's side where a
:class:`TcpProxy` forwards to the server, when the test starts one. No proxy is the
route blocked; stopping it is the route cut.

Every job event is checked against what the job wrote: each token or line once, in
order, seqs without a gap. Run with ``-s`` to see the measured figures.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
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
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.proxy import TcpProxy
from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess, free_port, script_templates
from tests.test_cluster_e2e import (
    API_KEY,
    HEADERS,
    follow,
    home_of,
    ssh_ports_by_pid,
    sshd_log,
    sshd_log_size,
    submit,
    wait_until,
)
from tests.test_launcher_cluster import log_lines, watch

pytestmark = pytest.mark.cluster

RUN_ID = secrets.token_hex(3)
BASE = f"spool-{RUN_ID}"
"""Everything this module puts in the cluster user's home lives under this folder."""
CLUSTER = "spooled"
SECRET = "shared-by-every-server-process-of-this-module"
TERMINAL = {"completed", "fatal", "cancelled"}
WORDS = [f"w{n}" for n in range(60)]
BIG = 10_000

SCRIPTS = {
    # Unmodified: nothing in it knows of metis-stream; the launcher spools its lines.
    "lines": "exec /usr/bin/python3 - <<'EOF'\nimport sys, time\nfor i in range(1, 31):\n"
             "    print(f'py line {i}')\n    time.sleep(0.05)\n"
             "print('to stderr', file=sys.stderr)\nEOF\n",
    # Steps 1-5, then waits for the test to cut the route, then steps 6-10. No output,
    # so that the launcher opens no stream; no retries, so that the cut is seen at once.
    "cut": "export METIS_EMIT_RETRIES=0 METIS_EMIT_RETRY_MAX_TIME=1 METIS_EMIT_TIMEOUT=5\n"
           "i=1\nwhile [ $i -le 10 ]; do\n"
           '    if [ $i -eq 6 ]; then\n'
           '        while [ ! -e "$METIS_JOB_DIR/cut" ]; do sleep 0.1; done\n'
           "    fi\n"
           '    "$METIS_EMIT" step "step $i" || exit\n'
           "    sleep 0.1; i=$((i + 1))\ndone\n",
    # A step every 0.1 s; at the end, a copy of the spool as it is then (after the test
    # truncated it: what the job wrote since).
    "steps": "i=1\nwhile [ $i -le 60 ]; do\n"
             '    "$METIS_EMIT" step "step $i" || exit\n'
             "    sleep 0.1; i=$((i + 1))\ndone\n"
             'cp "$METIS_JOB_DIR/events.ndjson" "$METIS_JOB_DIR/after-truncation"\n',
    # BIG token events through one `metis-emit pipe`.
    "big": f"seq 1 {BIG} | sed 's/^/t/' | \"$METIS_EMIT\" pipe token\n",
    # A step every 0.1 s until the test says stop (at most 90 s).
    "beat": "i=1\n"
            'while [ $i -le 900 ] && [ ! -e "$METIS_JOB_DIR/stop" ]; do\n'
            '    "$METIS_EMIT" step "beat $i" || exit\n'
            "    sleep 0.1; i=$((i + 1))\ndone\n",
}


# ---------------------------------------------------------------------------- servers


def config(cluster: TestCluster, folder: Path, *, delivery: str = "spool",
           spool_interval: float = 0.3, poll_interval: float = 1.0) -> str:
    return (f'\n[clusters.{CLUSTER}]\nscheduler = "slurm"\nhost = "{cluster.host}"\n'
            f'port = {cluster.port}\nuser = "{cluster.user}"\n'
            f'key_file = "{cluster.key_file}"\nknown_hosts = "{cluster.known_hosts}"\n'
            f'use_agent = false\nworkdir = "{BASE}/{CLUSTER}"\n'
            f'poll_interval = {poll_interval}\ndelivery = "{delivery}"\n'
            f"spool_interval = {spool_interval}\n"
            f'\n[templates.tokens]\ncluster = "{CLUSTER}"\n'
            f'script = "{JOBSCRIPTS_DIR / "tokens.pbs"}"\n'
            'resources = { walltime = "00:05:00" }\n'
            'params.text = { type = "str", max_length = 2000 }\n'
            'params.delay = { type = "float", min = 0, max = 5, default = 0 }\n'
            + script_templates(folder / "scripts", SCRIPTS, cluster=CLUSTER))


def spool_server(cluster: TestCluster, folder: Path, extra_config: str, *, public_port: int,
                 redis: RedisServer | None = None) -> ServerProcess:
    """A server where jobs cannot reach it (this machine's 127.0.0.1), which tells them
    to call ``public_port`` on the cluster's side (where a proxy may forward)."""
    settings: dict[str, object] = {
        "api_keys": [tokens.hash_api_key(API_KEY)], "secret": SECRET,
        "public_url": f"http://{cluster.server_address}:{public_port}",
        "submissions_per_minute": 100_000.0, "max_events_per_job": 3 * BIG}
    if redis is not None:
        settings["redis_url"] = redis.url
    return ServerProcess(state_dir=folder, host="127.0.0.1", extra_config=extra_config,
                         server_settings=settings)


@dataclass
class Env:
    cluster: TestCluster

    def job_dir(self, job_id: str) -> str:
        return f"{home_of(self.cluster)}/{BASE}/{CLUSTER}/jobs/{job_id}"

    def touch(self, job_id: str, name: str) -> None:
        self.cluster.run_as_user(["touch", f"{self.job_dir(job_id)}/{name}"], check=True)

    def read(self, job_id: str, name: str) -> str:
        return self.cluster.run_as_user(["cat", f"{self.job_dir(job_id)}/{name}"],
                                        check=True).stdout


@pytest.fixture(scope="module")
def env(test_cluster: TestCluster) -> Iterator[Env]:  # noqa: F811
    state = Env(test_cluster)
    try:
        yield state
    finally:
        # Every job this module started: its launcher lives in the module's folder.
        listed = test_cluster.run_as_user(["squeue", "-h", "-u", test_cluster.user,
                                           "-o", "%i %o"]).stdout
        leftover = [line.split()[0] for line in listed.splitlines()
                    if f"/{BASE}/" in line]
        if leftover:
            test_cluster.run_as_user(["scancel", *leftover])
        test_cluster.run_as_user(["rm", "-rf", BASE])


@contextlib.contextmanager
def started(*servers: ServerProcess) -> Iterator[None]:
    try:
        for server in servers:
            server.start()
        yield
    finally:
        for server in servers:
            server.stop()


# ---------------------------------------------------------------------------- evidence


def all_events(server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    """The job's whole log, page by page."""
    events: list[dict[str, Any]] = []
    while True:
        page = httpx.get(f"{server.url}/api/jobs/{job_id}/events", headers=HEADERS,
                         params={"after": len(events)}, timeout=30)
        assert page.status_code == 200, page.text
        events += page.json()["events"]
        if not page.json()["more"]:
            return events


def wait_ended(server: ServerProcess, job_id: str, timeout: float = 90
               ) -> list[dict[str, Any]]:
    def ended() -> bool:
        answer = httpx.get(f"{server.url}/api/jobs/{job_id}", headers=HEADERS, timeout=30)
        return bool(answer.json()["state"] in ("completed", "failed", "cancelled"))
    wait_until(ended, timeout, f"job {job_id} to end")
    return all_events(server, job_id)


_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", re.MULTILINE)


def metrics(server: ServerProcess) -> dict[str, float]:
    """``/metrics`` as {'name{labels}': value}."""
    text = httpx.get(f"{server.url}/metrics", headers=HEADERS, timeout=30).text
    return {name + (labels or ""): float(value)
            for name, labels, value in _SAMPLE.findall(text)}


SPOOL_READS = f'metis_spool_reads_total{{cluster="{CLUSTER}"}}'
BY_HTTP = 'metis_events_appended_total{by="job",path="http"}'
BY_SPOOL = 'metis_events_appended_total{by="job",path="spool"}'


def from_the_job(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job's own events: not the server's starting and submitted, nor the monitor's
    running, nor the server's notices."""
    return [e for e in events if e["type"] not in ("starting", "submitted")
            and not (e["type"] == "running" and e["data"] == {"source": "scheduler"})
            and not (e["type"] == "log" and isinstance(e["data"], dict)
                     and e["data"].get("source") == "spool")]


def assert_gapless(events: list[dict[str, Any]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), [
        e["seq"] for e in events]
    assert [e["type"] for e in events].count("starting") == 1
    assert [e["type"] for e in events if e["type"] in TERMINAL] == [events[-1]["type"]]


def assert_tokens_job_whole(events: list[dict[str, Any]], words: list[str]) -> None:
    """Every word and progress event of a `tokens` job once, in order."""
    assert_gapless(events)
    own = from_the_job(events)
    expected: list[tuple[str, Any]] = [("step", "Loading model"), ("step", "Generating")]
    for index, word in enumerate(words):
        expected.append(("token", word if index == 0 else " " + word))
        expected.append(("progress", {"current": index + 1, "total": len(words)}))
    expected.append(("completed", {"text": " ".join(words), "tokens": len(words)}))
    assert [(e["type"], e["data"]) for e in own] == expected


def job_posts(server: ServerProcess, job_id: str) -> list[str]:
    """The access log's lines of events posted to the job over HTTP."""
    return [line for line in server.log().splitlines()
            if f"POST /api/jobs/{job_id}/events" in line]


# ---------------------------------------------------------------------------- tests


def test_with_the_route_blocked_every_event_comes_by_the_spool_once_in_order(
        env: Env, tmp_path: Path) -> None:
    """No proxy: nothing answers on the job's side, and the server is out of its reach."""
    port = free_port(env.cluster.server_address)
    server = spool_server(env.cluster, tmp_path / "server", config(env.cluster, tmp_path),
                          public_port=port)
    with started(server):
        tokens_job = submit(server, "tokens", {"text": " ".join(WORDS), "delay": 0.02})["id"]
        lines_job = submit(server, "lines")["id"]
        watched = {job_id: watch(server, job_id) for job_id in (tokens_job, lines_job)}
        stored = {job_id: all_events(server, job_id) for job_id in watched}
        counts = metrics(server)
        log = server.log()
    for job_id, seen in watched.items():
        assert seen.events == stored[job_id]
        own = from_the_job(seen.events)
        assert own and all(e.get("via") == "spool" for e in own), own
        assert all("via" not in e for e in seen.events if e["type"] in ("starting",
                                                                          "submitted"))
    assert_tokens_job_whole(watched[tokens_job].events, WORDS)
    lines = watched[lines_job].events
    assert_gapless(lines)
    assert log_lines(lines) == [f"py line {i}" for i in range(1, 31)]
    assert log_lines(lines, "stderr") == ["to stderr"]
    assert (lines[-1]["type"], lines[-1]["data"]) == ("completed", {"exit_status": 0})
    # The job could not reach the server, and did not: no request, all by the spool.
    if env.cluster.mode == "netns":
        for url in (server.url, f"http://{env.cluster.server_address}:{port}"):
            tried = env.cluster.run_as_user(["curl", "-sS", "-m", "5", "-o", "/dev/null", url])
            assert tried.returncode == 7, (url, tried)  # could not connect
    assert "POST /api/jobs/" not in log
    assert counts.get(BY_HTTP, 0) == 0
    assert counts[BY_SPOOL] == sum(len(from_the_job(e)) for e in stored.values())
    print(f"route blocked: {counts[SPOOL_READS]:.0f} spool reads, "
          f"{counts[BY_SPOOL]:.0f} events by the spool")


@pytest.mark.redis
def test_a_server_killed_and_restarted_mid_job_loses_and_doubles_nothing(
        env: Env, tmp_path: Path, private_redis: RedisServer) -> None:
    server = spool_server(env.cluster, tmp_path / "server", config(env.cluster, tmp_path),
                          public_port=free_port(env.cluster.server_address),
                          redis=private_redis)
    with started(server):
        job_id = submit(server, "tokens", {"text": " ".join(WORDS), "delay": 0.2})["id"]
        before = follow(server, job_id, until=lambda e: e["type"] == "token"
                        and e["data"] == " w9")
        server.kill()
        time.sleep(1.0)
        server.start()
        events = follow(server, job_id)
        assert events == all_events(server, job_id)
    assert events[:len(before)] == before
    assert_tokens_job_whole(events, WORDS)
    assert all(e.get("via") == "spool" for e in from_the_job(events))
    tokens_after = [e for e in events[len(before):] if e["type"] == "token"]
    assert len(tokens_after) >= 30, "the kill came mid-job"


@pytest.mark.redis
def test_the_lease_moves_to_another_server_mid_job_and_it_reads_on(
        env: Env, tmp_path: Path, private_redis: RedisServer) -> None:
    """Two servers on one Redis; the first holds the cluster's lease (TTL 5 s with a
    poll_interval of 1 s) and is stopped mid-job; the second takes over the reading."""
    extra = config(env.cluster, tmp_path)
    port = free_port(env.cluster.server_address)
    first = spool_server(env.cluster, tmp_path / "first", extra, public_port=port,
                         redis=private_redis)
    second = spool_server(env.cluster, tmp_path / "second", extra, public_port=port,
                          redis=private_redis)
    with started(first):
        time.sleep(0.5)  # its monitor takes the lease first
        with started(second):
            job_id = submit(first, "tokens", {"text": " ".join(WORDS), "delay": 0.2})["id"]
            before = follow(second, job_id, until=lambda e: e["type"] == "token"
                            and e["data"] == " w9")
            first_counts, second_before = metrics(first), metrics(second)
            first.stop()
            stopped = time.monotonic()
            events = follow(second, job_id)
            ended = time.monotonic()
            second_after = metrics(second)
    assert events[:len(before)] == before
    assert_tokens_job_whole(events, WORDS)
    assert all(e.get("via") == "spool" for e in from_the_job(events))
    # The first server read the spool until it stopped, the second only after.
    assert first_counts[SPOOL_READS] > 0
    assert second_before.get(SPOOL_READS, 0) == 0
    assert second_after[SPOOL_READS] > 0
    # Each event counted once, by the one that appended it; the second, most of them.
    assert first_counts[BY_SPOOL] + second_after[BY_SPOOL] <= len(from_the_job(events))
    assert second_after[BY_SPOOL] >= 40
    tokens_after = [e for e in events[len(before):] if e["type"] == "token"]
    assert len(tokens_after) >= 30, "the lease moved mid-job"
    # It took over while the job still wrote (12 s of words; the lease's TTL is 5 s).
    assert second_after[SPOOL_READS] >= 3
    print(f"lease moved: the second server read {second_after[SPOOL_READS]:.0f} times, "
          f"{second_after[BY_SPOOL]:.0f} events; the job ended "
          f"{ended - stopped:.1f} s after the first server stopped")


def test_with_both_the_events_after_a_cut_come_by_the_spool_once_in_order(
        env: Env, tmp_path: Path) -> None:
    """The route works for steps 1-5 (HTTP, and the spool as the safety net), then is
    cut; steps 6-10 and the end find no server, and come by the spool."""
    public_port = free_port(env.cluster.server_address)
    server = spool_server(env.cluster, tmp_path / "server",
                          config(env.cluster, tmp_path, delivery="both", spool_interval=1.0),
                          public_port=public_port)
    proxy = TcpProxy(env.cluster.server_address, public_port, "127.0.0.1", server.port)
    proxy.start()
    try:
        with started(server):
            job_id = submit(server, "cut")["id"]
            before = follow(server, job_id, until=lambda e: e["data"] == "step 5")
            # Step 5 may have come by the spool first: cut once its request is answered.
            wait_until(lambda: len(job_posts(server, job_id)) == 5, 10, "the fifth post")
            proxy.stop()
            posted = job_posts(server, job_id)
            env.touch(job_id, "cut")
            events = follow(server, job_id)
            assert events == all_events(server, job_id)
            counts = metrics(server)
            posts_after_cut = job_posts(server, job_id)[len(posted):]
    finally:
        proxy.stop()
    assert_gapless(events)
    # The job's own stderr: what metis-emit said about the cut (below).
    warnings = log_lines(events, "stderr")
    own = [e for e in from_the_job(events) if e["type"] != "log"]
    assert [(e["type"], e["data"]) for e in own] == [
        *(("step", f"step {i}") for i in range(1, 11)), ("completed", {"exit_status": 0})]
    # Steps 1-5 were posted, each once, and taken (200); the reader may have read one
    # from the spool between its line and its request: then that request was dropped
    # by the event's id.
    assert len(posted) == 5 and all('" 200' in line for line in posted), posted
    assert proxy.connections == 5
    by_http = [e for e in own[:5] if "via" not in e]
    assert by_http, "HTTP delivered the steps before the cut"
    assert counts[BY_HTTP] == len(by_http)
    assert counts[BY_SPOOL] == len(from_the_job(events)) - len(by_http)
    # After the cut: nothing reached the server over HTTP; all by the spool.
    assert posts_after_cut == []
    assert all(e.get("via") == "spool" for e in own[5:])
    assert [e["data"] for e in before if e["type"] == "step"] == [
        f"step {i}" for i in range(1, 6)]
    # The job saw the server unreachable at step 6, warned once, and went spool-only.
    assert env.cluster.run_as_user(["test", "-e", f"{env.job_dir(job_id)}/spool-only"]
                                   ).returncode == 0
    warned = [line for line in warnings if "the event is in the spool" in line]
    assert len(warned) == 1 and "posting the step event failed" in warned[0], warnings
    assert env.read(job_id, "stderr").splitlines() == warnings


def test_ten_thousand_events_and_one_reader_command_per_read_for_all_jobs(
        env: Env, tmp_path: Path) -> None:
    """A job writes BIG events through `metis-emit pipe` while two others write a step
    every 0.1 s. Every command the server runs on the cluster is one "Starting session:
    command" line in sshd's log: while the three run, those are the reads (one each,
    not one per job) and the monitor's polls (one every poll_interval)."""
    poll_interval = 2.0
    server = spool_server(env.cluster, tmp_path / "server",
                          config(env.cluster, tmp_path, poll_interval=poll_interval),
                          public_port=free_port(env.cluster.server_address))
    with env.cluster.oversubscribed(4), started(server):
        jobs = [submit(server, name)["id"] for name in ("big", "beat", "beat")]
        big, beats = jobs[0], jobs[1:]
        wait_until(lambda: all(from_the_job(all_events(server, job_id)) for job_id in jobs),
                   60, "each job's first event")
        assert server.process is not None
        start = Snapshot.take(server, env.cluster)
        events = wait_ended(server, big, timeout=120)
        end = Snapshot.take(server, env.cluster)
        for job_id in beats:
            env.touch(job_id, "stop")
        beat_events = [wait_ended(server, job_id) for job_id in beats]
    assert_gapless(events)
    own = from_the_job(events)
    assert [e["data"] for e in own if e["type"] == "token"] == [f"t{i}" for i in
                                                                range(1, BIG + 1)]
    assert [e["type"] for e in own] == ["token"] * BIG + ["completed"]
    assert all(e.get("via") == "spool" for e in own)
    for beat in beat_events:
        assert_gapless(beat)
        steps = [e["data"] for e in from_the_job(beat) if e["type"] == "step"]
        assert steps == [f"beat {i}" for i in range(1, len(steps) + 1)]
        assert beat[-1]["type"] == "completed"
    # The beats ran through the whole window: they ended only when told to.
    assert all(min(e["time"] for e in beat if e["type"] == "completed") > end.time
               for beat in beat_events)
    reads = end.reads - start.reads
    commands = count_commands(env.cluster, start, end)
    seconds = end.time - start.time
    polls = math.ceil(seconds / poll_interval) + 1
    print(f"{BIG} events in {seconds:.1f} s: {reads:.0f} reads, {commands} commands on the "
          f"cluster (at most {polls} of them polls), 3 jobs")
    assert reads >= 10
    # One command a read for all three jobs; a command a job would be 3 a read.
    assert reads - 1 <= commands <= reads + 1 + polls


@dataclass
class Snapshot:
    """The server's spool reads and sshd's log at one moment."""

    time: float
    reads: float
    log_offset: int
    ports: set[int]

    @classmethod
    def take(cls, server: ServerProcess, cluster: TestCluster) -> Snapshot:
        assert server.process is not None
        ports = ssh_ports_by_pid(cluster).get(server.process.pid, set())
        return cls(time.time(), metrics(server)[SPOOL_READS], sshd_log_size(cluster), ports)


_SESSION = re.compile(r"Starting session: command for \S+ from \S+ port ([0-9]+)")


def count_commands(cluster: TestCluster, start: Snapshot, end: Snapshot) -> int:
    """The commands that the server's connections ran between the two snapshots."""
    with sshd_log(cluster).open("rb") as log:
        log.seek(start.log_offset)
        text = log.read(end.log_offset - start.log_offset).decode(errors="replace")
    ports = start.ports | end.ports
    assert ports, "the server has a connection to sshd"
    return sum(1 for port in _SESSION.findall(text) if int(port) in ports)


def test_a_spool_truncated_mid_job_is_reported_and_nothing_is_invented_or_lost_after(
        env: Env, tmp_path: Path) -> None:
    """The spool emptied by hand (as the cluster user) while the job writes a step every
    0.1 s: what the job wrote before and the reader had not taken is gone with it; what
    it writes after must all come, and nothing else."""
    server = spool_server(env.cluster, tmp_path / "server", config(env.cluster, tmp_path),
                          public_port=free_port(env.cluster.server_address))
    with started(server):
        job_id = submit(server, "steps")["id"]
        follow(server, job_id, until=lambda e: e["data"] == "step 10")
        env.cluster.run_as_user(["sh", "-c", ': > "$1"', "sh",
                                 f"{env.job_dir(job_id)}/events.ndjson"], check=True)
        events = wait_ended(server, job_id)
    assert_gapless(events)
    written = [f"step {i}" for i in range(1, 61)]
    steps = [e["data"] for e in from_the_job(events) if e["type"] == "step"]
    # Nothing invented, nothing twice, nothing out of order.
    assert steps == [step for step in written if step in steps]
    assert {e["type"] for e in from_the_job(events)} == {"step", "completed"}
    # What the job wrote after the truncation all came.
    since = [json.loads(line)["data"] for line in
             env.read(job_id, "after-truncation").splitlines()]
    assert since and since == steps[len(steps) - len(since):]
    notices = [line for e in events if e["type"] == "log"
               and e["data"].get("source") == "spool" for line in e["data"]["lines"]]
    assert any("the spool shrank" in line or "(rewritten in place)" in line
               for line in notices), notices
    lost = [step for step in written if step not in steps]
    print(f"truncated spool: {len(lost)} steps lost with the truncation ({lost}), "
          f"{len(since)} written after it, all arrived; notices {notices}")
