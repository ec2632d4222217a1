"""Load test of metis-stream's event path (issue 7): jobs POST events, websockets receive them.

Starts its own redis-server (a free port on 127.0.0.1, a temporary directory) and real
``metis-stream serve`` processes with a generated config (a local-scheduler template whose
batch script only sleeps). The generator creates jobs with ``POST /api/jobs``, posts each
job's events itself with the job's token, watches them with websockets, checks that every
watcher got every event exactly once and in order, and prints one row per scenario, post
mode and target. When ``broadcaster`` is installed it also measures the naive peer
(bench/naive_peer.py) with the same generator, and prints metis-stream's figures as ratios
to it. See bench/README.md for the columns.

    .venv/bin/python -m bench.load              # the default set, ~3-5 minutes (E: as root)
    .venv/bin/python -m bench.load --quick      # a reduced set, under a minute
    .venv/bin/python -m bench.load -s A,C -b redis --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/load.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench import ssh_submit
from metis_stream.tokens import job_token

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
BARRIER_TIMEOUT = 300.0
MODES = ("single", "batch", "pipe")
TARGETS = ("memory", "redis", "peer", "scale")


# ---------------------------------------------------------------------------------------
# Scenarios


@dataclass(frozen=True)
class Scenario:
    key: str
    jobs: int
    watchers: int
    """Websockets per job."""
    events: int
    """Events per job."""
    modes: tuple[str, ...]
    rate: float | None = None
    """Events per second over all jobs; None: as fast as the server takes them."""
    batch: int = 100


def scenarios(quick: bool) -> dict[str, Scenario]:
    if quick:
        return {
            "A": Scenario("A", jobs=20, watchers=1, events=100, modes=MODES),
            "B": Scenario("B", jobs=20, watchers=1, events=150, modes=("single", "pipe"),
                          rate=1000.0),
            "C": Scenario("C", jobs=5, watchers=20, events=100, modes=("single", "batch")),
            "D": Scenario("D", jobs=20, watchers=50, events=10, modes=("single",)),
        }
    return {
        # A: 100 jobs x 1 watcher, 200 events each, unlimited rate.
        "A": Scenario("A", jobs=100, watchers=1, events=200, modes=MODES),
        # B: the same at a fixed 2,000 events/s: 10 s.
        "B": Scenario("B", jobs=100, watchers=1, events=200, modes=("single", "pipe"),
                      rate=2000.0),
        # C: 10 jobs x 50 watchers.
        "C": Scenario("C", jobs=10, watchers=50, events=200, modes=("single", "batch")),
        # D: 5,000 idle sockets (100 jobs x 50), then 1,000 events (10 per job).
        "D": Scenario("D", jobs=100, watchers=50, events=10, modes=("single",)),
    }


SCALE_CASES = (("A", "single"), ("C", "single"))
"""What the scale-out target (two servers on one Redis) runs, to compare with one server."""


# ---------------------------------------------------------------------------------------
# Processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: thousands of sockets need it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def child_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("METIS_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Proc:
    """A child process that serves HTTP on 127.0.0.1:port; /healthz says it is ready."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, cwd=ROOT,
                                            env=child_env(), preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not start: {self.log_tail()}")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return "(no log)"


class RedisProc(Proc):
    def __init__(self, directory: Path) -> None:
        port = free_port()
        executable = shutil.which("redis-server") or "redis-server"
        # AOF everysec: the production setting of docs/redis.md.
        argv = [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
                "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
                "--daemonize", "no", "--maxclients", "20000",
                "--logfile", str(directory / "redis.log")]
        super().__init__("redis-server", argv, port, directory / "redis.stdout")

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        self.process = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, preexec_fn=raise_nofile)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("redis-server exited")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not answer PING")


def metis_server(name: str, directory: Path, secret: str, redis_url: str | None,
                 poll_interval: float) -> Proc:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "sleep.sh"
    script.write_text("sleep 600\n")
    port = free_port()
    settings: dict[str, object] = {
        "host": "127.0.0.1", "port": port, "state_dir": str(directory), "secret": secret,
        "submissions_per_minute": 1_000_000, "max_events_per_job": 1_000_000,
        # The load generator is the only client, on loopback, of a server it started.
        "insecure_no_auth": True,
    }
    if redis_url:
        settings["redis_url"] = redis_url
    lines = ["[server]", *(f"{key} = {toml(value)}" for key, value in settings.items()),
             "", "[clusters.local]", 'scheduler = "local"', f"poll_interval = {poll_interval}",
             "", "[templates.sleep]", 'cluster = "local"', f"script = {toml(str(script))}",
             'description = "bench: sleeps; the load generator posts its events"', ""]
    config = directory / "config.toml"
    config.write_text("\n".join(lines))
    argv = [sys.executable, "-m", "metis_stream.cli", "serve", "--config", str(config)]
    return Proc(name, argv, port, directory / "server.log")


def peer_server(directory: Path, redis_url: str) -> Proc:
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [sys.executable, "-m", "bench.naive_peer", "--port", str(port), "--redis", redis_url]
    return Proc("naive peer", argv, port, directory / "peer.log")


def toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def have_broadcaster() -> bool:
    try:
        import broadcaster  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Targets: what a case runs against


@dataclass(frozen=True)
class JobRef:
    id: str
    token: str
    post_port: int
    watch_port: int
    index: int


@dataclass
class Target:
    name: str
    servers: list[Proc]
    redis: RedisProc | None
    secret: str = ""
    metis: bool = True
    sleepers: dict[str, int] = field(default_factory=dict)
    """Job id -> pid of its sleeping batch script, until the job is cancelled."""

    def create_jobs(self, count: int) -> list[JobRef]:
        n = len(self.servers)
        if not self.metis:
            return [JobRef(f"peer-{secrets.token_hex(8)}", "", self.servers[k % n].port,
                           self.servers[(k + 1) % n].port, k) for k in range(count)]
        creator = self.servers[0]
        ids: list[str] = []
        with httpx.Client(base_url=creator.url, timeout=30) as client:
            for _ in range(count):
                response = client.post("/api/jobs", json={"template": "sleep", "params": {}})
                response.raise_for_status()
                ids.append(response.json()["id"])
            waiting = set(ids)
            deadline = time.monotonic() + 60
            while waiting and time.monotonic() < deadline:
                for job_id in list(waiting):
                    job = client.get(f"/api/jobs/{job_id}").json()
                    if job.get("scheduler_id"):
                        self.sleepers[job_id] = int(str(job["scheduler_id"]).split(".")[0])
                    if job["state"] not in ("created", "submitting"):
                        waiting.discard(job_id)
                if waiting:
                    time.sleep(0.05)
            if waiting:
                raise RuntimeError(f"{len(waiting)} jobs were never submitted")
        # Spread: job k posts to server k % n and is watched on server (k + 1) % n.
        return [JobRef(job_id, job_token(self.secret, job_id), self.servers[k % n].port,
                       self.servers[(k + 1) % n].port, k) for k, job_id in enumerate(ids)]

    def cancel_jobs(self, jobs: Sequence[JobRef]) -> None:
        if not self.metis:
            return
        with httpx.Client(base_url=self.servers[0].url, timeout=30) as client:
            for job in jobs:
                with contextlib.suppress(httpx.HTTPError):
                    if client.delete(f"/api/jobs/{job.id}").status_code in (200, 409):
                        self.sleepers.pop(job.id, None)

    def kill_sleepers(self) -> None:
        """Batch scripts of jobs that were never cancelled (a run that failed half way)."""
        for pid in self.sleepers.values():
            try:
                if b"sleep.sh" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.killpg(pid, signal.SIGTERM)
            except (OSError, ProcessLookupError):
                pass
        self.sleepers.clear()

    def stop(self) -> None:
        self.kill_sleepers()
        for server in self.servers:
            server.stop()


# ---------------------------------------------------------------------------------------
# The generator (runs in worker processes)


@dataclass(frozen=True)
class Plan:
    mode: str
    events: int
    watchers: int
    total_jobs: int
    rate_per_job: float | None
    batch: int
    http: str
    compression: bool
    check_seq: bool
    drain_timeout: float


class RawHTTP:
    """A minimal HTTP/1.1 keep-alive client on asyncio streams: far cheaper than httpx."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is None or self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self.reader, self.writer

    def _head(self, path: str, headers: dict[str, str], length: int | None) -> bytes:
        lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines.append("Transfer-Encoding: chunked" if length is None
                     else f"Content-Length: {length}")
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def post(self, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        reader, writer = await self._open()
        writer.write(self._head(path, headers, len(body)) + body)
        return await self._response(reader)

    async def post_stream(self, path: str, headers: dict[str, str],
                          lines: AsyncIterator[bytes]) -> tuple[int, bytes]:
        reader, writer = await self._open()
        writer.write(self._head(path, headers, None))
        async for line in lines:
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        return await self._response(reader)

    async def _response(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        status_line = await reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        length, chunked, close = 0, False, False
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            body = b""
            while size := int((await reader.readline()).split(b";")[0], 16):
                body += await reader.readexactly(size + 2)
            await reader.readline()
        else:
            body = await reader.readexactly(length)
        if close:
            await self.close()
        return status, body

    async def close(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Watcher:
    """One websocket: checks that events 0..N-1 arrive once each, in order, and times them."""

    def __init__(self, url: str, plan: Plan, latencies: list[float]) -> None:
        self.url = url
        self.plan = plan
        self.latencies = latencies
        self.next_i = 0
        self.duplicates = 0
        self.gaps = 0
        self.seq_errors = 0
        self.last_seq: int | None = None
        self.last_receive = 0.0
        self.ws: ClientConnection | None = None
        self.done = asyncio.get_running_loop().create_future()

    async def open(self, gate: asyncio.Semaphore) -> None:
        async with gate:
            self.ws = await connect(self.url, max_size=None, ping_interval=None,
                                    open_timeout=120, close_timeout=2,
                                    compression="deflate" if self.plan.compression else None)
            # metis-stream: the job's first event (`starting`), sent after it subscribed;
            # the naive peer: its ready frame.
            self.handle(await asyncio.wait_for(self.ws.recv(), 60))

    async def run(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                self.handle(message)
        if not self.done.done():
            self.done.set_result(None)

    def handle(self, message: str | bytes) -> None:
        now = time.time()
        event = orjson.loads(message)
        seq = event.get("seq")
        if self.plan.check_seq and seq is not None:
            if self.last_seq is not None and seq != self.last_seq + 1:
                self.seq_errors += 1
            self.last_seq = seq
        data = event.get("data")
        if not isinstance(data, dict) or "i" not in data:
            return
        i = data["i"]
        if i == self.next_i:
            self.next_i += 1
        elif i < self.next_i:
            self.duplicates += 1
            return
        else:
            self.gaps += i - self.next_i
            self.next_i = i + 1
        self.latencies.append(now - data["t"])
        self.last_receive = now
        if self.next_i >= self.plan.events and not self.done.done():
            self.done.set_result(None)

    @property
    def lost(self) -> int:
        return self.gaps + max(0, self.plan.events - self.next_i)


def event_line(i: int, t: float) -> bytes:
    return orjson.dumps({"type": "b", "data": {"i": i, "t": t}})


class Poster:
    def __init__(self, job: JobRef, plan: Plan, client: httpx.AsyncClient | None) -> None:
        self.job = job
        self.plan = plan
        self.client = client
        self.path = f"/api/jobs/{job.id}/events"
        self.auth = {"Authorization": f"Bearer {job.token}"} if job.token else {}
        self.errors = 0
        self.first_error = ""

    async def _send(self, raw: RawHTTP, content_type: str, body: bytes) -> None:
        headers = {"Content-Type": content_type, **self.auth}
        if self.client is not None:
            response = await self.client.post(
                f"http://127.0.0.1:{self.job.post_port}{self.path}", content=body,
                headers=headers)
            status, text = response.status_code, response.content
        else:
            status, text = await raw.post(self.path, headers, body)
        self._check(status, text)

    def _check(self, status: int, text: bytes) -> None:
        if status != 200:
            self.errors += 1
            self.first_error = self.first_error or f"{status} {text[:200]!r}"

    async def _pace(self, t0: float, k: int) -> None:
        rate = self.plan.rate_per_job
        if rate:
            phase = self.job.index / self.plan.total_jobs / rate
            delay = t0 + phase + k / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)

    async def run(self, t0: float) -> None:
        raw = RawHTTP(self.job.post_port)
        try:
            await self._run(raw, t0)
        except Exception as exc:
            self.errors += 1
            self.first_error = self.first_error or repr(exc)
        finally:
            await raw.close()

    async def _run(self, raw: RawHTTP, t0: float) -> None:
        plan = self.plan
        if plan.mode == "single":
            for k in range(plan.events):
                await self._pace(t0, k)
                await self._send(raw, "application/json", event_line(k, time.time()))
        elif plan.mode == "batch":
            for start in range(0, plan.events, plan.batch):
                await self._pace(t0, start)
                t = time.time()
                body = b"".join(event_line(k, t) + b"\n"
                                for k in range(start, min(plan.events, start + plan.batch)))
                await self._send(raw, "application/x-ndjson", body)
        else:
            async def lines() -> AsyncIterator[bytes]:
                for k in range(plan.events):
                    await self._pace(t0, k)
                    yield event_line(k, time.time()) + b"\n"
                    if not plan.rate_per_job:
                        await asyncio.sleep(0)  # let the other jobs' pipes interleave

            headers = {"Content-Type": "application/x-ndjson", **self.auth}
            if self.client is not None:
                response = await self.client.post(
                    f"http://127.0.0.1:{self.job.post_port}{self.path}", content=lines(),
                    headers=headers)
                self._check(response.status_code, response.content)
            else:
                self._check(*await raw.post_stream(self.path, headers, lines()))


async def run_worker(jobs: list[JobRef], plan: Plan, barriers: Sequence[Any]) -> dict[str, Any]:
    ready, go, done = barriers
    latencies: list[float] = []
    watchers = [Watcher(f"ws://127.0.0.1:{job.watch_port}/ws/jobs/{job.id}", plan, latencies)
                for job in jobs for _ in range(plan.watchers)]
    gate = asyncio.Semaphore(100)
    started = time.monotonic()
    # Each job's first watcher first, then the others: broadcaster 0.3.1 (the naive peer)
    # loses a subscription when two watchers of a channel without one arrive together.
    firsts = watchers[::plan.watchers]
    await asyncio.gather(*(watcher.open(gate) for watcher in firsts))
    await asyncio.gather(*(watcher.open(gate) for watcher in watchers
                           if watcher not in firsts))
    connect_seconds = time.monotonic() - started
    readers = [asyncio.create_task(watcher.run()) for watcher in watchers]
    await asyncio.to_thread(ready.wait, BARRIER_TIMEOUT)
    await asyncio.to_thread(go.wait, BARRIER_TIMEOUT)
    client = None
    if plan.http == "httpx":
        client = httpx.AsyncClient(limits=httpx.Limits(max_connections=len(jobs) + 1,
                                                       max_keepalive_connections=len(jobs) + 1),
                                   timeout=120)
    posters = [Poster(job, plan, client) for job in jobs]
    cpu0 = time.process_time()
    t0 = time.time()
    await asyncio.gather(*(poster.run(t0) for poster in posters))
    posted = time.time()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(w.done for w in watchers)), plan.drain_timeout)
    cpu1 = time.process_time()
    await asyncio.to_thread(done.wait, BARRIER_TIMEOUT)
    if client is not None:
        await client.aclose()
    for reader in readers:
        reader.cancel()
    close_gate = asyncio.Semaphore(200)

    async def close(watcher: Watcher) -> None:
        async with close_gate:
            if watcher.ws is not None:
                with contextlib.suppress(Exception):
                    await watcher.ws.close()

    await asyncio.gather(*(close(watcher) for watcher in watchers))
    return {
        "t0": t0, "posted": posted,
        "last_receive": max((w.last_receive for w in watchers), default=0.0),
        "cpu": cpu1 - cpu0, "deliveries": len(latencies), "latencies": latencies,
        "lost": sum(w.lost for w in watchers),
        "duplicates": sum(w.duplicates for w in watchers),
        "seq_errors": sum(w.seq_errors for w in watchers),
        "post_errors": sum(p.errors for p in posters),
        "first_error": next((p.first_error for p in posters if p.first_error), ""),
        "connect_seconds": connect_seconds,
    }


def worker_process(jobs: list[JobRef], plan: Plan, barriers: Sequence[Any],
                   results: Any) -> None:
    raise_nofile()
    try:
        try:
            import uvloop
            loop_factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result = runner.run(run_worker(jobs, plan, barriers))
    except BaseException as exc:
        for barrier in barriers:
            barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        return
    results.put(result)


# ---------------------------------------------------------------------------------------
# One case: a scenario, a post mode, a target


@dataclass
class Row:
    scenario: str
    target: str
    mode: str
    shape: str
    deliveries: int = 0
    rate: float = 0.0
    p50: float = 0.0
    p99: float = 0.0
    max: float = 0.0
    lost: int = 0
    duplicates: int = 0
    seq_errors: int = 0
    server_us: float = 0.0
    server_share: float = 0.0
    redis_us: float | None = None
    generator_share: float = 0.0
    kib_per_socket: float | None = None
    post_errors: int = 0
    note: str = ""


def percentile(ordered: Sequence[float], fraction: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def run_case(target: Target, scenario: Scenario, mode: str, args: argparse.Namespace) -> Row:
    shape = f"{scenario.jobs}x{scenario.watchers}x{scenario.events}"
    row = Row(scenario.key, target.name, mode, shape)
    jobs = target.create_jobs(scenario.jobs)
    workers = max(1, min(args.workers, len(jobs)))
    rate_per_job = scenario.rate / scenario.jobs if scenario.rate else None
    duration = scenario.events / rate_per_job if rate_per_job else 0.0
    plan = Plan(mode=mode, events=scenario.events, watchers=scenario.watchers,
                total_jobs=scenario.jobs, rate_per_job=rate_per_job, batch=scenario.batch,
                http=args.http, compression=args.compression == "deflate",
                check_seq=target.metis, drain_timeout=10.0 + duration)
    context = multiprocessing.get_context("fork")
    barriers = [context.Barrier(workers + 1) for _ in range(3)]
    ready, go, done = barriers
    results = context.Queue()
    processes = [context.Process(target=worker_process,
                                 args=(jobs[w::workers], plan, barriers, results), daemon=True)
                 for w in range(workers)]
    pids = [server.pid for server in target.servers]
    try:
        rss0 = sum(rss_kib(pid) for pid in pids)
        for process in processes:
            process.start()
        ready.wait(BARRIER_TIMEOUT)
        time.sleep(0.2)  # let every subscription settle (broadcaster confirms none)
        rss1 = sum(rss_kib(pid) for pid in pids)
        cpu0 = sum(cpu_seconds(pid) for pid in pids)
        redis0 = cpu_seconds(target.redis.pid) if target.redis else 0.0
        spy = start_py_spy(args, target, scenario, mode)
        wall0 = time.time()
        go.wait(BARRIER_TIMEOUT)
        done.wait(BARRIER_TIMEOUT)
        wall1 = time.time()
        if spy is not None:
            stop_py_spy(spy)
        cpu1 = sum(cpu_seconds(pid) for pid in pids)
        redis1 = cpu_seconds(target.redis.pid) if target.redis else 0.0
        outcomes = [results.get(timeout=120) for _ in processes]
    except threading.BrokenBarrierError:
        outcomes = [results.get(timeout=30) for _ in processes]
        errors = [o["error"] for o in outcomes if "error" in o]
        raise RuntimeError(f"a generator process failed: {errors}") from None
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        target.cancel_jobs(jobs)
    errors = [o["error"] for o in outcomes if "error" in o]
    if errors:
        raise RuntimeError(f"a generator process failed: {errors}")
    latencies = sorted(x for o in outcomes for x in o["latencies"])
    row.deliveries = len(latencies)
    start = min(o["t0"] for o in outcomes)
    end = max(o["last_receive"] for o in outcomes)
    row.rate = row.deliveries / (end - start) if end > start else 0.0
    row.p50, row.p99, row.max = (1000 * percentile(latencies, 0.5),
                                 1000 * percentile(latencies, 0.99),
                                 1000 * (latencies[-1] if latencies else float("nan")))
    row.lost = sum(o["lost"] for o in outcomes)
    row.duplicates = sum(o["duplicates"] for o in outcomes)
    row.seq_errors = sum(o["seq_errors"] for o in outcomes)
    row.post_errors = sum(o["post_errors"] for o in outcomes)
    wall = wall1 - wall0
    if row.deliveries:
        row.server_us = 1e6 * (cpu1 - cpu0) / row.deliveries
        if target.redis is not None:
            row.redis_us = 1e6 * (redis1 - redis0) / row.deliveries
    row.server_share = (cpu1 - cpu0) / wall if wall else 0.0
    row.generator_share = sum(o["cpu"] for o in outcomes) / wall if wall else 0.0
    sockets = len(jobs) * scenario.watchers
    if scenario.key == "D":
        row.kib_per_socket = (rss1 - rss0) / sockets
    notes = []
    if workers > 1:
        notes.append(f"{workers} gen procs")
    if rate_per_job:
        achieved = len(jobs) * scenario.events / max(
            1e-9, max(o["posted"] for o in outcomes) - start)
        notes.append(f"posted {achieved:.0f}/s")
    if row.post_errors:
        notes.append(f"POST errors {row.post_errors}: "
                     + next(o["first_error"] for o in outcomes if o["first_error"])[:80])
    if row.seq_errors:
        notes.append(f"seq gaps {row.seq_errors}")
    if scenario.key == "D":
        notes.append(f"connect {max(o['connect_seconds'] for o in outcomes):.1f}s")
    row.note = "; ".join(notes)
    return row


def start_py_spy(args: argparse.Namespace, target: Target, scenario: Scenario, mode: str
                 ) -> tuple[subprocess.Popen[bytes], Path] | None:
    """``py-spy record`` of the (first) server while the events flow, when asked for."""
    if not args.py_spy:
        return None
    executable = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out = Path(args.py_spy) / f"{target.name.replace(' ', '')}-{scenario.key}-{mode}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([executable, "record", "--pid", str(target.servers[0].pid),
                                "--format", "raw", "--rate", "250", "--nonblocking",
                                "--output", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # py-spy attaches
    return process, out


def stop_py_spy(spy: tuple[subprocess.Popen[bytes], Path]) -> None:
    process, out = spy
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    if out.exists():
        print(profile_summary(out.read_text()), flush=True)


def _frame_name(frame: str) -> str:
    """``func (path/to/module.py:123)`` -> ``func (module.py)``: lines merged, paths cut."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    parts = where.split("/")
    keep = "/".join(parts[-2:]) if len(parts) > 1 else where
    return f"{name} ({keep})"


def profile_summary(raw: str, top: int = 25) -> str:
    """The functions with the most samples, by self time and inclusive time."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")
                  and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + count
    if not total:
        return "  (py-spy recorded no samples)"
    out = [f"  py-spy: {total} samples on CPU", "  self time:"]
    out += [f"    {100 * n / total:5.1f}%  {name}"
            for name, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]]
    out.append("  inclusive time:")
    out += [f"    {100 * n / total:5.1f}%  {name}"
            for name, n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Output


HEADER = ("scen", "target", "mode", "jobs x ws x ev", "delivered", "deliv/s", "p50 ms",
          "p99 ms", "max ms", "lost", "dup", "srv us/ev", "srv cpu", "redis us/ev",
          "gen cpu", "KiB/sock", "notes")


def cells(row: Row) -> list[str]:
    return [row.scenario, row.target, row.mode, row.shape, str(row.deliveries),
            f"{row.rate:,.0f}", f"{row.p50:.2f}", f"{row.p99:.2f}", f"{row.max:.1f}",
            str(row.lost), str(row.duplicates), f"{row.server_us:.1f}",
            f"{100 * row.server_share:.0f}%",
            "-" if row.redis_us is None else f"{row.redis_us:.1f}",
            f"{100 * row.generator_share:.0f}%",
            "-" if row.kib_per_socket is None else f"{row.kib_per_socket:.1f}", row.note]


def table(rows: Sequence[Row]) -> str:
    body = [list(HEADER), *(cells(row) for row in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(HEADER))]
    out = []
    for n, line in enumerate(body):
        out.append(" | ".join(cell.ljust(widths[i]) if i in (0, 1, 2, 3, 16)
                              else cell.rjust(widths[i]) for i, cell in enumerate(line)))
        if n == 0:
            out.append("-+-".join("-" * w for w in widths))
    return "\n".join(out)


def ratios(rows: Sequence[Row]) -> str:
    by_key = {(row.scenario, row.mode, row.target): row for row in rows}
    out = []
    for (scenario, mode, target), row in by_key.items():
        if target != "redis":
            continue
        peer = by_key.get((scenario, mode, "peer"))
        if peer and peer.rate and peer.server_us:
            out.append(f"{scenario} {mode:6} metis(redis) / naive peer: deliveries/s x"
                       f"{row.rate / peer.rate:.2f}, server CPU per event x"
                       f"{row.server_us / peer.server_us:.2f}, p99 x"
                       f"{row.p99 / peer.p99 if peer.p99 else float('nan'):.2f}"
                       f"  (lost {row.lost} vs {peer.lost})")
        scale = by_key.get((scenario, mode, "redis x2"))
        if scale and row.rate and row.server_us:
            out.append(f"{scenario} {mode:6} two servers / one server (redis): deliveries/s x"
                       f"{scale.rate / row.rate:.2f}, server CPU per event (both) x"
                       f"{scale.server_us / row.server_us:.2f}")
    return "\n".join(out)


def targets_line(rows: Sequence[Row]) -> str:
    """The targets of issue 7, judged on this run."""
    def find(scenario: str, mode: str, target: str) -> Row | None:
        return next((r for r in rows if (r.scenario, r.mode, r.target)
                     == (scenario, mode, target)), None)

    out = []
    for backend in ("memory", "redis"):
        checks = []
        if row := find("A", "single", backend):
            checks.append(f"A single {row.server_us:.0f} us <= 60: "
                          f"{'met' if row.server_us <= 60 else 'NOT met'}")
        for mode in ("batch", "pipe"):
            if row := find("A", mode, backend):
                checks.append(f"A {mode} {row.server_us:.0f} us <= 15: "
                              f"{'met' if row.server_us <= 15 else 'NOT met'}")
        if row := find("B", "single", backend):
            checks.append(f"B p99 {row.p99:.1f} ms <= 3: {'met' if row.p99 <= 3 else 'NOT met'}")
        if (row := find("C", "single", backend)) and (peer := find("C", "single", "peer")):
            good = row.rate >= peer.rate and row.lost == 0
            checks.append(f"C {row.rate:,.0f}/s >= peer {peer.rate:,.0f}/s, 0 lost: "
                          f"{'met' if good else 'NOT met'}")
        if (row := find("D", "single", backend)) and row.kib_per_socket is not None:
            checks.append(f"D {row.kib_per_socket:.1f} KiB/socket <= 25: "
                          f"{'met' if row.kib_per_socket <= 25 else 'NOT met'}")
        mine = [r for r in rows if r.target in (backend, f"{backend} x2")]
        if mine:
            bad = sum(r.lost + r.duplicates + r.seq_errors for r in mine)
            checks.append(f"lost/dup/seq gaps {bad}: {'met' if bad == 0 else 'NOT met'}")
        if checks:
            out.append(f"{backend}: " + "; ".join(checks))
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.load",
        description="Load test of metis-stream's event path (issue 7). Starts a private "
                    "redis-server and server processes on 127.0.0.1; prints one row per "
                    "scenario, post mode and target.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-s", "--scenarios", default="A,B,C,D,E",
                        help="comma-separated: A (100 jobs x 1 watcher, unlimited), B (fixed "
                             "2,000 events/s), C (10 jobs x 50 watchers), D (5,000 idle "
                             "sockets, then 1,000 events), E (submissions over SSH to the "
                             "real test cluster: bench/ssh_submit.py; needs root)")
    parser.add_argument("-t", "--targets", default=",".join(TARGETS),
                        help="comma-separated: memory, redis, peer (the naive broadcaster "
                             "peer, skipped when broadcaster is not installed), scale (two "
                             "servers on one Redis, runs A single and C single)")
    parser.add_argument("-m", "--modes", default=",".join(MODES),
                        help="post modes to run where a scenario has them: single (one JSON "
                             "event per POST), batch (NDJSON batches of 100 with "
                             "Content-Length), pipe (one streamed chunked NDJSON request "
                             "per job)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced version of every scenario (~30-60 s in all)")
    parser.add_argument("--workers", type=int, default=1,
                        help="generator processes (each takes a share of the jobs)")
    parser.add_argument("--http", choices=("raw", "httpx"), default="raw",
                        help="HTTP client of the posters: raw asyncio streams or "
                             "httpx.AsyncClient")
    parser.add_argument("--compression", choices=("deflate", "none"), default="deflate",
                        help="offer permessage-deflate on websockets, as browsers do")
    parser.add_argument("--poll-interval", type=float, default=2.0,
                        help="the local scheduler's poll interval in the generated config")
    parser.add_argument("--py-spy", metavar="DIR", default="",
                        help="record the server with py-spy (pip install py-spy) during each "
                             "case into DIR, and print its top functions (the CPU figures of "
                             "a profiled run include py-spy's own cost to the server)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (configs, server logs)")
    args = parser.parse_args(argv)
    args.scenario_keys = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.mode_names = [m.strip() for m in args.modes.split(",") if m.strip()]
    for name in args.target_names:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r}")
    for name in args.mode_names:
        if name not in MODES:
            parser.error(f"unknown mode {name!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    defined = scenarios(args.quick)
    chosen = [defined[key] for key in args.scenario_keys if key in defined]
    workdir = Path(tempfile.mkdtemp(prefix="metis-bench-"))
    rows: list[Row] = []
    redis: RedisProc | None = None
    running: list[Target] = []
    began = time.monotonic()
    print(f"metis-stream load test: {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.2f}; generator: {args.workers} process(es), http={args.http}, "
          f"websocket compression={args.compression}; temporary files in {workdir}",
          flush=True)

    def run_target(target: Target, cases: list[tuple[Scenario, str]]) -> None:
        running.append(target)
        try:
            for server in target.servers:
                server.start()
            for scenario, mode in cases:
                try:
                    row = run_case(target, scenario, mode, args)
                except Exception as exc:
                    print(f"  {scenario.key} {target.name} {mode}: FAILED: {exc}", flush=True)
                    continue
                rows.append(row)
                print(f"  {row.scenario} {row.target:8} {row.mode:6} {row.deliveries:>7} "
                      f"deliveries {row.rate:>9,.0f}/s  p99 {row.p99:7.2f} ms  lost "
                      f"{row.lost} dup {row.duplicates}  server {row.server_us:6.1f} us/ev"
                      f"  [{time.monotonic() - began:5.0f}s]", flush=True)
        finally:
            target.stop()
            running.remove(target)

    all_cases = [(s, m) for s in chosen for m in s.modes if m in args.mode_names]
    try:
        needs_redis = any(t in args.target_names for t in ("redis", "peer", "scale"))
        if needs_redis:
            redis = RedisProc(workdir / "redis")
            (workdir / "redis").mkdir()
            redis.start()
        secret = secrets.token_urlsafe(32)
        for name in args.target_names:
            if name == "memory":
                run_target(Target("memory", [metis_server("memory", workdir / "memory", secret,
                                                          None, args.poll_interval)],
                                  None, secret), all_cases)
            elif name == "redis":
                assert redis is not None
                run_target(Target("redis", [metis_server("redis", workdir / "redis-1", secret,
                                                         redis.redis_url, args.poll_interval)],
                                  redis, secret), all_cases)
            elif name == "peer":
                if not have_broadcaster():
                    print("  naive peer: SKIPPED: broadcaster is not installed "
                          "(.venv/bin/pip install broadcaster)", flush=True)
                    continue
                assert redis is not None
                run_target(Target("peer", [peer_server(workdir / "peer", redis.redis_url)],
                                  redis, metis=False), all_cases)
            elif name == "scale":
                assert redis is not None
                cases = [(defined[s], m) for s, m in SCALE_CASES
                         if s in args.scenario_keys and m in args.mode_names]
                if not cases:
                    continue
                servers = [
                    metis_server(name, workdir / f"scale-{name}", secret, redis.redis_url,
                                 args.poll_interval)
                    for name in ("redis-a", "redis-b")
                ]
                run_target(Target("redis x2", servers, redis, secret), cases)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    finally:
        for target in list(running):
            target.stop()
        if redis is not None:
            redis.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(table(rows))
    print()
    if text := ratios(rows):
        print(text)
        print()
    if text := targets_line(rows):
        print("Targets of issue 7:")
        print(text)
    if "E" in args.scenario_keys:
        print("\nScenario E: submissions over SSH to the real test cluster")
        if os.geteuid() == 0:
            ssh_submit.run(runs=3 if args.quick else 10, concurrent=10 if args.quick else 50)
        else:
            print("skipped: building the test cluster needs root")
    print(f"\n(total {time.monotonic() - began:.0f}s; figures depend on the machine's load)")
    # The exit status judges metis-stream; the peer's losses are a finding, not a failure.
    ours = [r for r in rows if r.target != "peer"]
    return 0 if all(r.lost == 0 and r.duplicates == 0 for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
