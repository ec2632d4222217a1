"""The FastAPI host app of docs/embedding.md, run as that page says: its ``host.py`` block is
written to a folder and served by ``uvicorn host:app`` in a process of its own, so the
example cannot drift from what the tests run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.server import free_port

EMBEDDING_DOC = Path(__file__).resolve().parents[2] / "docs" / "embedding.md"
SESSION = "a-long-random-session-id"
"""The session of the example's signed-in user, alice."""


def example_file(name: str) -> str:
    """The fenced block that follows ``<!-- file: NAME -->`` in docs/embedding.md."""
    text = EMBEDDING_DOC.read_text()
    found = re.search(rf"<!-- file: {re.escape(name)} -->\n```\w*\n(.*?)^```$", text,
                      re.S | re.M)
    assert found, f"docs/embedding.md has no block for {name}"
    return found.group(1)


@dataclass
class HostProcess:
    """``uvicorn host:app`` in ``folder``, with metis-stream's API key ``key`` and its state
    in the folder; ``public_url`` is the mount's URL unless a test gives another."""

    folder: Path
    key: str
    port: int = field(default_factory=free_port)
    public_url: str = ""
    process: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "host.py").write_text(example_file("host.py"))
        self.public_url = self.public_url or f"{self.url}/hpc"
        self.log_path = self.folder / "host.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        env = {name: value for name, value in os.environ.items()
               if not name.startswith("METIS_")}
        env.update({"PYTHONUNBUFFERED": "1", "METIS_API_KEYS": self.key,
                    "METIS_PUBLIC_URL": self.public_url,
                    "METIS_STATE_DIR": str(self.folder / "state")})
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "host:app", "--host", "127.0.0.1",
                 "--port", str(self.port)],
                cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the host app exited: {self.log()[-3000:]}")
            try:
                # The host's own route answers once its lifespan has started.
                if httpx.get(f"{self.url}/", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"the host app did not start: {self.log()[-3000:]}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
