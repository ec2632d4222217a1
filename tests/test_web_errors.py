"""Every error status of DESIGN.md, against a real server: a clear JSON error, the right
status, and nothing changed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.typing import Origin

from metis_stream import tokens
from metis_stream.backends.contract import AppendResult
from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import load_config
from metis_stream.errors import BackendUnavailable
from metis_stream.events import NewEvent
from metis_stream.web.app import create_app
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    free_port,
    serve_in_thread,
)
from tests.test_web import custom_templates

UNKNOWN_JOB = "j_01M87P14J6V8D2MYD25J6MJ0B2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("errors")
    process = ServerProcess(
        state_dir=folder / "server",
        server_settings={"submissions_per_minute": 1000},
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + custom_templates(folder / "scripts"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def job(server: ServerProcess) -> Iterator[RunningJob]:
    running = RunningJob(server, "sleepy")
    try:
        yield running
    finally:
        running.end()


def assert_error(response: httpx.Response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert words in response.json()["error"]


def assert_unchanged(job: RunningJob, before: Sequence[dict[str, Any]]) -> None:
    assert job.events() == list(before)


# 400


def test_400_malformed_json_event(job: RunningJob):
    before = job.events()
    assert_error(job.post(b'{"type": "log", "data": '), 400, "not valid JSON")
    assert_error(job.post(b"\xff\xfe not utf-8"), 400, "not valid JSON")
    assert_unchanged(job, before)


def test_400_bad_after_and_bad_submit_body(server: ServerProcess, job: RunningJob):
    assert_error(httpx.get(job.url, params={"after": "-1"}), 400, "whole number")
    as_json = {"Content-Type": "application/json"}
    assert_error(httpx.post(f"{server.url}/api/jobs", content=b"[1,2", headers=as_json), 400,
                 "not valid JSON")
    assert_error(httpx.post(f"{server.url}/api/jobs", json=[1]), 400, "JSON object")


# 401


def test_401_missing_wrong_and_other_jobs_token(server: ServerProcess, job: RunningJob):
    before = job.events()
    event = json.dumps({"type": "log", "data": "x"})
    assert_error(httpx.post(job.url, content=event,
                            headers={"Content-Type": "application/json"}), 401, "job token")
    assert_error(job.post(event, token="not-the-token"), 401, "job token")
    other = tokens.job_token(job.secret, UNKNOWN_JOB)
    assert_error(job.post(event, token=other), 401, "job token")
    watch = tokens.watch_token(job.secret, job.id)
    assert_error(job.post(event, token=watch), 401, "job token")
    assert_unchanged(job, before)


def test_401_does_not_tell_whether_a_job_exists(server: ServerProcess):
    response = httpx.post(f"{server.url}/api/jobs/{UNKNOWN_JOB}/events",
                          json={"type": "log"}, headers={"Authorization": "Bearer guess"})
    assert_error(response, 401, "job token")


# 403, and 401 for clients: a server with API keys and an Origin allowlist


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(
        state_dir=tmp_path_factory.mktemp("guarded") / "server",
        server_settings={"api_keys": [tokens.hash_api_key("right-key")],
                         "allowed_origins": ["https://app.example.org"]})
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def test_403_websocket_from_an_origin_not_allowed(guarded: ServerProcess):
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
                f"{guarded.ws_url}/ws/jobs", origin=Origin("https://evil.example.com"),
                additional_headers={"Authorization": "Bearer right-key"}):
            pass
    assert refused.value.response.status_code == 403
    assert b"not allowed" in (refused.value.response.body or b"")
    async with websockets.connect(
            f"{guarded.ws_url}/ws/jobs", origin=Origin("https://app.example.org"),
            additional_headers={"Authorization": "Bearer right-key"}) as socket:
        await socket.send(json.dumps({"template": "tokens", "params": {"delay": 0}}))
        frames = [json.loads(frame) async for frame in socket]
    assert frames[-1]["type"] == "completed"


async def test_401_for_clients_without_a_key(guarded: ServerProcess):
    assert_error(httpx.get(f"{guarded.url}/api/jobs"), 401, "API key")
    assert_error(httpx.post(f"{guarded.url}/api/jobs", json={"template": "tokens"}), 401,
                 "API key")
    assert_error(httpx.get(f"{guarded.url}/api/jobs",
                           headers={"Authorization": "Bearer wrong-key"}), 401, "API key")
    assert httpx.get(f"{guarded.url}/healthz").status_code == 200
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{guarded.ws_url}/ws/jobs"):
            pass
    assert refused.value.response.status_code == 401
    keyed = {"Authorization": "Bearer right-key"}
    record = httpx.post(f"{guarded.url}/api/jobs", json={"template": "tokens"},
                        headers=keyed).json()
    watch = f"{guarded.ws_url}/ws/jobs/{record['id']}"
    async with websockets.connect(f"{watch}?token={record['watch_token']}") as socket:
        frames = [json.loads(frame) async for frame in socket]
    assert frames[-1]["type"] == "completed"
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{watch}?token=wrong"):
            pass
    assert refused.value.response.status_code == 401
    events = httpx.get(f"{guarded.url}/api/jobs/{record['id']}/events",
                       params={"token": record["watch_token"]})
    assert events.status_code == 200


def test_a_server_refuses_a_public_address_without_keys_even_when_insecure(tmp_path: Path):
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nhost = "0.0.0.0"\nport = {free_port()}\n'
                      f'state_dir = "{tmp_path}"\ninsecure_no_auth = true\n' + LOCAL_CLUSTER)
    done = subprocess.run([sys.executable, "-m", "metis_stream.cli", "serve", "--config",
                           str(config)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0" in done.stderr
    assert "api_keys" in done.stderr


# 404


async def test_404_unknown_job_everywhere(server: ServerProcess):
    assert_error(httpx.get(f"{server.url}/api/jobs/{UNKNOWN_JOB}"), 404, "unknown job")
    assert_error(httpx.delete(f"{server.url}/api/jobs/{UNKNOWN_JOB}"), 404, "unknown job")
    assert_error(httpx.get(f"{server.url}/api/jobs/{UNKNOWN_JOB}/events"), 404, "unknown job")
    secret = load_config(server.config_path).server.secret
    valid_token = tokens.job_token(secret, UNKNOWN_JOB)
    assert_error(httpx.post(f"{server.url}/api/jobs/{UNKNOWN_JOB}/events",
                            json={"type": "log"},
                            headers={"Authorization": f"Bearer {valid_token}"}),
                 404, "unknown job")
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/ws/jobs/{UNKNOWN_JOB}"):
            pass
    assert refused.value.response.status_code == 404


# 409


def test_409_after_the_terminal_event_for_its_own_token_only(server: ServerProcess,
                                                            job: RunningJob):
    assert job.post(json.dumps({"type": "completed", "id": "done-1"})).status_code == 200
    before = job.events()
    assert_error(job.post(json.dumps({"type": "log", "data": "late"})), 409, "already ended")
    assert_error(job.post(json.dumps({"type": "log"}), token="other"), 401, "job token")
    assert_error(httpx.delete(f"{server.url}/api/jobs/{job.id}"), 409, "already ended")
    retried = job.post(json.dumps({"type": "completed", "id": "done-1"}))
    assert retried.status_code == 200
    assert retried.json()["duplicates"] == 1
    assert_unchanged(job, before)


# 413


def test_413_event_and_request_over_their_limits(job: RunningJob):
    before = job.events()
    big = json.dumps({"type": "log", "data": "x" * (64 * 1024)})
    assert_error(job.post(big), 413, "at most")
    line = json.dumps({"type": "log", "data": "y" * 1000}) + "\n"
    assert_error(job.post(line * 1100, "application/x-ndjson"), 413, "at most")
    assert_unchanged(job, before)


def test_413_for_one_line_too_long_in_a_streamed_body(job: RunningJob):
    before = job.events()

    def body() -> Iterator[bytes]:
        yield b'{"type": "log", "data": "' + b"z" * (70 * 1024)

    response = httpx.post(job.url, content=body(), headers={
        "Content-Type": "application/x-ndjson", "Authorization": f"Bearer {job.token}"})
    assert_error(response, 413, "at most")
    assert_unchanged(job, before)


# 415


def test_415_unknown_content_type(job: RunningJob):
    assert_error(job.post("type=log", "application/x-www-form-urlencoded"), 415, "ndjson")


# 422


@pytest.mark.parametrize("event, words", [
    ({"type": "Bad Type"}, "'type' must be"),
    ({"type": "submitted", "data": "999"}, "only the server"),
    ({"type": "log", "extra": 1}, "unknown field"),
    ({"data": "no type"}, "needs a 'type'"),
    ({"type": "log", "id": "has space"}, "'id' must be"),
    ([1, 2], "JSON object"),
])
def test_422_invalid_event(job: RunningJob, event: Any, words: str):
    before = job.events()
    assert_error(job.post(json.dumps(event)), 422, words)
    assert_unchanged(job, before)


def test_422_ndjson_with_a_bad_line_in_the_middle_appends_nothing(job: RunningJob):
    before = job.events()
    lines = [json.dumps({"type": "log", "data": n}) for n in range(5)]
    lines[2] = json.dumps({"type": "NOPE"})
    response = job.post("\n".join(lines) + "\n", "application/x-ndjson")
    assert_error(response, 422, "line 3")
    assert_unchanged(job, before)
    good = job.post("\n".join(lines[:2]) + "\n", "application/x-ndjson")
    assert good.status_code == 200
    assert len(good.json()["seqs"]) == 2


@pytest.mark.parametrize("body, words", [
    ({"template": "no-such-template"}, "no template named"),
    ({"template": "tokens", "params": {"delay": "fast"}}, "must be a number"),
    ({"template": "tokens", "params": {"delay": 99}}, "at most 5"),
    ({"template": "tokens", "params": {"text": "x" * 2001}}, "at most 2000"),
    ({"template": "tokens", "params": {"text": "nul\x00byte"}}, "NUL"),
    ({"template": "tokens", "params": {"nope": 1}}, "unknown parameter"),
    ({"template": "download", "params": {}}, "required"),
    ({"template": "download", "params": {"url": "file:///etc/passwd"}}, "http or https"),
    ({"template": "download", "params": {"url": "http://user:pw@host/x"}}, "credentials"),
    ({"template": "download", "params": {"url": "http://host/a b"}}, "spaces"),
    ({"template": "tokens", "inputs": ["ftp://host/file"]}, "http or https"),
    ({"template": "tokens", "inputs": "http://host/x"}, "list of URLs"),
])
def test_422_bad_submissions_create_no_job(server: ServerProcess, body: dict[str, Any],
                                           words: str):
    before = httpx.get(f"{server.url}/api/jobs").json()["jobs"]
    assert_error(httpx.post(f"{server.url}/api/jobs", json=body), 422, words)
    assert httpx.get(f"{server.url}/api/jobs").json()["jobs"] == before


async def first_frame_answer(server: ServerProcess, first: str) -> tuple[str, int | None]:
    async with websockets.connect(f"{server.ws_url}/ws/jobs") as socket:
        await socket.send(first)
        error = json.loads(await socket.recv())["error"]
        with pytest.raises(ConnectionClosedError):
            await socket.recv()
        return error, socket.close_code


async def test_websocket_submit_errors_close_with_4000_plus_status(server: ServerProcess):
    error, code = await first_frame_answer(server, json.dumps({"template": "no-such"}))
    assert (code, "no template named" in error) == (4422, True)
    error, code = await first_frame_answer(server, "not json")
    assert (code, "not valid JSON" in error) == (4400, True)


# 429


def test_429_with_retry_after_past_the_submission_rate(tmp_path: Path):
    process = ServerProcess(state_dir=tmp_path / "server",
                            server_settings={"submissions_per_minute": 2})
    process.start()
    try:
        answers = [httpx.post(f"{process.url}/api/jobs",
                              json={"template": "tokens", "params": {"delay": 0}})
                   for _ in range(3)]
        assert [a.status_code for a in answers] == [201, 201, 429]
        assert int(answers[2].headers["retry-after"]) >= 1
        assert "too many submissions" in answers[2].json()["error"]
        assert len(httpx.get(f"{process.url}/api/jobs").json()["jobs"]) == 2
    finally:
        process.cancel_jobs()
        process.stop()


def submit_from(process: ServerProcess, **client: Any) -> int:
    """One submission; ``client`` holds the headers and the transport of the caller."""
    headers = client.pop("headers", {})
    with httpx.Client(transport=httpx.HTTPTransport(**client)) as http:
        return http.post(f"{process.url}/api/jobs", headers=headers,
                         json={"template": "tokens", "params": {"delay": 0}}).status_code


def test_a_forged_x_forwarded_for_neither_dodges_the_rate_limit_nor_reaches_the_log(
        tmp_path: Path):
    process = ServerProcess(state_dir=tmp_path / "server",
                            server_settings={"submissions_per_minute": 2})
    process.start()
    try:
        answers = [submit_from(process, headers={"X-Forwarded-For": f"203.0.113.{n}"})
                   for n in range(4)]
        assert answers == [201, 201, 429, 429]
        assert "203.0.113." not in process.log()
        assert '127.0.0.1:' in process.log()
    finally:
        process.cancel_jobs()
        process.stop()


def test_a_keyless_server_bounds_submissions_from_all_addresses_together(tmp_path: Path):
    """Any local process can pick its source address among all of 127/8."""
    process = ServerProcess(state_dir=tmp_path / "server",
                            server_settings={"submissions_per_minute": 2})
    process.start()
    try:
        answers = [submit_from(process, local_address=f"127.0.0.{n}") for n in range(2, 6)]
        assert answers == [201, 201, 429, 429]
    finally:
        process.cancel_jobs()
        process.stop()


def test_forwarded_headers_are_taken_from_the_proxies_named_in_forwarded_allow_ips(
        tmp_path: Path):
    process = ServerProcess(state_dir=tmp_path / "server",
                            server_settings={"forwarded_allow_ips": ["127.0.0.1"]})
    process.start()
    try:
        assert submit_from(process, headers={"X-Forwarded-For": "203.0.113.7"}) == 201
        assert "203.0.113.7:" in process.log()
        assert submit_from(process, local_address="127.0.0.2",
                           headers={"X-Forwarded-For": "203.0.113.8"}) == 201
        assert "203.0.113.8" not in process.log(), "127.0.0.2 is not a named proxy"
    finally:
        process.cancel_jobs()
        process.stop()


# 503: the mapping, in process; the Redis suite shows it with redis-server down.


class UnavailableBackend(MemoryBackend):
    async def append(self, job_id: str, events: Sequence[NewEvent], *,
                     from_job: bool = False) -> AppendResult:
        if from_job:
            raise BackendUnavailable("store unreachable")
        return await super().append(job_id, events, from_job=from_job)


@pytest.fixture
def in_process_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A real uvicorn server in a thread, for an app built with a backend of the test's."""
    config = load_config(None, {"METIS_STATE_DIR": str(tmp_path),
                                "METIS_INSECURE_NO_AUTH": "true"})
    with serve_in_thread(create_app(config, backend=UnavailableBackend())) as url:
        yield url, config.server.secret


def test_503_with_retry_after_when_the_backend_is_unavailable(in_process_server):
    url, secret = in_process_server
    job = httpx.post(f"{url}/api/jobs", json={"template": "tokens",
                                              "params": {"delay": 5, "text": "a b c"}}).json()
    token = tokens.job_token(secret, job["id"])
    response = httpx.post(f"{url}/api/jobs/{job['id']}/events", json={"type": "log"},
                          headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "retry" in response.json()["error"]
    httpx.delete(f"{url}/api/jobs/{job['id']}")


def test_429_past_the_sockets_per_job_and_413_past_the_lines_per_request(tmp_path: Path):
    process = ServerProcess(
        state_dir=tmp_path / "server",
        server_settings={"max_sockets_per_job": 2, "max_lines_per_request": 3},
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + custom_templates(tmp_path / "s"))
    process.start()
    try:
        job = RunningJob(process, "sleepy")

        async def three_watchers() -> int:
            url = f"{process.ws_url}/ws/jobs/{job.id}"
            async with websockets.connect(url), websockets.connect(url):
                with pytest.raises(InvalidStatus) as refused:
                    async with websockets.connect(url):
                        pass
                sse = httpx.get(job.url, headers={"Accept": "text/event-stream"})
                assert_error(sse, 429, "watchers already")
                return refused.value.response.status_code

        assert asyncio.run(three_watchers()) == 429
        before = job.events()
        lines = "".join(json.dumps({"type": "log", "data": n}) + "\n" for n in range(4))
        assert_error(job.post(lines, "application/x-ndjson"), 413, "at most 3 events")
        assert_unchanged(job, before)
        assert job.post(lines[: lines.index("\n") + 1], "application/x-ndjson"
                        ).status_code == 200
        job.end()
    finally:
        process.stop()


async def test_a_keyless_server_takes_websockets_only_from_its_own_pages(server: ServerProcess):
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/ws/jobs",
                                      origin=Origin("https://evil.example.com")):
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(f"{server.ws_url}/ws/jobs",
                                  origin=Origin(server.url)) as socket:
        await socket.send(json.dumps({"template": "tokens", "params": {"delay": 0}}))
        assert [json.loads(frame) async for frame in socket][-1]["type"] == "completed"


def test_415_a_submission_that_is_not_json(server: ServerProcess):
    before = httpx.get(f"{server.url}/api/jobs").json()["jobs"]
    response = httpx.post(f"{server.url}/api/jobs", content=json.dumps({"template": "tokens"}),
                          headers={"Content-Type": "text/plain"})
    assert_error(response, 415, "application/json")
    assert httpx.get(f"{server.url}/api/jobs").json()["jobs"] == before


@pytest.mark.parametrize("path", ["/api/jobs/%2e%2e%2f%2e%2e/x", "/api/nope", "/api/jobs/a/b/c"])
def test_404_json_for_unknown_api_paths(server: ServerProcess, path: str):
    response = httpx.get(server.url + path)
    assert response.status_code == 404
    assert "error" in response.json()
