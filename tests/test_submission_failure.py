"""What a failed submission tells whom: a watcher (the browser, with the job's watch token)
gets a plain cause and a reference; the server's log line with that reference, and an API
key holder, get the details (the SSH user, host, port, key, known_hosts, fingerprints).

A real server submits over SSH to a small SSH server in this process (paramiko) that
refuses every login, or whose host key the server does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import paramiko
import pytest
import websockets

from metis_stream.tokens import hash_api_key
from tests.support.server import ServerProcess

API_KEY = "failure-test-key"
USER = "secret-user-7f3a"


class _RefuseEveryLogin(paramiko.ServerInterface):
    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        return paramiko.common.AUTH_FAILED


@contextlib.contextmanager
def ssh_server(host_key: paramiko.PKey) -> Iterator[int]:
    """An SSH server on 127.0.0.1 that refuses every login; yields its port."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop = threading.Event()
    transports: list[paramiko.Transport] = []

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            transport = paramiko.Transport(connection)
            transports.append(transport)
            transport.add_server_key(host_key)
            # The client may give up during the handshake (an unknown host key).
            with contextlib.suppress(paramiko.SSHException, EOFError, OSError):
                transport.start_server(server=_RefuseEveryLogin())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()
        for transport in transports:
            transport.close()


@dataclass(frozen=True)
class Case:
    name: str
    known_host: bool
    """Whether known_hosts lists the SSH server's key (else the key is unknown)."""
    cause: str
    details: tuple[str, ...]
    """What the failure's message names (keys of Failed.secrets)."""


CASES = [
    Case("wrong user", known_host=True, cause="the server could not connect to the cluster",
         details=("user", "host", "port", "key file")),
    Case("unknown host key", known_host=False, cause="the cluster's host key is not trusted",
         details=("host", "port", "known_hosts", "fingerprint")),
]


@dataclass(frozen=True)
class Failed:
    """A job whose submission failed, and the secrets its failure message holds."""

    server: ServerProcess
    job_id: str
    watch_token: str
    secrets: dict[str, str]
    """What the failure's message names, by name."""
    case: Case


@pytest.fixture(params=CASES, ids=lambda case: case.name)
def failed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Failed]:
    case: Case = request.param
    host_key = paramiko.ECDSAKey.generate()
    key_file = tmp_path / "id-cluster-9c1e"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key_file)],
                   check=True, timeout=30)
    known_hosts = tmp_path / "known-hosts-4b2d"
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n")
    with ssh_server(host_key) as port:
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_key.get_name()} "
                               f"{host_key.get_base64()}\n" if case.known_host else "")
        cluster = (f'[clusters.hpc]\nscheduler = "slurm"\nhost = "127.0.0.1"\nport = {port}\n'
                   f'user = "{USER}"\nkey_file = "{key_file}"\nknown_hosts = "{known_hosts}"\n'
                   f'use_agent = false\n\n[templates.t]\ncluster = "hpc"\nscript = "{script}"\n')
        server = ServerProcess(state_dir=tmp_path / "server", extra_config=cluster,
                               server_settings={"api_keys": [hash_api_key(API_KEY)]})
        server.start()
        try:
            created = httpx.post(f"{server.url}/api/jobs", json={"template": "t"},
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
            assert created.status_code == 201, created.text
            secrets = {"user": USER, "host": "127.0.0.1", "port": f":{port}",
                       "key file": str(key_file), "known_hosts": str(known_hosts),
                       "fingerprint": host_key.fingerprint.removeprefix("SHA256:")}
            yield Failed(server, created.json()["id"], created.json()["watch_token"],
                         {name: secrets[name] for name in case.details}, case)
        finally:
            server.stop()


async def watched_events(failed: Failed) -> list[str]:
    """Every event frame a watcher receives over the websocket, until the job ends."""
    url = f"{failed.server.ws_url}/ws/jobs/{failed.job_id}?token={failed.watch_token}"
    async with websockets.connect(url) as ws:
        return [str(frame) async for frame in ws]


def watcher_reads(failed: Failed, frames: list[str]) -> str:
    """Everything a watch-token holder can read about the job, as text."""
    base = f"{failed.server.url}/api/jobs/{failed.job_id}"
    token = {"token": failed.watch_token}
    texts = [*frames,
             httpx.get(base, params=token, timeout=30).text,
             httpx.get(f"{base}/events", params=token, timeout=30).text,
             httpx.get(f"{base}/events", params=token, timeout=30,
                       headers={"Accept": "text/event-stream"}).text]
    return "\n".join(texts)


def test_watchers_get_a_plain_cause_and_a_reference_key_holders_the_details(failed: Failed):
    frames = asyncio.run(watched_events(failed))
    events = [json.loads(frame) for frame in frames]
    assert [e["type"] for e in events] == ["starting", "fatal"], events
    seen = watcher_reads(failed, frames)
    for name, secret in failed.secrets.items():
        assert secret not in seen, f"a watcher can read the {name}: {seen}"
    fatal = events[-1]["data"]
    reference = fatal["reference"]
    assert fatal == {"error": f"submission failed: {failed.case.cause} (reference {reference})",
                     "reference": reference}
    assert reference in seen
    as_watcher = httpx.get(f"{failed.server.url}/api/jobs/{failed.job_id}",
                           params={"token": failed.watch_token}, timeout=30).json()
    assert "error_detail" not in as_watcher
    assert as_watcher["error"] == fatal["error"]

    # The server's log: the reference on the line that has the details.
    lines = [line for line in failed.server.log().splitlines() if reference in line]
    assert len(lines) == 1, failed.server.log()
    for secret in failed.secrets.values():
        assert secret in lines[0], lines[0]

    # An API key holder reads the details on the job's record.
    key = {"Authorization": f"Bearer {API_KEY}"}
    record = httpx.get(f"{failed.server.url}/api/jobs/{failed.job_id}", headers=key,
                       timeout=30).json()
    listed = httpx.get(f"{failed.server.url}/api/jobs", headers=key, timeout=30).json()
    assert listed["jobs"] == [record]
    for secret in failed.secrets.values():
        assert secret in record["error_detail"], record
