"""The Host check (metis_stream/web/hosts.py) against DNS rebinding, with a real server:
a request or a websocket handshake for a name that is not the server's gets 403, and so
does a keyless server's websocket from a page under such a name.

A rebinding page is served from the attacker's name, which then resolves to 127.0.0.1:
the browser sends the page's own name as ``Host`` and as ``Origin``, and treats the
server as the page's own origin. Chromium plays it with ``--host-resolver-rules``.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from metis_stream.config import load_config
from metis_stream.errors import ConfigError
from metis_stream.web.app import create_app
from metis_stream.web.hosts import host_name
from tests.support.server import ServerProcess
from tests.test_viewer import WAIT_MS, chromium

if TYPE_CHECKING:
    from playwright.sync_api import Browser

REBOUND = "rebind.test"


def start(folder: Path, **settings: Any) -> ServerProcess:
    process = ServerProcess(state_dir=folder / "server", server_settings=settings)
    process.start()
    return process


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = start(tmp_path_factory.mktemp("hosts"), submissions_per_minute=1000)
    try:
        yield process
    finally:
        process.stop()


def job_ids(server: ServerProcess) -> list[str]:
    return [job["id"] for job in httpx.get(f"{server.url}/api/jobs").json()["jobs"]]


def submit(server: ServerProcess, delay: float = 0) -> dict[str, Any]:
    created = httpx.post(f"{server.url}/api/jobs", json={
        "template": "tokens", "params": {"delay": delay, "text": "a b c"}})
    assert created.status_code == 201, created.text
    job: dict[str, Any] = created.json()
    return job


def as_host(server: ServerProcess, host: str, method: str = "GET", path: str = "/api/jobs",
            **request: Any) -> httpx.Response:
    return httpx.request(method, server.url + path, headers={"Host": host}, **request)


def open_socket(server: ServerProcess, host: str, path: str, origin: str | None = None
                ) -> Any:
    """A websocket handshake to the server that names ``host`` (the URL's authority)."""
    return websockets.connect(f"ws://{host}{path}",
                              sock=socket.create_connection(("127.0.0.1", server.port)),
                              origin=Origin(origin) if origin else None)


# Pure: the name in a Host header


@pytest.mark.parametrize(("header", "name"), [
    ("localhost", "localhost"), ("LocalHost:8000", "localhost"), ("localhost.", "localhost"),
    ("127.0.0.1:80", "127.0.0.1"), ("[::1]:8000", "::1"), ("[::1]", "::1"),
    ("app.example.org", "app.example.org"),
    ("", None), ("[::1", None), ("evil.test@127.0.0.1", None), ("127.0.0.1/x", None),
    ("a b", None), ("localhost:80:80", None), ("localhost:port", None),
])
def test_the_name_in_a_host_header(header: str, name: str | None) -> None:
    assert host_name(header) == name


def test_an_entry_of_allowed_hosts_that_is_no_name_stops_the_app_at_once(tmp_path: Path):
    config = load_config(None, {"METIS_STATE_DIR": str(tmp_path),
                                "METIS_INSECURE_NO_AUTH": "true",
                                "METIS_ALLOWED_HOSTS": "app.example.org, https://x/"})
    assert config.server.allowed_hosts == ("app.example.org", "https://x/")
    with pytest.raises(ConfigError, match="allowed_hosts: 'https://x/'"):
        create_app(config)


# Plain HTTP with a forged Host


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/jobs"), ("GET", "/"), ("GET", "/api/templates"), ("GET", "/healthz"),
    ("POST", "/api/jobs"),
])
def test_a_request_for_a_foreign_name_is_403(server: ServerProcess, method: str, path: str):
    before = job_ids(server)
    answer = as_host(server, f"{REBOUND}:{server.port}", method, path,
                     json={"template": "tokens", "params": {"delay": 0}})
    assert answer.status_code == 403, answer.text
    assert answer.headers["content-type"] == "application/json"
    assert REBOUND in answer.json()["error"]
    assert job_ids(server) == before


def test_a_foreign_name_cannot_read_a_job_or_cancel_it(server: ServerProcess):
    job = submit(server, delay=1)
    host = f"{REBOUND}:{server.port}"
    answer = as_host(server, host, path=f"/api/jobs/{job['id']}")
    assert answer.status_code == 403
    assert job["watch_token"] not in answer.text
    assert as_host(server, host, "DELETE", f"/api/jobs/{job['id']}").status_code == 403
    assert httpx.get(f"{server.url}/api/jobs/{job['id']}").json()["state"] != "cancelled"
    httpx.delete(f"{server.url}/api/jobs/{job['id']}")


@pytest.mark.parametrize("host", ["localhost", "localhost:1", "LOCALHOST.", "127.0.0.1",
                                  "127.8.9.10:8000", "[::1]", "[::1]:8000"])
def test_loopback_names_are_allowed_with_any_port(server: ServerProcess, host: str):
    assert as_host(server, host).status_code == 200


def test_a_request_without_a_host_is_403(server: ServerProcess):
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"GET /api/jobs HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 403 "), answer


async def test_a_websocket_handshake_for_a_foreign_name_is_refused(server: ServerProcess):
    job = submit(server)
    for path in ("/ws/jobs", f"/ws/jobs/{job['id']}"):
        with pytest.raises(InvalidStatus) as refused:
            async with open_socket(server, f"{REBOUND}:{server.port}", path):
                pass
        assert refused.value.response.status_code == 403
    async with open_socket(server, f"localhost:{server.port}", f"/ws/jobs/{job['id']}",
                           origin=f"http://localhost:{server.port}") as watching:
        assert [json.loads(frame) async for frame in watching][-1]["type"] == "completed"


def test_the_public_url_host_and_allowed_hosts_are_allowed(tmp_path: Path):
    process = start(tmp_path, public_url="https://metis.example.org:8443",
                    allowed_hosts=["Alias.Example.org", "[2001:db8::1]:8000"])
    try:
        for host in ("metis.example.org", "metis.example.org:8443", "alias.example.org:1",
                     "[2001:db8::1]", "localhost"):
            assert as_host(process, host).status_code == 200, host
        for host in (REBOUND, "example.org", "evil.metis.example.org", "[2001:db8::2]"):
            assert as_host(process, host).status_code == 403, host
    finally:
        process.stop()


async def test_a_star_takes_any_host_but_a_keyless_socket_still_needs_a_page_of_its_own(
        tmp_path: Path):
    """``allowed_hosts = ["*"]`` (for a proxy that rewrites Host) turns the Host check off;
    a keyless server still takes websockets only from pages under its own names: a rebound
    page's Origin equals its Host, and that must not be enough."""
    process = start(tmp_path, allowed_hosts=["*"])
    try:
        assert as_host(process, f"{REBOUND}:{process.port}").status_code == 200
        rebound = f"{REBOUND}:{process.port}"
        with pytest.raises(InvalidStatus) as refused:
            async with open_socket(process, rebound, "/ws/jobs", origin=f"http://{rebound}"):
                pass
        assert refused.value.response.status_code == 403
        own = f"127.0.0.1:{process.port}"
        async with open_socket(process, own, "/ws/jobs", origin=f"http://{own}") as socket_:
            await socket_.send(json.dumps({"template": "tokens", "params": {"delay": 0}}))
            assert [json.loads(frame) async for frame in socket_][-1]["type"] == "completed"
    finally:
        process.stop()


# A rebinding page in Chromium


ATTACK = """async ([jobId]) => {
    const json = {"Content-Type": "application/json"};
    const submission = JSON.stringify({template: "download",
                                       params: {url: "http://127.0.0.1:1/private"}});
    const seen = {};
    const list = await fetch("/api/jobs");
    seen.list = [list.status, await list.text()];
    seen.submit = (await fetch("/api/jobs", {method: "POST", headers: json,
                                             body: submission})).status;
    seen.cancel = (await fetch(`/api/jobs/${jobId}`, {method: "DELETE"})).status;
    seen.socket = await new Promise(resolve => {
        const socket = new WebSocket(`ws://${location.host}/ws/jobs`);
        socket.onopen = () => socket.send(submission);
        socket.onmessage = message => { resolve("took a job: " + message.data); };
        socket.onerror = () => resolve("refused");
    });
    return seen;
}"""


@pytest.fixture(scope="module")
def rebinding_browser() -> Iterator[Browser]:
    with chromium(f"--host-resolver-rules=MAP {REBOUND} 127.0.0.1") as launched:
        yield launched


@pytest.mark.browser
def test_a_page_whose_name_rebinds_to_the_server_gets_nothing(
        rebinding_browser: Browser, server: ServerProcess):
    job = submit(server, delay=1)
    before = job_ids(server)
    # The attacker's page: any document of the rebound origin runs the attacker's script
    # with the same rights, so the server's own answer stands in for it. The CSP is
    # bypassed: what is tested is the server's refusal, not the browser's.
    context = rebinding_browser.new_context(bypass_csp=True)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        page.goto(f"http://{REBOUND}:{server.port}/")
        seen = page.evaluate(ATTACK, [job["id"]])
    finally:
        context.close()
    assert seen["list"][0] == 403, seen
    assert job["watch_token"] not in seen["list"][1]
    assert seen["submit"] == 403, seen
    assert seen["cancel"] == 403, seen
    assert seen["socket"] == "refused", seen
    assert job_ids(server) == before
    httpx.delete(f"{server.url}/api/jobs/{job['id']}")
