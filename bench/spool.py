"""The spool's figures on the real test cluster (docs/spool.md): how long an event takes
from a job's spool to a websocket at the default intervals, and what reading the spools
of 100 running jobs costs per read. Builds its own test cluster (root).

    sudo .venv/bin/python -m bench.spool [--jobs 100] [--window 30] [--quick]

1. Latency, one job at a time (the reader reads every job's spool at once, so a second
   job would change the first one's figures), on a cluster at the defaults
   (``spool_interval`` 1 s, ``poll_interval`` 10 s): a steady job (an event every
   0.1 s) and a sparse one (an event every 3 s). The job puts ``date +%s.%N`` in each
   event's data just before it calls ``metis-emit step``; the latency is the time the
   websocket frame arrived less that (the same machine's clock).
2. 100 jobs at once, each appending an event to its spool every second, for ``--window``
   seconds: the server's spool reads and bytes (``/metrics``), every command the server
   ran on the cluster (one "Starting session: command" line in sshd's log each, from the
   server's connection), and the reader command itself, timed from here over a kept
   connection of the bench's own, as the server runs it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/spool.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import httpx
import orjson
from websockets.sync.client import connect

from metis_stream import tokens
from metis_stream.config import EMIT_SCRIPT
from metis_stream.events import MAX_EVENT_BYTES
from metis_stream.schedulers import slurm
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.shells.ssh import SSHShell
from metis_stream.spool import SpoolCursor, read_request, take
from tests.support.cluster import TestCluster, build_cluster
from tests.support.server import ServerProcess, script_templates

API_KEY = "bench-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CLUSTER = "bench"
WORKDIR = "metis-spool-bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SPOOL_MAX_BYTES = 1024 * 1024  # the default

SCRIPTS = {
    # The job's clock in each event, taken just before metis-emit writes it.
    "ticker": 'i=1\nwhile [ "$i" -le "$COUNT" ]; do\n'
              '    "$METIS_EMIT" step "$(date +%s.%N)" || exit\n'
              '    sleep "$INTERVAL"; i=$((i + 1))\ndone\n',
    # An event a second, appended with the shell's own printf (one write of one line in
    # the spool's format, as metis-emit writes it): 100 jobs of metis-emit calls would
    # take this machine's two cores, and the figures would be the jobs', not the
    # reader's. Stops when the bench leaves a file `stop` in the workdir.
    "writer": 'spool=$METIS_JOB_DIR/events.ndjson\ni=1\n'
              'while [ "$i" -le 600 ] && [ ! -e "$METIS_JOB_DIR/../../stop" ]; do\n'
              '    printf \'{"type":"step","data":"beat %s","id":"%s.%s"}\\n\' '
              '"$i" "$METIS_JOB_ID" "$i" >> "$spool"\n'
              "    sleep 1; i=$((i + 1))\ndone\n",
}
TEMPLATE_LINES = {
    "ticker": 'params.count = { type = "int", min = 1, max = 10000 }\n'
              'params.interval = { type = "float", min = 0, max = 60 }\n',
    "writer": "capture = false\n",  # no output: no capture processes in 100 jobs
}


def server_config(cluster: TestCluster, folder: Path) -> str:
    """The cluster at its defaults (spool_interval 1 s, poll_interval 10 s), spool only."""
    return (f'\n[clusters.{CLUSTER}]\nscheduler = "slurm"\nhost = "{cluster.host}"\n'
            f'port = {cluster.port}\nuser = "{cluster.user}"\n'
            f'key_file = "{cluster.key_file}"\nknown_hosts = "{cluster.known_hosts}"\n'
            f'use_agent = false\nworkdir = "{WORKDIR}"\ndelivery = "spool"\n'
            + script_templates(folder / "scripts", SCRIPTS, TEMPLATE_LINES, cluster=CLUSTER))


def start_server(cluster: TestCluster, folder: Path) -> ServerProcess:
    server = ServerProcess(
        state_dir=folder / "server", extra_config=server_config(cluster, folder),
        server_settings={"api_keys": [tokens.hash_api_key(API_KEY)],
                         "submissions_per_minute": 100_000.0,
                         # Nothing answers there: the jobs need no route in spool mode.
                         "public_url": "http://127.0.0.1:9"})
    server.start()
    return server


def submit(server: ServerProcess, template: str, **params: Any) -> str:
    answer = httpx.post(f"{server.url}/api/jobs", headers=HEADERS, timeout=30,
                        json={"template": template, "params": params})
    answer.raise_for_status()
    job_id: str = answer.json()["id"]
    return job_id


def events_of(server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        page = httpx.get(f"{server.url}/api/jobs/{job_id}/events", headers=HEADERS,
                         params={"after": len(events)}, timeout=30).json()
        events += page["events"]
        if not page["more"]:
            return events


_SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$", re.MULTILINE)


def metrics(server: ServerProcess) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers=HEADERS, timeout=30).text
    return {name + (labels or ""): float(value)
            for name, labels, value in _SAMPLE.findall(text)}


READS = f'metis_spool_reads_total{{cluster="{CLUSTER}"}}'
BYTES = f'metis_spool_bytes_total{{cluster="{CLUSTER}"}}'


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(share * len(ordered)) - 1)]


# ---------------------------------------------------------------------------- latency


@dataclass
class Latency:
    label: str
    written: list[float]
    """The job's clock when it wrote each event."""
    received: list[float]
    """When each event's frame arrived."""

    def row(self) -> str:
        """The first read apart: the reader backed off while the cluster had nothing to
        read (up to poll_interval), and what the job wrote until then waited for it.
        The rest is the steady state."""
        first_read = self.received[0]
        waited = [r - w for w, r in zip(self.written, self.received, strict=True)
                  if w < first_read]
        ms = [(r - w) * 1000 for w, r in zip(self.written, self.received, strict=True)
              if w >= first_read]
        return (f"{self.label:<30} first {waited[0] * 1000:5.0f} ms ({len(waited):2d} waited "
                f"for it) | then n={len(ms):<4} p50 {percentile(ms, 0.5):5.0f} ms  "
                f"p99 {percentile(ms, 0.99):5.0f} ms  min {min(ms):5.0f}  max {max(ms):5.0f}"
                f"  mean {statistics.mean(ms):5.0f}")


def latency(server: ServerProcess, label: str, count: int, interval: float) -> Latency:
    """A ticker job's events, watched over a websocket from its start to its end."""
    job_id = submit(server, "ticker", count=count, interval=interval)
    seen = Latency(label, [], [])
    with connect(f"{server.ws_url}/ws/jobs/{job_id}", additional_headers=HEADERS,
                 open_timeout=30) as socket:
        while True:
            event = orjson.loads(socket.recv(timeout=count * interval + 120))
            received = time.time()
            if event["type"] == "step":
                assert event.get("via") == "spool", event
                seen.written.append(float(event["data"]))
                seen.received.append(received)
            if event["type"] in ("completed", "fatal", "cancelled"):
                break
    assert event["type"] == "completed", event
    assert len(seen.written) == count, f"{len(seen.written)} of {count} events"
    return seen


# ---------------------------------------------------------------------------- 100 jobs


_SESSION = re.compile(r"Starting session: command for \S+ from \S+ port ([0-9]+)")


def sshd_log(cluster: TestCluster) -> Path:
    return cluster.state_dir / "log" / "sshd.out"


def connection_ports(cluster: TestCluster, pid: int) -> set[int]:
    """The local ports of ``pid``'s established connections to sshd."""
    out = subprocess.run(["ss", "-Htnp", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    ports = set()
    for line in out.splitlines():
        parts = line.split()
        if (len(parts) >= 5 and parts[3] == f"{cluster.host}:{cluster.port}"
                and f"pid={pid}," in " ".join(parts[4:])):
            ports.add(int(parts[2].rsplit(":", 1)[1]))
    return ports


@dataclass
class Window:
    seconds: float
    reads: float
    read_bytes: float
    commands: int
    server_cpu: float


def measure_window(server: ServerProcess, cluster: TestCluster, seconds: float) -> Window:
    assert server.process is not None
    pid = server.process.pid
    ports = connection_ports(cluster, pid)
    before, offset, cpu = metrics(server), sshd_log(cluster).stat().st_size, cpu_seconds(pid)
    started = time.monotonic()
    time.sleep(seconds)
    after, end = metrics(server), sshd_log(cluster).stat().st_size
    elapsed, cpu = time.monotonic() - started, cpu_seconds(pid) - cpu
    ports |= connection_ports(cluster, pid)
    with sshd_log(cluster).open("rb") as log:
        log.seek(offset)
        text = log.read(end - offset).decode(errors="replace")
    commands = sum(1 for port in _SESSION.findall(text) if int(port) in ports)
    return Window(elapsed, after[READS] - before[READS], after[BYTES] - before[BYTES],
                  commands, cpu)


@dataclass
class ReaderTimes:
    steady: list[float]
    """Seconds of each read one second after the last: what the server's reads do."""
    steady_bytes: list[int]
    idle: list[float]
    """Seconds of a read right after another, when no spool has changed."""
    catch_up: float
    """Seconds of the first read, from every spool's start."""
    catch_up_bytes: int


async def time_reader(cluster: TestCluster, job_ids: list[str], runs: int) -> ReaderTimes:
    """The reader command over a kept SSH connection of the bench's own, with cursors
    moved as the server moves them (metis_stream.spool.take)."""
    shell = SSHShell(cluster.host, port=cluster.port, user=cluster.user,
                     known_hosts=cluster.known_hosts, key_file=cluster.key_file,
                     use_agent=False)
    scheduler = BatchScheduler(CLUSTER, slurm.DIALECT, shell, workdir=WORKDIR,
                               poll_interval=10, emit_script=EMIT_SCRIPT)
    share = max(SPOOL_MAX_BYTES // len(job_ids), MAX_EVENT_BYTES + 1)
    cursors = {job_id: SpoolCursor() for job_id in job_ids}

    async def read() -> tuple[float, int]:
        started = time.perf_counter()
        frames = await scheduler.read_spools(
            [read_request(job_id, cursor, share) for job_id, cursor in cursors.items()])
        elapsed = time.perf_counter() - started
        for chunk in frames.chunks:
            cursors[chunk.job_id] = take(chunk, cursors[chunk.job_id]).cursor
        return elapsed, sum(len(chunk.data) for chunk in frames.chunks)

    try:
        await shell.run(["true"])  # the connection, opened before timing
        catch_up, catch_up_bytes = await read()
        times = ReaderTimes([], [], [], catch_up, catch_up_bytes)
        for _ in range(runs):
            await anyio.sleep(1.0)
            elapsed, size = await read()
            times.steady.append(elapsed)
            times.steady_bytes.append(size)
            times.idle.append((await read())[0])
        return times
    finally:
        await shell.close()


def running_jobs(server: ServerProcess, job_ids: list[str]) -> int:
    return sum(1 for job_id in job_ids
               if any(e["type"] == "step" for e in events_of(server, job_id)))


def hundred_jobs(server: ServerProcess, cluster: TestCluster, jobs: int, window: float
                 ) -> list[str]:
    job_ids = [submit(server, "writer") for _ in range(jobs)]
    deadline = time.monotonic() + 180
    while (started := running_jobs(server, job_ids)) < jobs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {started} of {jobs} jobs started")
        time.sleep(2)
    time.sleep(2)
    print(f"{jobs} jobs running, each writing an event a second; measuring {window:.0f} s")
    measured = measure_window(server, cluster, window)
    times = anyio.run(time_reader, cluster, job_ids, 10)
    load = os.getloadavg()
    polls = measured.seconds / 10.0
    print()
    print(f"server, {measured.seconds:.1f} s with {jobs} jobs (spool_interval 1 s, "
          f"poll_interval 10 s):")
    print(f"  spool reads                    {measured.reads:8.0f}   "
          f"({measured.seconds / measured.reads:.2f} s apart)")
    print(f"  commands run on the cluster    {measured.commands:8d}   "
          f"(reads + monitor polls; polls expected ~{polls:.0f})")
    print(f"  commands - reads               {measured.commands - measured.reads:8.0f}")
    print(f"  commands per read (all)        {measured.commands / measured.reads:8.2f}")
    print(f"  bytes per read                 {measured.read_bytes / measured.reads:8.0f}   "
          f"({measured.read_bytes / measured.reads / jobs:.0f} a job)")
    print(f"  server CPU                     {measured.server_cpu / measured.seconds:8.1%}   "
          f"({measured.server_cpu / measured.reads * 1000:.1f} ms a read)")
    print(f"reader command over a kept SSH connection (n={len(times.steady)}):")
    print(f"  a second of events, {jobs} jobs  median {statistics.median(times.steady) * 1000:6.1f}"
          f" ms   max {max(times.steady) * 1000:6.1f} ms   "
          f"{statistics.median(times.steady_bytes):.0f} bytes")
    print(f"  nothing new                    median {statistics.median(times.idle) * 1000:6.1f}"
          f" ms   max {max(times.idle) * 1000:6.1f} ms")
    print(f"  catching up from the start     {times.catch_up * 1000:6.1f} ms   "
          f"{times.catch_up_bytes} bytes")
    print(f"load average now {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return job_ids


def check_writers(server: ServerProcess, job_ids: list[str]) -> None:
    """Every writer's events, in order, once: the figures are of a reader that loses
    nothing."""
    deadline = time.monotonic() + 120
    for job_id in job_ids:
        while True:
            events = events_of(server, job_id)
            if events[-1]["type"] in ("completed", "fatal", "cancelled"):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"job {job_id} did not end: {events[-3:]}")
            time.sleep(1)
        steps = [e["data"] for e in events if e["type"] == "step"]
        assert steps == [f"beat {i}" for i in range(1, len(steps) + 1)], job_id
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), job_id
        assert events[-1]["type"] == "completed", events[-1]
    print(f"all {len(job_ids)} jobs: every event once, in order")


# ---------------------------------------------------------------------------- main


@dataclass
class Options:
    jobs: int
    window: float
    steady: int
    sparse: int


def bench(cluster: TestCluster, options: Options) -> None:
    with tempfile.TemporaryDirectory(prefix="metis-spool-bench-") as folder:
        server = start_server(cluster, Path(folder))
        try:
            print(f"cluster mode {cluster.mode}; {os.cpu_count()} CPUs; load average "
                  f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
            rows = [latency(server, "steady (an event every 0.1 s)", options.steady, 0.1),
                    latency(server, "sparse (an event every 3 s)", options.sparse, 3.0)]
            print("latency, job's write to websocket frame (spool_interval 1 s, "
                  "poll_interval 10 s):")
            for row in rows:
                print("  " + row.row())
            with cluster.oversubscribed(math.ceil(options.jobs / (os.cpu_count() or 1)) + 2):
                job_ids = hundred_jobs(server, cluster, options.jobs, options.window)
                cluster.run_as_user(["touch", f"{WORKDIR}/stop"], check=True)
                check_writers(server, job_ids)
        finally:
            server.stop()
            cluster.run_as_user(["rm", "-rf", WORKDIR])


def run(options: Options) -> None:
    cluster = build_cluster()
    try:
        bench(cluster, options)
    finally:
        cluster.stop()


def main(argv: Iterator[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--window", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true",
                        help="10 jobs, a 5 s window, 20 steady and 3 sparse events")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.quick:
        run(Options(jobs=10, window=5.0, steady=20, sparse=3))
    else:
        run(Options(jobs=args.jobs, window=args.window, steady=200, sparse=20))


if __name__ == "__main__":
    main()
