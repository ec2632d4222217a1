"""metis-agent for the tests: a real agent process that dials out to a real server.

``AgentProcess`` runs metis_stream/metis_agent.py with the interpreter isolated from any
installed package (``-I -S``: the standard library only, as on a cluster), as this user on
this machine or, with a launcher, as the test cluster's user inside its network namespace.
``agent_cluster_config`` is the ``[clusters.X]`` block of a cluster reached through it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from metis_stream import tokens
from metis_stream.backends.redis import RedisBackend
from metis_stream.config import AGENT_SCRIPT
from metis_stream.shells.agent import AgentShell
from tests.support.server import ServerProcess

AGENT_KEY = "the-test-agent-key-of-at-least-32-characters"
"""The key every test agent presents; a cluster's config holds its hash."""


def agent_cluster_config(name: str, *, scheduler: str = "slurm", key: str = AGENT_KEY,
                         **settings: object) -> str:
    lines = [f"\n[clusters.{name}]", f'scheduler = "{scheduler}"', 'link = "agent"',
             f'agent_key = "{tokens.hash_api_key(key)}"']
    lines += [f"{setting} = {_toml(value)}" for setting, value in settings.items()]
    return "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class AgentProcess:
    """One metis-agent; ``start`` and ``stop`` (or ``kill``) as often as a test likes."""

    server_url: str
    key_file: Path
    """Readable by whoever runs the agent."""
    log_path: Path
    workdir: str = "metis-stream"
    allow_commands: Sequence[str] = ()
    allow_http: Sequence[str] = ()
    script: Path = AGENT_SCRIPT
    interpreter: str = sys.executable
    """The Python that runs it: the cluster user cannot reach this one's, in root's home."""
    launcher: Sequence[str] = ()
    """What runs the agent (``nsenter ... setpriv ...``: as the cluster user, in its
    namespace); empty: this user, here."""
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    _log_start: int = 0

    def start(self) -> None:
        argv = [*self.launcher, self.interpreter, "-I", "-S", str(self.script),
                "--server", self.server_url, "--key-file", str(self.key_file),
                "--workdir", self.workdir]
        for name in self.allow_commands:
            argv += ["--allow-command", name]
        for host in self.allow_http:
            argv += ["--allow-http", host]
        with open(self.log_path, "ab") as log:
            self._log_start = log.tell()
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            env=dict(self.env), cwd=self.cwd)

    def wait_connected(self, timeout: float = 20.0) -> None:
        """Until the agent started last says it connected (its log since), or fail with
        its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b"connected to" in self._log_bytes()[self._log_start:]:
                return
            if self.process is not None and self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"metis-agent did not connect: {self.log()[-2000:]}")

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

    def log(self) -> str:
        return self._log_bytes().decode(errors="replace")

    def _log_bytes(self) -> bytes:
        try:
            return self.log_path.read_bytes()
        except FileNotFoundError:
            return b""


def write_key_file(path: Path, key: str = AGENT_KEY) -> Path:
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


@dataclass
class AgentLink:
    shell: AgentShell
    server: ServerProcess
    agent: AgentProcess
    home: Path


@contextlib.asynccontextmanager
async def agent_link(folder: Path, redis_url: str, *, allow_commands: Sequence[str] = (),
                     wait: float = 10.0, workdir: str = ".") -> AsyncIterator[AgentLink]:
    """An AgentShell of this process whose operations reach, through Redis, a real server
    process that a real metis-agent polls: the agent runs as this user, with
    ``folder/home`` as its home, and ``workdir`` in it as its work folder."""
    cluster = f"agent{secrets.token_hex(4)}"  # a queue of its own in the shared Redis
    home = folder / "home"
    home.mkdir()
    server = ServerProcess(state_dir=folder / "server",
                           extra_config=agent_cluster_config(cluster),
                           server_settings={"redis_url": redis_url})
    agent = AgentProcess(server.url, write_key_file(folder / "agent-key"),
                         folder / "agent.log", workdir=workdir, allow_commands=allow_commands,
                         env={"HOME": str(home), "PATH": os.environ["PATH"]}, cwd=home)
    backend = RedisBackend(redis_url)
    server.start()
    try:
        agent.start()
        agent.wait_connected()
        await backend.start()
        shell = AgentShell(cluster, backend, wait=wait)
        try:
            yield AgentLink(shell, server, agent, home)
        finally:
            await shell.close()
            await backend.close()
    finally:
        agent.stop()
        server.stop()
