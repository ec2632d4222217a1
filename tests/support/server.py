"""A real metis-stream server under uvicorn, in its own process, for end-to-end tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.types import ASGIApp

from metis_stream import tokens
from metis_stream.config import JOBSCRIPTS_DIR, load_config
from metis_stream.jobs import JobState
from tests.support.processes import Process, end_group, find

EXAMPLE_TEMPLATES = f"""
[templates.tokens]
cluster = "local"
script = "{JOBSCRIPTS_DIR / 'tokens.pbs'}"
description = "Stream a model's output token by token"
params.text = {{ type = "str", max_length = 2000, default = "Hello from the cluster" }}
params.delay = {{ type = "float", min = 0, max = 5, default = 0.05 }}

[templates.download]
cluster = "local"
script = "{JOBSCRIPTS_DIR / 'download.pbs'}"
description = "Download a file and report its size and SHA-256"
params.url = {{ type = "url", required = true }}
"""

LOCAL_CLUSTER = """
[clusters.local]
scheduler = "local"
poll_interval = 0.3
"""


def script_templates(folder: Path, scripts: Mapping[str, str],
                     params: Mapping[str, str] | None = None, *, cluster: str = "local",
                     suffix: str = "") -> str:
    """Config for templates (named NAME + ``suffix``, on ``cluster``) whose batch scripts
    are the given ``sh`` bodies; ``params`` gives a template its TOML lines, by NAME."""
    folder.mkdir(parents=True, exist_ok=True)
    config = ""
    for name, body in scripts.items():
        script = folder / f"{name}.sh"
        script.write_text("#!/bin/sh\n" + body)
        config += (f'\n[templates.{name}{suffix}]\ncluster = "{cluster}"\n'
                   f'script = "{script}"\n')
        config += (params or {}).get(name, "")
    return config


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServerProcess:
    """``metis-stream serve`` with a config written for the test; restartable on its port."""

    state_dir: Path
    extra_config: str = LOCAL_CLUSTER + EXAMPLE_TEMPLATES
    server_settings: Mapping[str, object] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0
    env: Mapping[str, str] = field(default_factory=dict)
    serve_args: tuple[str, ...] = ()
    launcher: tuple[str, ...] = ()
    """A command that runs the server (``nsenter ... --``: on a test cluster's network)."""
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.state_dir / "config.toml"
        self.log_path = self.state_dir / "server.log"
        # Most tests are about something else than authentication and call without a key:
        # their servers say insecure_no_auth, as a server must. Tests of keys give api_keys
        # or keys (name -> {"key": ..., "role": ...}).
        keyed = {"api_keys", "keys"} & set(self.server_settings)
        auth = {} if keyed else {"insecure_no_auth": True}
        # Access logs on: tests read them as evidence of which process served what.
        settings = {"host": self.host, "port": self.port, "state_dir": str(self.state_dir),
                    "access_log": True, **auth, **self.server_settings}
        lines = ["[server]"] + [f"{key} = {_toml(value)}" for key, value in settings.items()]
        self.config_path.write_text("\n".join(lines) + "\n" + self.extra_config)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        # Unbuffered, so that a test reading the log sees every line already written.
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.pop("METIS_CONFIG", None)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [*self.launcher, sys.executable, "-m", "metis_stream.cli", "serve", "--config",
                 str(self.config_path), *self.serve_args],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"server did not start: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_path.read_text()

    def cancel_jobs(self) -> None:
        """Cancel, as a client would, every job that has not ended: a server's jobs
        outlive it."""
        listed = httpx.get(f"{self.url}/api/jobs", params={"limit": 1000}, timeout=30)
        for job in listed.json()["jobs"]:
            if not JobState(job["state"]).terminal:
                httpx.delete(f"{self.url}/api/jobs/{job['id']}", timeout=30)

    def rss_kib(self) -> int:
        """The server process's resident memory now (VmRSS), in KiB."""
        assert self.process is not None, "the server is not running"
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS in /proc/PID/status")


def submit(server: ServerProcess, template: str = "tokens", key: str | None = None,
           **params: Any) -> str:
    """Submit a job through the API (with ``key`` when the server has keys); its id."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.post(f"{server.url}/api/jobs", headers=headers, timeout=10,
                          json={"template": template, "params": params})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def history(server: ServerProcess, job_id: str) -> list[dict[str, Any]]:
    """The first page of a job's events."""
    events: list[dict[str, Any]] = httpx.get(
        f"{server.url}/api/jobs/{job_id}/events", timeout=10).json()["events"]
    return events


IDLE_SCRIPT = '"$METIS_EMIT" step idle\nwhile [ -f "$METIS_TOKEN_FILE" ]; do sleep 0.1; done\n'
"""A batch script that reports one step and waits until its job ends (its token file goes)."""


def idle_server(folder: Path, **settings: object) -> ServerProcess:
    """A server (not started) with the example templates and ``idle``, whose jobs wait for
    the test to post their events (:class:`RunningJob`)."""
    return ServerProcess(
        state_dir=folder / "server", server_settings=settings,
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES
        + script_templates(folder / "scripts", {"idle": IDLE_SCRIPT}))


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    """``server``, started, and stopped when the block ends."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RunningJob:
    """A local job of ``template`` whose script has posted its first ``step`` and then
    waits; the test posts further events with the job's own token, as the batch script
    would. :meth:`end` ends it."""

    def __init__(self, server: ServerProcess, template: str, timeout: float = 30,
                 key: str | None = None) -> None:
        self.server = server
        self.client_headers = {"Authorization": f"Bearer {key}"} if key else {}
        """What a client sends: the API key, on a server with keys."""
        created = httpx.post(f"{server.url}/api/jobs", json={"template": template},
                             headers=self.client_headers, timeout=30)
        assert created.status_code == 201, created.text
        self.id: str = created.json()["id"]
        self.watch_token: str = created.json()["watch_token"]
        self.secret = load_config(server.config_path).server.secret
        self.token = tokens.job_token(self.secret, self.id)
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.url = f"{server.url}/api/jobs/{self.id}/events"
        deadline = time.monotonic() + timeout
        while not any(e["type"] == "step" for e in self.events()):
            assert time.monotonic() < deadline, f"job {self.id} never posted its step"
            time.sleep(0.05)
        self.script = local_job_script(server.url, self.id, key)

    def post(self, content: bytes | str, content_type: str = "application/json",
             token: str | None = None) -> httpx.Response:
        return httpx.post(self.url, content=content, timeout=30, headers={
            "Content-Type": content_type, "Authorization": f"Bearer {token or self.token}"})

    def post_event(self, event: Any, token: str | None = None) -> httpx.Response:
        return self.post(json.dumps(event), token=token)

    def events(self) -> list[dict[str, Any]]:
        """The whole log, page by page."""
        events: list[dict[str, Any]] = []
        while True:
            answer = httpx.get(self.url, params={"after": len(events)},
                               headers=self.client_headers, timeout=30)
            assert answer.status_code == 200, answer.text
            events += answer.json()["events"]
            if not answer.json()["more"]:
                return events

    def watch_url(self) -> str:
        return f"{self.server.ws_url}/ws/jobs/{self.id}"

    def end(self) -> None:
        """Cancel the job unless it has ended already, then make sure that its script has
        stopped: a test that posted the terminal event in the script's stead, or stopped
        the server, left it running."""
        if self.server.process is not None:
            url = f"{self.server.url}/api/jobs/{self.id}"
            state = httpx.get(url, headers=self.client_headers, timeout=30).json()["state"]
            if not JobState(state).terminal:
                httpx.delete(url, headers=self.client_headers, timeout=30)
        end_group(self.script)


def local_job_script(url: str, job_id: str, key: str | None = None) -> Process:
    """The script of a local job that the server at ``url`` (whose API key is ``key``) has
    submitted. It leads the job's process group: the local scheduler's job id is its pid."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    record = httpx.get(f"{url}/api/jobs/{job_id}", headers=headers, timeout=30).json()
    script = find(int(record["scheduler_id"].removesuffix(".local")))
    assert script is not None, f"the script of job {job_id} has ended"
    return script


@contextlib.contextmanager
def serve_in_thread(app: ASGIApp) -> Iterator[str]:
    """A real uvicorn server in a thread of this process, for an app built with a backend
    of the test's own; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{_toml(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def live_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A real server on embedded-like defaults: memory backend, local scheduler, examples."""
    server = ServerProcess(state_dir=tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()
