"""The bad-input suite, against a real server process: every case gets a clear JSON
``{"error": ...}`` with the right status, and changes nothing: not the job database
(``GET /api/jobs``), not the job's log, not the local scheduler's state directory.

The server runs with small limits so that "exactly at" and "one byte over" are cheap.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from metis_stream import tokens
from metis_stream.events import chunk_capacity
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    script_templates,
)

MAX_EVENT_BYTES = 2048
MAX_REQUEST_BYTES = 16 * 1024
MAX_LINES = 10
MAX_EVENTS_PER_JOB = 40
NDJSON = "application/x-ndjson"

# A job that waits until its token file is removed (the server removes it when the job
# ends), so every test can end its job by posting a terminal event or by cancelling it.
SCRIPTS = {
    "idle": '"$METIS_EMIT" step "idle"\n'
            'while [ -f "$METIS_TOKEN_FILE" ]; do sleep 0.1; done\n',
    # Reads its parameter both ways (environment and spec) and reports both untouched.
    "echo": 'value=$("$METIS_EMIT" param word) || exit 1\n'
            '"$METIS_EMIT" completed "{\\"spec\\": $("$METIS_EMIT" quote "$value"), '
            '\\"env\\": $("$METIS_EMIT" quote "$WORD")}"\n',
}


def templates(folder: Path) -> str:
    return script_templates(folder, SCRIPTS, {
        "echo": 'params.word = { type = "str", max_length = 500, required = true }\n'})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("bad-input")
    process = ServerProcess(
        state_dir=folder / "server",
        server_settings={
            "submissions_per_minute": 10_000,
            "max_event_bytes": MAX_EVENT_BYTES,
            "max_request_bytes": MAX_REQUEST_BYTES,
            "max_lines_per_request": MAX_LINES,
            "max_events_per_job": MAX_EVENTS_PER_JOB,
        },
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + templates(folder / "scripts"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def wait_until(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def job(server: ServerProcess) -> Iterator[RunningJob]:
    running = RunningJob(server, "idle")
    try:
        yield running
    finally:
        running.end()


@dataclass(frozen=True)
class Snapshot:
    jobs: list[dict[str, Any]]
    events: list[dict[str, Any]] | None
    files: frozenset[str]


LAUNCHER_FILES = frozenset({"exit", ".exit.tmp", "terminal"})
"""What a job's launcher writes when its script ends: the job's doing, not a request's."""


def state_files(server: ServerProcess) -> frozenset[str]:
    """Everything under the state dir but the server's own log and what the jobs' launchers
    write at their end: job dirs, token files."""
    root = server.state_dir
    return frozenset(str(p.relative_to(root)) for p in root.rglob("*")
                     if p != server.log_path and p.name not in LAUNCHER_FILES)


def snapshot(server: ServerProcess, job: RunningJob | None = None) -> Snapshot:
    jobs = httpx.get(f"{server.url}/api/jobs", params={"limit": 1000}).json()["jobs"]
    return Snapshot(jobs, job.events() if job else None, state_files(server))


def assert_nothing_changed(server: ServerProcess, before: Snapshot, job: RunningJob | None = None
                           ) -> None:
    after = snapshot(server, job)
    assert after.jobs == before.jobs, "the job database changed"
    assert after.events == before.events, "the job's log changed"
    assert after.files == before.files, "the state dir changed"


def assert_error(response: httpx.Response, status: int, words: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]
    assert words in body["error"], body


def event_of_size(size: int, event_type: str = "log") -> bytes:
    """A JSON event of exactly ``size`` bytes."""
    empty = json.dumps({"type": event_type, "data": ""}).encode()
    body = json.dumps({"type": event_type, "data": "x" * (size - len(empty))}).encode()
    assert len(body) == size
    return body


# Malformed JSON, wrong types, invalid UTF-8


@pytest.mark.parametrize("body", [
    b'{"type": "log", "data": ', b"", b"{", b"nul\x00", b'{"type": "log"} trailing',
    b"NaN", b'{"type": "log", "data": NaN}',
])
def test_malformed_json_event_is_400(server: ServerProcess, job: RunningJob, body: bytes):
    before = snapshot(server, job)
    assert_error(job.post(body), 400)
    assert_nothing_changed(server, before, job)


@pytest.mark.parametrize("body", [b'{"type": "log", "data": "\xff\xfe"}', b"\xc3\x28",
                                  b'{"type": "lo\xedg"}'])
def test_invalid_utf8_in_a_json_event_is_400(server: ServerProcess, job: RunningJob, body: bytes):
    before = snapshot(server, job)
    assert_error(job.post(body), 400, "not valid JSON")
    assert_nothing_changed(server, before, job)


def test_invalid_utf8_in_the_middle_of_an_ndjson_batch_appends_nothing(server: ServerProcess,
                                                                       job: RunningJob):
    before = snapshot(server, job)
    body = (b'{"type": "log", "data": 1}\n{"type": "log", "data": "\xff"}\n'
            b'{"type": "log", "data": 3}\n')
    assert_error(job.post(body, NDJSON), 400, "line 2")
    assert_nothing_changed(server, before, job)


def test_invalid_utf8_in_a_submission_is_400(server: ServerProcess):
    before = snapshot(server)
    response = httpx.post(f"{server.url}/api/jobs", content=b'{"template": "tok\xffens"}',
                          headers={"Content-Type": "application/json"})
    assert_error(response, 400, "not valid JSON")
    assert_nothing_changed(server, before)


@pytest.mark.parametrize("event, words", [
    ({"type": 7}, "'type' must be"),
    ({"type": None}, "'type' must be"),
    ({"type": ["log"]}, "'type' must be"),
    ({"type": "log", "id": 7}, "'id' must be"),
    ({"type": "log", "id": ""}, "'id' must be"),
    ({"type": "log", "id": "x" * 129}, "'id' must be"),
    ("log", "JSON object"),
    (None, "JSON object"),
])
def test_wrong_types_in_an_event_are_422(server: ServerProcess, job: RunningJob, event: Any,
                                         words: str):
    before = snapshot(server, job)
    assert_error(job.post_event(event), 422, words)
    assert_nothing_changed(server, before, job)


@pytest.mark.parametrize("data", [None, 0, -1.5, True, "", "text", [1, [2]], {"a": {"b": None}}])
def test_data_may_be_any_json_value(job: RunningJob, data: Any):
    response = job.post_event({"type": "log", "data": data})
    assert response.status_code == 200, response.text
    assert job.events()[-1]["data"] == data


@pytest.mark.parametrize("body, words", [
    ({"template": 7}, "no template named"),
    ({"template": None}, "no template named"),
    ({"template": "tokens", "params": [1]}, "must be a JSON object"),
    ({"template": "tokens", "params": "text=x"}, "must be a JSON object"),
    ({"template": "tokens", "params": {"delay": True}}, "must be a number"),
    ({"template": "tokens", "params": {"text": 5}}, "must be a string"),
    ({"template": "tokens", "inputs": {"a": 1}}, "list of URLs"),
    ({"template": "tokens", "inputs": [5]}, "URL string"),
])
def test_wrong_types_in_a_submission_are_422(server: ServerProcess, body: dict[str, Any],
                                             words: str):
    before = snapshot(server)
    assert_error(httpx.post(f"{server.url}/api/jobs", json=body), 422, words)
    assert_nothing_changed(server, before)


# Limits: exactly at, and one byte over


def test_an_event_of_exactly_max_event_bytes_is_taken_and_one_byte_more_is_413(
        server: ServerProcess, job: RunningJob):
    before = snapshot(server, job)
    assert_error(job.post(event_of_size(MAX_EVENT_BYTES + 1)), 413, "at most")
    assert_nothing_changed(server, before, job)
    taken = job.post(event_of_size(MAX_EVENT_BYTES))
    assert taken.status_code == 200, taken.text
    assert len(job.events()) == len(before.events or []) + 1


def chunk_event(payload: bytes, **fields: Any) -> dict[str, Any]:
    return {"type": "chunk", "data": {"stream": "audio", "index": 0, "media_type": "audio/wav",
                                      "base64": base64.b64encode(payload).decode(), **fields}}


def test_a_chunk_over_the_limit_is_413_with_the_chunk_size_and_appends_nothing(
        server: ServerProcess, job: RunningJob):
    before = snapshot(server, job)
    capacity = chunk_capacity(MAX_EVENT_BYTES)
    too_big = json.dumps(chunk_event(bytes(capacity + 700)))
    assert_error(job.post(too_big), 413, f"a chunk may carry {capacity} bytes of media")
    assert_error(job.post(json.dumps({"type": "step", "data": "x"}) + "\n" + too_big + "\n",
                          NDJSON), 413, f"{capacity} bytes of media")
    assert_nothing_changed(server, before, job)
    taken = job.post_event(chunk_event(bytes(capacity)))
    assert taken.status_code == 200, taken.text
    assert job.events()[-1]["data"]["base64"] == base64.b64encode(bytes(capacity)).decode()


@pytest.mark.parametrize("change", [{"media_type": "audio wav"}, {"media_type": "audio/"},
                                    {"base64": "UklGR!=="}, {"base64": "UklGRg\n=="},
                                    {"index": -1}, {"stream": "../x"}])
def test_a_malformed_chunk_is_422_and_appends_nothing(server: ServerProcess, job: RunningJob,
                                                      change: dict[str, Any]):
    before = snapshot(server, job)
    event = chunk_event(b"RIFF")
    event["data"].update(change)
    assert_error(job.post_event(event), 422, "chunk")
    assert_error(job.post(json.dumps(chunk_event(b"ok")) + "\n" + json.dumps(event) + "\n",
                          NDJSON), 422, "line 2")
    assert_nothing_changed(server, before, job)


def test_an_ndjson_line_over_max_event_bytes_is_413_and_appends_nothing(server: ServerProcess,
                                                                        job: RunningJob):
    before = snapshot(server, job)
    body = event_of_size(100) + b"\n" + event_of_size(MAX_EVENT_BYTES + 1) + b"\n"
    assert_error(job.post(body, NDJSON), 413, "line 2")
    assert_nothing_changed(server, before, job)


def request_of_size(size: int, lines: int) -> bytes:
    """An NDJSON body of exactly ``size`` bytes in ``lines`` lines, each a valid event."""
    per_line = size // lines
    sizes = [per_line - 1] * lines
    sizes[-1] += size - per_line * lines
    body = b"".join(event_of_size(n) + b"\n" for n in sizes)
    assert len(body) == size and all(n <= MAX_EVENT_BYTES for n in sizes)
    return body


def test_a_request_of_exactly_max_request_bytes_is_taken_and_one_byte_more_is_413(
        server: ServerProcess, job: RunningJob):
    before = snapshot(server, job)
    assert_error(job.post(request_of_size(MAX_REQUEST_BYTES + 1, 9), NDJSON), 413, "at most")
    assert_nothing_changed(server, before, job)
    taken = job.post(request_of_size(MAX_REQUEST_BYTES, 9), NDJSON)
    assert taken.status_code == 200, taken.text
    assert len(taken.json()["seqs"]) == 9


def test_max_lines_per_request_is_taken_and_one_line_more_is_413(server: ServerProcess,
                                                                 job: RunningJob):
    lines = [json.dumps({"type": "log", "data": n}) + "\n" for n in range(MAX_LINES + 1)]
    before = snapshot(server, job)
    assert_error(job.post("".join(lines), NDJSON), 413, f"at most {MAX_LINES} events")
    assert_nothing_changed(server, before, job)
    taken = job.post("".join(lines[:MAX_LINES]), NDJSON)
    assert taken.status_code == 200, taken.text
    assert len(taken.json()["seqs"]) == MAX_LINES


def test_max_events_per_job_then_413_then_a_terminal_event_is_still_taken(
        server: ServerProcess, job: RunningJob):
    room = MAX_EVENTS_PER_JOB - len(job.events())
    while room:
        batch = min(room, MAX_LINES)
        lines = "".join(json.dumps({"type": "log", "data": n}) + "\n" for n in range(batch))
        assert job.post(lines, NDJSON).status_code == 200
        room -= batch
    assert len(job.events()) == MAX_EVENTS_PER_JOB
    before = snapshot(server, job)
    assert_error(job.post_event({"type": "log", "data": "one more"}), 413, "reached")
    assert_error(job.post('{"type": "log"}\n', NDJSON), 413, "reached")
    assert_nothing_changed(server, before, job)
    ended = job.post_event({"type": "completed", "data": {"ok": True}})
    assert ended.status_code == 200, ended.text
    assert job.events()[-1]["seq"] == MAX_EVENTS_PER_JOB + 1
    assert job.events()[-1]["type"] == "completed"


def test_a_submission_over_64_kib_is_413(server: ServerProcess):
    before = snapshot(server)
    body = json.dumps({"template": "tokens", "params": {"text": "x" * 70_000}})
    assert_error(httpx.post(f"{server.url}/api/jobs", content=body,
                            headers={"Content-Type": "application/json"}), 413, "at most")
    assert_nothing_changed(server, before)


# NDJSON all or nothing


@pytest.mark.parametrize("bad, status", [
    ('{"type": "NOPE"}', 422), ("{not json", 400), ('{"type": "starting"}', 422),
    ('{"type": "log", "id": 5}', 422), ("[1]", 422),
])
def test_ndjson_with_a_bad_line_in_the_middle_appends_nothing(
        server: ServerProcess, job: RunningJob, bad: str, status: int):
    lines = [json.dumps({"type": "log", "data": n}) for n in range(5)]
    lines[2] = bad
    before = snapshot(server, job)
    assert_error(job.post("\n".join(lines) + "\n", NDJSON), status, "line 3")
    assert_nothing_changed(server, before, job)


def test_an_ndjson_batch_that_ends_the_job_and_goes_on_appends_nothing(server: ServerProcess,
                                                                       job: RunningJob):
    body = '{"type": "log"}\n{"type": "completed"}\n{"type": "log"}\n'
    before = snapshot(server, job)
    assert_error(job.post(body, NDJSON), 409, "already ended")
    assert_nothing_changed(server, before, job)


# Tokens and jobs


def test_an_unknown_job_is_404_with_its_own_valid_token(server: ServerProcess, job: RunningJob):
    unknown = "j_01M87P14J6V8D2MYD25J6MJ0B2"
    token = tokens.job_token(job.secret, unknown)
    before = snapshot(server, job)
    response = httpx.post(f"{server.url}/api/jobs/{unknown}/events", json={"type": "log"},
                          headers={"Authorization": f"Bearer {token}"})
    assert_error(response, 404, "unknown job")
    assert_error(httpx.get(f"{server.url}/api/jobs/{unknown}/spec",
                           headers={"Authorization": f"Bearer {token}"}), 404, "unknown job")
    assert_nothing_changed(server, before, job)


def test_another_jobs_token_is_401(server: ServerProcess, job: RunningJob):
    other = RunningJob(server, "idle")
    try:
        before = snapshot(server, job)
        assert_error(job.post_event({"type": "log"}, token=other.token), 401, "job token")
        assert_error(httpx.get(f"{server.url}/api/jobs/{job.id}/spec",
                               headers={"Authorization": f"Bearer {other.token}"}),
                     401, "job token")
        watch = tokens.watch_token(job.secret, job.id)
        assert_error(job.post_event({"type": "log"}, token=watch), 401, "job token")
        assert_nothing_changed(server, before, job)
    finally:
        other.end()


def test_the_token_of_an_ended_job_is_refused(server: ServerProcess, job: RunningJob):
    ended = RunningJob(server, "idle")
    assert ended.post_event({"type": "completed"}).status_code == 200
    before = snapshot(server, job)
    assert_error(ended.post_event({"type": "log"}), 409, "already ended")
    assert_error(httpx.get(f"{server.url}/api/jobs/{ended.id}/spec",
                           headers={"Authorization": f"Bearer {ended.token}"}),
                 409, "already ended")
    assert_error(job.post_event({"type": "log"}, token=ended.token), 401, "job token")
    assert_nothing_changed(server, before, job)
    assert ended.events()[-1]["type"] == "completed"


@pytest.mark.parametrize("late", [{"type": "log"}, {"type": "completed"}, {"type": "fatal"}])
def test_an_event_after_the_terminal_event_is_409(server: ServerProcess, job: RunningJob,
                                                  late: dict[str, Any]):
    assert job.post_event({"type": "fatal", "data": "gone"}).status_code == 200
    before = snapshot(server, job)
    assert_error(job.post_event(late), 409, "already ended")
    assert_error(job.post(json.dumps(late) + "\n", NDJSON), 409, "already ended")
    assert_nothing_changed(server, before, job)


def test_a_repeated_idempotency_key_returns_the_same_seq_and_the_first_write_wins(
        server: ServerProcess, job: RunningJob):
    first = job.post_event({"type": "log", "data": "first", "id": "key-1"})
    assert first.status_code == 200
    seq = first.json()["seqs"][0]
    before = snapshot(server, job)
    for retry in ({"type": "log", "data": "first", "id": "key-1"},
                  {"type": "log", "data": "SECOND", "id": "key-1"},
                  {"type": "result", "data": 2, "id": "key-1"}):
        again = job.post_event(retry)
        assert again.status_code == 200, again.text
        assert again.json() == {"seqs": [seq], "duplicates": 1}
    batch = job.post('{"type": "log", "data": "x", "id": "key-1"}\n', NDJSON)
    assert batch.json() == {"seqs": [seq], "duplicates": 1}
    assert_nothing_changed(server, before, job)
    assert next(e for e in job.events() if e["seq"] == seq)["data"] == "first"


def test_a_key_repeated_inside_one_batch_is_appended_once(job: RunningJob):
    body = ('{"type": "log", "data": "a", "id": "k-2"}\n'
            '{"type": "log", "data": "b", "id": "k-2"}\n')
    answer = job.post(body, NDJSON).json()
    assert answer["duplicates"] == 1
    assert answer["seqs"][0] == answer["seqs"][1]
    assert [e["data"] for e in job.events() if e["seq"] == answer["seqs"][0]] == ["a"]


# Templates and parameters


async def test_a_template_that_is_not_configured_is_refused_everywhere(server: ServerProcess):
    before = snapshot(server)
    for name in ("nope", "../tokens", "../../etc/passwd", "tokens/../idle", "TOKENS", ""):
        assert_error(httpx.post(f"{server.url}/api/jobs", json={"template": name}),
                     422, "no template named")
    async with websockets.connect(f"{server.ws_url}/ws/jobs") as socket:
        await socket.send(json.dumps({"template": "../idle"}))
        assert "no template named" in json.loads(await socket.recv())["error"]
        with pytest.raises(ConnectionClosed):
            await socket.recv()
    assert socket.close_code == 4422
    assert_nothing_changed(server, before)


HOSTILE = [
    "a; touch {marker}", "a && touch {marker}", "a | touch {marker}", "$(touch {marker})",
    "`touch {marker}`", "'; touch {marker}; '", '"; touch {marker}; "', "a,b=c,touch {marker}",
    "two words  and\ttab", "line one\ntouch {marker}\nline three", "${{IFS}}touch${{IFS}}{marker}",
    "-v X=1", "\\\"'\\'",
]


def test_hostile_string_parameters_are_delivered_intact_and_never_run(server: ServerProcess,
                                                                      tmp_path: Path):
    marker = tmp_path / "ran"
    ids = {}
    for pattern in HOSTILE:
        value = pattern.format(marker=marker)
        created = httpx.post(f"{server.url}/api/jobs",
                             json={"template": "echo", "params": {"word": value}})
        assert created.status_code == 201, created.text
        assert created.json()["params"] == {"word": value}
        ids[created.json()["id"]] = value
    for job_id, value in ids.items():
        def ended(job_id: str = job_id) -> bool:
            state = httpx.get(f"{server.url}/api/jobs/{job_id}").json()["state"]
            return state in ("completed", "fatal")
        wait_until(ended)
        record = httpx.get(f"{server.url}/api/jobs/{job_id}").json()
        assert record["state"] == "completed", record
        assert record["result"] == {"spec": value, "env": value}
    assert not marker.exists(), "a parameter was executed"


def test_a_nul_in_a_string_parameter_is_refused(server: ServerProcess):
    before = snapshot(server)
    for value in ("a\x00b", "\x00", "touch x\x00; rm"):
        assert_error(httpx.post(f"{server.url}/api/jobs", json={
            "template": "echo", "params": {"word": value}}), 422, "NUL")
    assert_nothing_changed(server, before)


BAD_URLS = [
    ("file:///etc/passwd", "http or https"), ("ftp://host/file", "http or https"),
    ("javascript:alert(1)", "http or https"), ("data:text/plain,hello", "http or https"),
    ("gopher://host/1", "http or https"), ("HTTP", "http or https"),
    ("//host/no-scheme", "http or https"), ("http:///no-host", "must have a host"),
    ("http://user:pw@host/x", "credentials"), ("https://user@host/x", "credentials"),
    ("http://:pw@host/x", "credentials"), ("http://host:99999/x", "not a valid URL"),
    ("http://host/a b", "spaces"), ("http://host/\x00", "control"),
]


@pytest.mark.parametrize("url, words", BAD_URLS)
def test_bad_urls_are_refused_as_parameters_and_as_inputs(server: ServerProcess, url: str,
                                                          words: str):
    before = snapshot(server)
    assert_error(httpx.post(f"{server.url}/api/jobs", json={
        "template": "download", "params": {"url": url}}), 422, words)
    assert_error(httpx.post(f"{server.url}/api/jobs", json={
        "template": "tokens", "inputs": ["https://ok.example/x", url]}), 422, words)
    assert_nothing_changed(server, before)


# Path traversal: any name that could reach the filesystem


def raw_request(server: ServerProcess, method: str, path: str, token: str | None = None,
                body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """The path exactly as given: no client-side normalisation of dot segments."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        assert response.getheader("content-type", "").startswith("application/json")
        answer: dict[str, Any] = json.loads(response.read())
        return response.status, answer
    finally:
        connection.close()


TRAVERSALS = ["..", "../..", "%2e%2e", "%2e%2e%2f%2e%2e", "..%2f..%2fsecret",
              "..%5c..", ".", "%2F", "j_x%00", "..%00", "%252e%252e%252f"]


@pytest.mark.parametrize("name", TRAVERSALS)
def test_path_traversal_in_job_ids_is_4xx_and_touches_nothing(
        server: ServerProcess, job: RunningJob, name: str):
    before = snapshot(server, job)
    event = json.dumps({"type": "log", "data": "x"}).encode()
    for method, path, body in [
        ("GET", f"/api/jobs/{name}", None),
        ("DELETE", f"/api/jobs/{name}", None),
        ("GET", f"/api/jobs/{name}/events", None),
        ("POST", f"/api/jobs/{name}/events", event),
        ("GET", f"/api/jobs/{name}/spec", None),
        ("GET", f"/api/jobs/{name}/spec/inputs", None),
        ("GET", f"/api/jobs/{job.id}/{name}/events", None),
        ("POST", f"/api/jobs/{job.id}/{name}/events", event),
    ]:
        # Even with the token the server would compute for that exact name.
        token = tokens.job_token(job.secret, name)
        status, answer = raw_request(server, method, path, token, body)
        assert 400 <= status < 500, (method, path, status, answer)
        assert isinstance(answer.get("error"), str), answer
    assert_nothing_changed(server, before, job)


@pytest.mark.parametrize("name", ["..%2ftoken", "..%2f..%2fsecret", "%2e%2e", "token",
                                  "spec.json", "WORD", "..", "word%00"])
def test_path_traversal_in_parameter_names_is_404(
        server: ServerProcess, job: RunningJob, name: str):
    before = snapshot(server, job)
    status, answer = raw_request(server, "GET", f"/api/jobs/{job.id}/spec/params/{name}",
                                 job.token)
    assert status == 404, answer
    assert isinstance(answer.get("error"), str)
    assert job.secret not in json.dumps(answer) and job.token not in json.dumps(answer)
    assert_nothing_changed(server, before, job)


async def test_path_traversal_in_websocket_job_ids_is_refused(server: ServerProcess):
    before = snapshot(server)
    # The websockets client removes plain dot segments itself; encoded ones reach the server.
    for name in ("%2e%2e", "..%2f..%2fsecret", "%2e%2e%2f%2e%2e%2fsecret", "%00", "j_x%2f.."):
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(f"{server.ws_url}/ws/jobs/{name}"):
                pass
        # A name that decodes to a path with "/" matches no websocket route: Starlette
        # refuses the handshake with a bare 403; one that stays a name is an unknown job.
        response = refused.value.response
        assert response.status_code in (403, 404), (name, response.status_code)
        if response.status_code == 404:
            assert json.loads(response.body or b"{}").get("error")
    assert_nothing_changed(server, before)
    assert "Traceback" not in server.log()


# Bugs found by this suite (see SECURITY.md, "Known issues")


def test_a_superscript_digit_in_after_or_limit_is_400(server: ServerProcess, job: RunningJob):
    assert_error(httpx.get(job.url, params={"after": "²"}), 400, "whole number")
    assert_error(httpx.get(f"{server.url}/api/jobs", params={"limit": "²"}), 400, "limit")


async def test_a_superscript_digit_in_a_websocket_after_is_400(server: ServerProcess,
                                                               job: RunningJob):
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"{server.ws_url}/ws/jobs/{job.id}?after=%C2%B2"):
            pass
    assert refused.value.response.status_code == 400


async def test_a_non_ascii_template_name_closes_the_socket_with_4422(server: ServerProcess):
    async with websockets.connect(f"{server.ws_url}/ws/jobs") as socket:
        await socket.send(json.dumps({"template": "é" * 100}))
        assert "no template named" in json.loads(await socket.recv())["error"]
        with pytest.raises(ConnectionClosed):
            await socket.recv()
    assert socket.close_code == 4422


async def test_a_watch_token_is_not_written_to_the_server_log(server: ServerProcess,
                                                              job: RunningJob):
    watch = tokens.watch_token(job.secret, job.id)
    assert httpx.get(job.url, params={"token": watch}).status_code == 200
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{job.id}?token={watch}"):
        pass
    await asyncio.sleep(0.2)
    log = server.log()
    assert f"/ws/jobs/{job.id}?token=REDACTED" in log, "the handshake is logged, redacted"
    assert watch not in log


@pytest.mark.parametrize("name", ["%74oken", "to%6Ben", "%74%6f%6b%65%6e"])
async def test_a_percent_encoded_token_parameter_is_redacted_too(server: ServerProcess,
                                                                job: RunningJob, name: str):
    """The server decodes ``%74oken`` to ``token`` and takes the watch token from it: the
    log must not keep what the server took."""
    watch = tokens.watch_token(job.secret, job.id)
    assert httpx.get(f"{job.url}?{name}={watch}").status_code == 200
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{job.id}?after=0&{name}={watch}"):
        pass
    await asyncio.sleep(0.2)
    log = server.log()
    assert f"/ws/jobs/{job.id}?after=0&{name}=REDACTED" in log
    assert watch not in log
