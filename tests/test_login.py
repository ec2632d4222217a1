"""Logins with a second factor without a cluster (docs/login.md): what the login route
and the CLI refuse, and how a second-factor cluster that no login has opened shows and
refuses submissions. A real server process; its SSH cluster's login node does not
answer (a closed port), so nothing here needs the test cluster (tests/test_login_cluster.py
logs in to a real one)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream.config import load_config
from metis_stream.errors import BadInput, ConfigError
from metis_stream.service import MAX_LOGIN_CODE, login_code
from metis_stream.tokens import hash_api_key
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    ServerProcess,
    free_port,
    running,
    script_templates,
)

KEY_OPS = "admin-key-ops-" + "o" * 32
KEY_APP = "client-key-app-" + "a" * 32
KEYS = {"keys": {"ops": {"key": hash_api_key(KEY_OPS), "role": "admin"},
                 "app": {"key": hash_api_key(KEY_APP), "role": "client"}}}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("login")
    known_hosts = folder / "known_hosts"
    known_hosts.write_text("")
    config = (LOCAL_CLUSTER + EXAMPLE_TEMPLATES
              + f'\n[clusters.hpc]\nscheduler = "slurm"\nhost = "127.0.0.1"\n'
              f'port = {free_port()}\nuser = "me"\nuse_agent = false\n'
              f'key_file = "{folder / "no_key"}"\nknown_hosts = "{known_hosts}"\n'
              'second_factor = true\npoll_interval = 0.2\n'
              + script_templates(folder / "scripts", {"remote": "true\n"}, cluster="hpc"))
    with running(ServerProcess(state_dir=folder / "server", extra_config=config,
                               server_settings=KEYS)) as started:
        yield started


def login(server: ServerProcess, cluster: str, body: Any, key: str = KEY_OPS,
          content_type: str = "application/json") -> httpx.Response:
    content = body if isinstance(body, bytes) else httpx.Request(
        "POST", "/", json=body).content
    return httpx.post(f"{server.url}/api/clusters/{cluster}/login", content=content,
                      headers={**auth(key), "Content-Type": content_type}, timeout=30)


def health(server: ServerProcess) -> dict[str, Any]:
    clusters = httpx.get(f"{server.url}/api/clusters", headers=auth(KEY_OPS),
                         timeout=10).json()["clusters"]
    found: dict[str, Any] = next(c for c in clusters if c["name"] == "hpc")
    return found


def waiting_for_login(server: ServerProcess) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while (seen := health(server))["state"] != "login_needed":
        assert time.monotonic() < deadline, seen
        time.sleep(0.1)
    return seen


def test_a_cluster_that_no_login_opened_says_so_and_refuses_submissions(server: ServerProcess):
    seen = waiting_for_login(server)
    assert "metis-stream login hpc" in seen["last_error"]
    metrics = httpx.get(f"{server.url}/metrics", headers=auth(KEY_OPS), timeout=10).text
    assert 'metis_cluster_state{cluster="hpc",state="login_needed"} 1.0' in metrics
    assert 'metis_cluster_state{cluster="hpc",state="ok"} 0.0' in metrics
    refused = httpx.post(f"{server.url}/api/jobs", headers=auth(KEY_APP), timeout=10,
                         json={"template": "remote"})
    assert refused.status_code == 503
    assert "second factor" in refused.json()["error"]
    assert "`metis-stream login hpc`" in refused.json()["error"]
    assert httpx.get(f"{server.url}/api/jobs", headers=auth(KEY_OPS),
                     timeout=10).json()["jobs"] == []
    # Other clusters take jobs as ever.
    taken = httpx.post(f"{server.url}/api/jobs", headers=auth(KEY_APP), timeout=10,
                       json={"template": "tokens", "params": {"text": "hi", "delay": 0}})
    assert taken.status_code == 201, taken.text
    deadline = time.monotonic() + 30
    while (job := httpx.get(f"{server.url}/api/jobs/{taken.json()['id']}",
                            headers=auth(KEY_APP), timeout=10).json())["state"] != "completed":
        assert time.monotonic() < deadline, job
        time.sleep(0.1)


@pytest.mark.parametrize(("cluster", "body", "key", "content_type", "status", "words"), [
    ("hpc", {"code": "271828"}, KEY_APP, "application/json", 403, "an admin key"),
    ("nowhere", {"code": "271828"}, KEY_OPS, "application/json", 404, "no cluster named"),
    ("local", {"code": "271828"}, KEY_OPS, "application/json", 409, "nothing to log in to"),
    ("hpc", b"code=271828", KEY_OPS, "text/plain", 415, "as application/json"),
    ("hpc", b"{", KEY_OPS, "application/json", 400, "not valid JSON"),
    ("hpc", ["271828"], KEY_OPS, "application/json", 400, "a JSON object"),
    ("hpc", {}, KEY_OPS, "application/json", 400, "'code' must be"),
    ("hpc", {"code": 271828}, KEY_OPS, "application/json", 400, "'code' must be"),
    ("hpc", {"code": " 271828"}, KEY_OPS, "application/json", 400, "'code' must be"),
    ("hpc", {"code": "12\n34"}, KEY_OPS, "application/json", 400, "'code' must be"),
    # The login node cannot be reached: the code is never sent.
    ("hpc", {"code": "271828"}, KEY_OPS, "application/json", 502, "cannot connect"),
])
def test_a_bad_login_is_refused_and_changes_nothing(
        server: ServerProcess, cluster: str, body: Any, key: str, content_type: str,
        status: int, words: str):
    before = waiting_for_login(server)
    refused = login(server, cluster, body, key, content_type)
    assert refused.status_code == status, refused.text
    assert words in refused.json()["error"]
    assert "271828" not in refused.json()["error"]
    after = health(server)
    assert (after["state"], after["since"]) == ("login_needed", before["since"])


def test_the_cli_says_why_a_login_failed(server: ServerProcess):
    failed = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "login", "hpc", "--url", server.url,
         "--key", KEY_APP], input="271828\n", capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    assert "an admin key is required" in failed.stderr and "Traceback" not in failed.stderr


def test_login_codes_are_text_of_a_sane_length():
    assert login_code("271828") == "271828"
    assert login_code("x" * MAX_LOGIN_CODE) == "x" * MAX_LOGIN_CODE
    for bad in ("", "x" * (MAX_LOGIN_CODE + 1), "12 34\n", "\t123", None, 271828, ["1"]):
        with pytest.raises(BadInput, match="'code' must be"):
            login_code(bad)


def test_second_factor_is_for_a_login_node(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text('[clusters.here]\nscheduler = "slurm"\nsecond_factor = true\n')
    with pytest.raises(ConfigError, match=r"\[clusters\.here\]: second_factor is for a login"):
        load_config(path, {})


def test_serve_refuses_several_processes_for_a_second_factor_cluster(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text(f'[server]\nredis_url = "redis://127.0.0.1:1"\ninsecure_no_auth = true\n'
                    f'state_dir = "{tmp_path}"\n\n[clusters.hpc]\nscheduler = "slurm"\n'
                    'host = "h"\nuser = "u"\nsecond_factor = true\n')
    refused = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "serve", "--config", str(path),
         "--workers", "2"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "cluster hpc has second_factor = true" in refused.stderr
    assert "--workers 1" in refused.stderr and "docs/login.md" in refused.stderr
