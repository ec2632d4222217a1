"""A private redis-server for the tests: its own port on 127.0.0.1, its own directory, AOF on.

Register with ``pytest_plugins = ["tests.support.redis_server"]`` (or ``-p
tests.support.redis_server``) and ask for the session-scoped ``redis_server``
fixture. The server can be killed (SIGKILL, like a crash) and started again on
the same port and directory, so a test can check what survives in the AOF.

With ``CI=true`` a redis-server that cannot be installed or started fails the
run: a CI job must never go green by skipping the Redis tests.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import service_unavailable
from tests.support.leaks import watch_folder

# Its fixture declares the processes that may run until the session ends.
pytest_plugins = ["tests.support.leaks"]

INSTALL_SCRIPT = Path(__file__).with_name("install-system-packages.sh")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process, restartable on the same port and data directory."""

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        # everysec is the production setting that docs/redis.md recommends; a SIGKILL of
        # the process (not of the machine) loses nothing with it, which the tests rely on.
        command = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "everysec",
            "--save", "", "--daemonize", "no", "--logfile", str(self.log_path),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
        self._wait_ready(timeout)

    def kill(self) -> None:
        """SIGKILL, like a crash: no chance to flush anything but what is already written."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM)

    def restart(self) -> None:
        self.kill()
        self.start()

    def _signal(self, signum: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signum)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _wait_ready(self, timeout: float) -> None:
        """Until PING answers PONG: a server still loading its AOF answers -LOADING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self._log_tail()}")
            if self._ping():
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer within {timeout}s: {self._log_tail()}")

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-2000:]
        except OSError:
            return "(no log)"


def _find_or_install_redis() -> str | None:
    found = shutil.which("redis-server")
    if found is None and os.geteuid() == 0:
        try:
            subprocess.run(["bash", str(INSTALL_SCRIPT), "redis-server"], check=False)
        except OSError:  # no bash: report the missing redis-server, not this
            return None
        found = shutil.which("redis-server")
    return found


def start_private_redis(directory: Path) -> RedisServer:
    """A started redis-server of the caller's own, in ``directory``; a missing redis-server
    fails in CI and skips elsewhere."""
    executable = _find_or_install_redis()
    if executable is None:
        service_unavailable("redis-server is not installed (and we are not root to install it)")
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(executable, directory)
    try:
        server.start()
    except (OSError, RuntimeError) as exc:
        service_unavailable(f"redis-server would not start: {exc}")
    return server


@pytest.fixture(scope="session")
def redis_server(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RedisServer]:
    """One redis-server for the whole session, for tests that leave it running."""
    directory = tmp_path_factory.mktemp("redis")
    # redis-server works in its directory: whichever test restarted it, it runs on.
    watch_folder(pytestconfig, directory, session_wide=True)
    server = start_private_redis(directory)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, for tests that kill or restart it."""
    server = start_private_redis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()
