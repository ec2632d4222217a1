"""The launcher's path, end to end: from a ``print`` in an unmodified job to the websocket
frame that carries the line, on the local scheduler and on the real test cluster, and the
server's CPU per output line.

Starts its own redis-server and real ``metis-stream serve`` processes (Redis backend)
with a generated config whose one script is plain Python run by ``sh``, with nothing of
metis-stream in it: it prints ``tick I NS`` lines, NS being ``time.time_ns()`` when it
printed the line. Each job is submitted and watched over one real websocket (``WS
/ws/jobs``: the submit frame, then the job's events); for every line of every ``log``
event, latency = the frame's receive time - NS (the job, the server and this process
share the machine's clock: the test cluster is a network namespace of this machine).
It checks that every line arrives exactly once and in order.

Server CPU per line: utime+stime of the server process (and of redis-server) from the
submission to the terminal event, of a flood job printing as fast as it can, of the same
job under the default output budget, and of an empty job (the fixed cost of a job).

    .venv/bin/python -m bench.launcher_latency                  # local, then the cluster
    .venv/bin/python -m bench.launcher_latency -t local         # no root needed
    .venv/bin/python -m bench.launcher_latency --lines 50 --flood 5000 --runs 1

The cluster (``-t cluster``) is built with tests/support/cluster.py: it needs root.
See bench/README.md for what each figure means and the last measured ones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/launcher_latency.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
from websockets.asyncio.client import connect

from bench.load import ROOT, RedisProc, cpu_seconds, percentile
from metis_stream import tokens
from metis_stream.jobs import JobState
from metis_stream.templates import DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_MAX_EVENTS
from tests.support.cluster import TestCluster, build_cluster
from tests.support.server import ServerProcess, free_port

TERMINAL = frozenset({"completed", "fatal", "cancelled"})
TARGETS = ("local", "cluster")
RAISED_LOG_MAX_BYTES = 32 << 20
"""The ``ticks`` template's output budget: every line of a flood of 100,000 (3 MB) and
more reaches the server. ``ticks_default`` keeps the defaults (1 MiB, 5000 events)."""

# The job: an unmodified script. The launcher runs it under `sh` and streams its stdout.
TICKS_SCRIPT = """\
#!/bin/sh
# bench/launcher_latency.py's job, unmodified: nothing in it knows of metis-stream.
# TICK_COUNT lines "tick I NS", one every TICK_EVERY seconds (0: as fast as it can);
# NS is the wall clock when it printed the line, in nanoseconds.
exec /usr/bin/python3 - "$TICK_COUNT" "$TICK_EVERY" <<'EOF'
import sys
import time

count, every = int(sys.argv[1]), float(sys.argv[2])
start = time.monotonic()
for i in range(count):
    if every:
        delay = start + i * every - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    print(f"tick {i} {time.time_ns()}")
EOF
"""

PARAMS = """\
params.tick_count = { type = "int", min = 0, max = 10000000, default = 200 }
params.tick_every = { type = "float", min = 0, max = 10, default = 0.03 }
"""


def templates_config(folder: Path, cluster: str, *, walltime: bool) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "ticks.sh"
    script.write_text(TICKS_SCRIPT)
    resources = 'resources = { walltime = "00:15:00" }\n' if walltime else ""
    out = ""
    for name, budget in (("ticks", f"log_max_bytes = {RAISED_LOG_MAX_BYTES}\n"),
                         ("ticks_default", "")):
        out += (f'\n[templates.{name}]\ncluster = "{cluster}"\nscript = "{script}"\n'
                + resources + PARAMS + budget)
    return out


# ---------------------------------------------------------------------------------------
# One job, watched


@dataclass
class JobRun:
    template: str
    count: int
    every: float
    job_id: str = ""
    end: dict[str, Any] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    """Per line, ms: frame received - printed."""
    to_server: list[float] = field(default_factory=list)
    """Per line, ms: appended by the server (the event's ``time``) - printed."""
    fanout: list[float] = field(default_factory=list)
    """Per log event, ms: frame received - appended."""
    next_i: int = 0
    duplicates: int = 0
    gaps: int = 0
    other_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)
    notice: str = ""
    log_events: int = 0
    lines_per_event: list[int] = field(default_factory=list)
    first_print_ns: int = 0
    last_receive_ns: int = 0
    seconds: float = 0.0
    """Submission to terminal event."""
    server_cpu: float = 0.0
    redis_cpu: float = 0.0

    @property
    def received(self) -> int:
        return len(self.latencies)

    @property
    def lost(self) -> int:
        """Lines never received: skipped ones, and those after the last one received
        (unless the budget's notice says the stream stopped there)."""
        tail = 0 if self.notice else max(0, self.count - self.next_i)
        return self.gaps + tail

    def take(self, frame: str | bytes, now_ns: int) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(frame)
        if "error" in event and "seq" not in event:
            raise RuntimeError(f"the server refused the job: {event['error']}")
        self.job_id = self.job_id or str(event.get("job", ""))
        if event.get("type") != "log":
            return event
        data = event["data"]
        lines = data["lines"]
        if data["stream"] == "notice":
            self.notice = " ".join(lines)
            return event
        if data["stream"] != "stdout":
            self.stderr_lines += lines
            return event
        self.log_events += 1
        self.lines_per_event.append(len(lines))
        appended_ns = int(event["time"] * 1e9)
        self.fanout.append((now_ns - appended_ns) / 1e6)
        for line in lines:
            parts = line.split(" ")
            if (len(parts) != 3 or parts[0] != "tick" or not parts[1].isdigit()
                    or not parts[2].isdigit()):
                self.other_lines.append(line)
                continue
            i, printed = int(parts[1]), int(parts[2])
            if i < self.next_i:
                self.duplicates += 1
                continue
            self.gaps += i - self.next_i
            self.next_i = i + 1
            self.first_print_ns = self.first_print_ns or printed
            self.latencies.append((now_ns - printed) / 1e6)
            self.to_server.append((appended_ns - printed) / 1e6)
        self.last_receive_ns = now_ns
        return event

    def problems(self) -> list[str]:
        out = []
        if self.end.get("type") != "completed":
            out.append(f"ended with {self.end or 'nothing'}")
        if self.lost or self.duplicates:
            out.append(f"{self.lost} lines lost, {self.duplicates} duplicated")
        if self.other_lines:
            out.append(f"{len(self.other_lines)} unexpected lines: {self.other_lines[:3]}")
        if self.stderr_lines:
            out.append(f"stderr: {self.stderr_lines[-3:]}")
        if self.notice:
            sent = self.notice.split("after ")[-1].split(" ")[0]
            if sent != str(self.received):
                out.append(f"notice says {sent} lines, {self.received} received")
        return out


@dataclass
class Target:
    """A running server to submit to."""

    name: str
    server: ServerProcess
    redis: RedisProc
    key: str
    job_ids: list[str] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    async def run_job(self, template: str, count: int, every: float, timeout: float) -> JobRun:
        """Submit and watch one job over one websocket, until its terminal event."""
        run = JobRun(template, count, every)
        assert self.server.process is not None
        server_pid, redis_pid = self.server.process.pid, self.redis.pid
        cpu0, redis0 = cpu_seconds(server_pid), cpu_seconds(redis_pid)
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout), connect(
                    f"{self.server.ws_url}/ws/jobs", additional_headers=self.headers,
                    max_size=None, ping_interval=None, compression=None) as socket:
                await socket.send(orjson.dumps({"template": template, "params": {
                    "tick_count": count, "tick_every": every}}).decode())
                async for frame in socket:
                    event = run.take(frame, time.time_ns())
                    if run.job_id and (not self.job_ids or self.job_ids[-1] != run.job_id):
                        self.job_ids.append(run.job_id)
                    if event.get("type") in TERMINAL:
                        run.end = {"type": event["type"], "data": event.get("data")}
                        break
        except TimeoutError:
            raise RuntimeError(f"{template} job {run.job_id or '?'}: no terminal event in "
                               f"{timeout:.0f} s ({run.received} lines received)") from None
        run.server_cpu = cpu_seconds(server_pid) - cpu0
        run.redis_cpu = cpu_seconds(redis_pid) - redis0
        run.seconds = time.monotonic() - started
        return run

    def cancel_jobs(self) -> None:
        """Every job of the run that has not ended (after an error or Ctrl-C)."""
        if self.server.process is None or self.server.process.poll() is not None:
            return
        with httpx.Client(base_url=self.server.url, headers=self.headers, timeout=30) as client:
            for job_id in self.job_ids:
                with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                    state = client.get(f"/api/jobs/{job_id}").json()["state"]
                    if not JobState(state).terminal:
                        client.delete(f"/api/jobs/{job_id}")


def make_server(folder: Path, redis: RedisProc, key: str, host: str, extra_config: str
                ) -> ServerProcess:
    port = free_port(host)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                       os.environ.get("PYTHONPATH")]))}
    return ServerProcess(
        state_dir=folder, host=host, port=port, extra_config=extra_config, env=env,
        server_settings={
            "api_keys": [tokens.hash_api_key(key)], "redis_url": redis.redis_url,
            "public_url": f"http://{host}:{port}", "access_log": False,
            "submissions_per_minute": 100_000.0,
        })


def local_config(folder: Path) -> str:
    # The server stops its local jobs when it stops (after Ctrl-C, say).
    return ('\n[clusters.local]\nscheduler = "local"\npoll_interval = 1.0\n'
            "stop_jobs_on_exit = true\n" + templates_config(folder, "local", walltime=False))


def cluster_config(cluster: TestCluster, scheduler: str, workdir: str, folder: Path) -> str:
    return (f'\n[clusters.test]\nscheduler = "{scheduler}"\nhost = "{cluster.host}"\n'
            f'port = {cluster.port}\nuser = "{cluster.user}"\n'
            f'key_file = "{cluster.key_file}"\nknown_hosts = "{cluster.known_hosts}"\n'
            f'use_agent = false\nworkdir = "{workdir}"\npoll_interval = 2\n'
            + templates_config(folder, "test", walltime=True))


# ---------------------------------------------------------------------------------------
# What a target runs


@dataclass
class Results:
    target: str
    latency_runs: list[JobRun] = field(default_factory=list)
    cpu_runs: dict[str, list[JobRun]] = field(default_factory=dict)
    """By case, one run per --flood-runs."""
    errors: list[str] = field(default_factory=list)
    skipped: str = ""
    idle_server: float = 0.0
    """CPU seconds per second of the server with no job running (its monitor's polls,
    the Redis listener's pings, the sweeps)."""
    idle_redis: float = 0.0


async def measure(target: Target, args: argparse.Namespace, results: Results) -> None:
    paced_timeout = 120 + args.lines * args.every * 2
    for n in range(args.runs):
        run = await target.run_job("ticks", args.lines, args.every, paced_timeout)
        results.latency_runs.append(run)
        say(f"  {target.name}: paced job {n + 1}/{args.runs}: {run.received} lines, "
            f"p50 {percentile(sorted(run.latencies), 0.5):.0f} ms, "
            f"max {max(run.latencies, default=float('nan')):.0f} ms"
            + "".join(f"; {p}" for p in run.problems()))
    if not args.flood:
        return
    # What the server and redis-server spend with no job at all (uvicorn's ticks, the
    # monitor's polls, the Redis listener's pings), to compare with the paced jobs'.
    await asyncio.sleep(args.settle)
    assert target.server.process is not None
    pids = (target.server.process.pid, target.redis.pid)
    before, started = [cpu_seconds(pid) for pid in pids], time.monotonic()
    await asyncio.sleep(args.idle)
    elapsed = time.monotonic() - started
    results.idle_server, results.idle_redis = ((cpu_seconds(pid) - cpu) / elapsed
                                               for pid, cpu in zip(pids, before, strict=True))
    say(f"  {target.name}: idle for {elapsed:.0f} s: server {1000 * results.idle_server:.1f} "
        f"ms/s, redis-server {1000 * results.idle_redis:.1f} ms/s of CPU")
    cases = [("empty job", "ticks", 0), (f"flood of {args.flood:,}", "ticks", args.flood),
             (f"flood of {args.flood:,}, default budget", "ticks_default", args.flood)]
    for n in range(args.flood_runs):
        for label, template, count in cases:
            # Let the previous job's end (the monitor's last poll, its exit) pass first.
            await asyncio.sleep(args.settle)
            run = await target.run_job(template, count, 0.0, args.flood_timeout)
            results.cpu_runs.setdefault(label, []).append(run)
            say(f"  {target.name}: {label} ({n + 1}/{args.flood_runs}): {run.received:,} "
                f"lines reached the watcher, {run.seconds:.1f} s from submission to end, "
                f"server CPU {1000 * run.server_cpu:.0f} ms"
                + "".join(f"; {p}" for p in run.problems()))


def run_local(workdir: Path, redis: RedisProc, args: argparse.Namespace) -> Results:
    results = Results("local")
    key = secrets.token_urlsafe(24)
    server = make_server(workdir / "local", redis, key, "127.0.0.1",
                         local_config(workdir / "local-scripts"))
    target = Target("local", server, redis, key)
    try:
        server.start()
        say(f"local: server pid {server.process.pid if server.process else '?'} on "
            f"{server.url}")
        asyncio.run(measure(target, args, results))
    except Exception as exc:
        results.errors.append(f"{type(exc).__name__}: {exc}")
        say(f"  local: FAILED: {exc}")
    finally:
        target.cancel_jobs()
        server.stop()
    return results


def run_cluster(workdir: Path, redis: RedisProc, args: argparse.Namespace) -> Results:
    results = Results(f"cluster ({args.scheduler})")
    if os.geteuid() != 0:
        results.skipped = "building the test cluster needs root"
        say("cluster: skipped: building the test cluster needs root")
        return results
    say("cluster: building the test cluster")
    cluster = build_cluster()
    remote = f"metis-bench-{secrets.token_hex(4)}"
    server: ServerProcess | None = None
    target: Target | None = None
    try:
        key = secrets.token_urlsafe(24)
        server = make_server(workdir / "cluster", redis, key, cluster.server_address,
                             cluster_config(cluster, args.scheduler, remote,
                                            workdir / "cluster-scripts"))
        target = Target(results.target, server, redis, key)
        server.start()
        say(f"cluster: {cluster.mode} mode, sshd {cluster.host}:{cluster.port}, server pid "
            f"{server.process.pid if server.process else '?'} on {server.url}")
        asyncio.run(measure(target, args, results))
    except Exception as exc:
        results.errors.append(f"{type(exc).__name__}: {exc}")
        say(f"  cluster: FAILED: {exc}")
    finally:
        if target is not None:
            target.cancel_jobs()
        if server is not None:
            server.stop()
        with contextlib.suppress(Exception):
            cluster.run_as_user(["rm", "-rf", remote])
        cluster.stop()
    return results


# ---------------------------------------------------------------------------------------
# Output


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 2) -> str:
    body = [list(header), *(list(row) for row in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(header))]
    out = []
    for n, line in enumerate(body):
        out.append(" | ".join(cell.ljust(widths[i]) if i < left else cell.rjust(widths[i])
                              for i, cell in enumerate(line)).rstrip())
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def ms(values: Sequence[float], fraction: float) -> str:
    return f"{percentile(sorted(values), fraction):.1f}" if values else "-"


def latency_rows(all_results: Sequence[Results], args: argparse.Namespace) -> list[list[str]]:
    rows = []
    for results in all_results:
        runs = results.latency_runs
        if not runs:
            continue
        lat = [x for run in runs for x in run.latencies]
        to_server = [x for run in runs for x in run.to_server]
        fanout = [x for run in runs for x in run.fanout]
        events = sum(run.log_events for run in runs)
        first = [run.latencies[0] for run in runs if run.latencies]
        rest = [x for run in runs for x in run.latencies[1:]]
        rows.append([
            results.target, f"{len(runs)} x {args.lines} lines / {1000 * args.every:g} ms",
            f"{len(runs) * args.lines}", f"{len(lat)}",
            f"{sum(r.lost for r in runs)}/{sum(r.duplicates for r in runs)}",
            ms(lat, 0.5), ms(lat, 0.99), f"{max(lat):.1f}" if lat else "-",
            ms(rest, 0.99), f"{max(first):.1f}" if first else "-",
            ms(to_server, 0.5), ms(to_server, 0.99), ms(fanout, 0.5), ms(fanout, 0.99),
            f"{events}", f"{sum(len(r.latencies) for r in runs) / max(1, events):.1f}",
        ])
    return rows


LATENCY_HEADER = ("target", "job", "printed", "received", "lost/dup", "p50 ms", "p99 ms",
                  "max ms", "p99 w/o 1st", "1st line max", "to srv p50", "to srv p99",
                  "srv->ws p50", "srv->ws p99", "log events", "lines/event")


def cpu_rows(all_results: Sequence[Results]) -> list[list[str]]:
    """One row per case: CPU summed over its runs, divided by the lines of all of them.
    Net: less the empty job's mean CPU per run (the fixed cost of a job: submission,
    the monitor's polls while it runs, its terminal event)."""
    rows = []
    for results in all_results:
        empty = results.cpu_runs.get("empty job", [])
        for label, runs in results.cpu_runs.items():
            printed = sum(r.count for r in runs)
            reached = sum(r.received for r in runs)
            events = sum(r.log_events for r in runs)
            seconds = sum(r.seconds for r in runs) / len(runs)
            spans = [(r.last_receive_ns - r.first_print_ns) / 1e9 for r in runs if r.received]
            rate = (reached / sum(spans)) if spans and sum(spans) > 0 else 0.0
            lat = [x for r in runs for x in r.latencies]
            cells = [results.target, f"{label} (x{len(runs)})", f"{printed:,}", f"{reached:,}",
                     f"{events:,}", f"{seconds:.1f}", f"{rate:,.0f}" if rate else "-"]
            for name in ("server_cpu", "redis_cpu"):
                cpu = sum(getattr(r, name) for r in runs)
                cells.append(f"{1000 * cpu / len(runs):.0f}")
                cells.append(f"{1e6 * cpu / reached:.2f}" if reached else "-")
                if name == "server_cpu":
                    cells.append(f"{1e6 * cpu / printed:.2f}" if printed else "-")
                net = "-"
                if empty and label != "empty job" and reached:
                    fixed = sum(getattr(r, name) for r in empty) / len(empty)
                    net = f"{1e6 * (cpu - fixed * len(runs)) / reached:.2f}"
                cells.append(net)
            cells += [ms(lat, 0.5), ms(lat, 0.99)]
            rows.append(cells)
    return rows


CPU_HEADER = ("target", "job", "printed", "reached srv", "log events", "job s", "lines/s",
              "srv ms/job", "srv us/line reached", "srv us/line printed", "srv net us/line",
              "redis ms/job", "redis us/line reached", "redis net us/line", "p50 ms",
              "p99 ms")


def rate_lines(all_results: Sequence[Results]) -> list[str]:
    """CPU per second: the idle server's, and during the paced jobs (a few events a
    second: too little CPU per line to see beside the idle cost, so no per-line figure)."""
    out = []
    for results in all_results:
        runs = results.latency_runs
        seconds = sum(r.seconds for r in runs)
        if not runs or not seconds or not results.cpu_runs:
            continue
        out.append(f"{results.target}: idle: server {1000 * results.idle_server:.1f} ms/s, "
                   f"redis-server {1000 * results.idle_redis:.1f} ms/s; during the paced "
                   f"jobs: server {1000 * sum(r.server_cpu for r in runs) / seconds:.1f} "
                   f"ms/s, redis-server {1000 * sum(r.redis_cpu for r in runs) / seconds:.1f} "
                   f"ms/s (ms of CPU per second of wall time)")
    return out


def say(text: str) -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.launcher_latency",
        description="Latency from a print in an unmodified job to the websocket frame, and "
                    "the server's CPU per output line, on the local scheduler and the test "
                    "cluster (bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-t", "--targets", default=",".join(TARGETS),
                        help="comma-separated: local (the local scheduler), cluster (the test "
                             "cluster of tests/support/cluster.py: root)")
    parser.add_argument("--scheduler", choices=("slurm", "pbs"), default="slurm",
                        help="how the server talks to the test cluster: sbatch or the PBS "
                             "wrappers (qsub)")
    parser.add_argument("--lines", type=int, default=200, help="lines of each paced job")
    parser.add_argument("--every", type=float, default=0.03,
                        help="seconds between the paced job's lines")
    parser.add_argument("--runs", type=int, default=3, help="paced jobs per target")
    parser.add_argument("--flood", type=int, default=100_000,
                        help="lines of the flood job (0: no CPU measurement)")
    parser.add_argument("--flood-runs", type=int, default=3,
                        help="runs of each CPU case (the empty job, the flood, the flood "
                             "under the default budget), interleaved; CPU time is counted in "
                             "10 ms clock ticks, so more runs give finer figures")
    parser.add_argument("--idle", type=float, default=10.0,
                        help="seconds over which the idle server's CPU is measured")
    parser.add_argument("--flood-timeout", type=float, default=600.0,
                        help="seconds a flood job may take")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds between the CPU jobs, for the last one's end to pass")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to keep configs, logs and redis (default: a new "
                             "temporary folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in args.target_names:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}")
    if args.lines < 1 or args.runs < 0 or args.flood < 0 or args.every < 0:
        parser.error("--lines must be at least 1; --runs, --flood and --every at least 0")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    created = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="metis-bench-")) if created else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # `kill` stops everything as Ctrl-C does (only in the main thread: not under pytest's
    # timeout thread, say).
    previous = None
    with contextlib.suppress(ValueError):
        previous = signal.signal(signal.SIGTERM, _interrupt)
    began = time.monotonic()
    say(f"metis-stream launcher latency: {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}, Python {platform.python_version()}; budget of "
        f"`ticks`: {DEFAULT_LOG_MAX_EVENTS} events, {RAISED_LOG_MAX_BYTES:,} bytes; of "
        f"`ticks_default`: {DEFAULT_LOG_MAX_EVENTS} events, {DEFAULT_LOG_MAX_BYTES:,} bytes; "
        f"files in {workdir}")
    all_results: list[Results] = []
    redis = RedisProc(workdir / "redis")
    try:
        (workdir / "redis").mkdir(exist_ok=True)
        redis.start()
        for name in args.target_names:
            run = run_local if name == "local" else run_cluster
            all_results.append(run(workdir, redis, args))
    except KeyboardInterrupt:
        say("interrupted")
        all_results.append(Results("(interrupted)", errors=["interrupted"]))
    finally:
        redis.stop()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if created and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif created:
            say(f"kept {workdir}")
    say("\nLatency: print in the job -> websocket frame at the watcher, per line (ms)")
    say(table(LATENCY_HEADER, latency_rows(all_results, args)))
    if any(results.cpu_runs for results in all_results):
        say("\nServer CPU per output line (flood: the job prints as fast as it can)")
        say(table(CPU_HEADER, cpu_rows(all_results)))
        for line in rate_lines(all_results):
            say(line)
    problems = [f"{r.target}: {p}" for r in all_results for p in r.errors]
    problems += [f"{r.target}: {run.template} job {run.job_id}: {p}" for r in all_results
                 for run in [*r.latency_runs, *(x for runs in r.cpu_runs.values() for x in runs)]
                 for p in run.problems()]
    for results in all_results:
        if results.skipped:
            say(f"SKIPPED: {results.target}: {results.skipped}")
    for problem in problems:
        say(f"PROBLEM: {problem}")
    say(f"\n(total {time.monotonic() - began:.0f} s; load average now "
        f"{os.getloadavg()[0]:.2f})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
