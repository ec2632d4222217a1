"""End to end: a real server under uvicorn, real websockets, real batch scripts run by the
local scheduler, posting with the real scripts/metis-emit and curl."""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from starlette.requests import Request

from metis_stream import keys, tokens
from metis_stream.config import ServerConfig, load_config
from metis_stream.errors import ConfigError
from metis_stream.jobs import state_machine
from metis_stream.web import auth
from metis_stream.web.app import create_app
from tests.support.processes import command_line, find, process_group
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    running,
    script_templates,
)
from tests.test_cli_e2e import Demo

REPO = Path(__file__).resolve().parent.parent
EMIT = REPO / "scripts" / "metis-emit"

SCRIPTS = {
    "exit3": "echo working; exit 3\n",
    "silent_ok": "exit 0\n",
    "sleepy": '"$METIS_EMIT" step "Sleeping"\nsleep 60\n"$METIS_EMIT" completed\n',
    "echo_param": '"$METIS_EMIT" result "{\\"has_env\\": \\"${WORD:+yes}\\"}"\n'
                  '"$METIS_EMIT" log "$("$METIS_EMIT" param word)"\n"$METIS_EMIT" completed\n',
}


def custom_templates(folder: Path) -> str:
    return script_templates(folder, SCRIPTS, {
        "echo_param": 'params.word = { type = "str", default = "plain" }\n'})


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        state_dir=tmp_path / "server",
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + custom_templates(tmp_path / "scripts"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


async def submit_and_collect(server: ServerProcess, template: str, params: dict[str, Any],
                             **connect: Any) -> tuple[list[dict[str, Any]], int | None]:
    async with websockets.connect(f"{server.ws_url}/ws/jobs", **connect) as socket:
        await socket.send(json.dumps({"template": template, "params": params}))
        events = [json.loads(frame) async for frame in socket]
        return events, socket.close_code


def without_monitor_running(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The monitor may add `running` when it sees the process before the job's first event."""
    return [e for e in events if not (e["type"] == "running" and e["data"] == {
        "source": "scheduler"})]


def job_token_for(server: ServerProcess, job_id: str) -> str:
    return tokens.job_token(load_config(server.config_path).server.secret, job_id)


async def test_tokens_job_streams_the_exact_sequence_and_closes_1000(server: ServerProcess):
    text = "the quick brown fox"
    events, code = await submit_and_collect(server, "tokens", {"text": text, "delay": 0.01})
    assert code == 1000
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["job"] for e in events}) == 1
    job_events = without_monitor_running(events)
    assert [e["type"] for e in job_events[:2]] == ["starting", "submitted"]
    words = text.split()
    expected: list[tuple[str, Any]] = [("step", "Loading model"), ("step", "Generating")]
    for index, word in enumerate(words):
        expected.append(("token", word if index == 0 else " " + word))
        expected.append(("progress", {"current": index + 1, "total": len(words)}))
    observed = [(e["type"], {k: v for k, v in e["data"].items() if k != "label"}
                 if e["type"] == "progress" else e["data"]) for e in job_events[2:-1]]
    assert observed == expected
    assert job_events[-1]["type"] == "completed"
    assert job_events[-1]["data"] == {"text": text, "tokens": len(words)}
    record = httpx.get(f"{server.url}/api/jobs/{events[0]['job']}").json()
    assert record["state"] == "completed"
    assert record["result"] == {"text": text, "tokens": len(words)}
    assert record["scheduler_id"] == events[1]["data"]


@pytest.fixture
def file_server(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    payload = bytes(range(256)) * 4000 + b"tail"
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "data.bin").write_bytes(payload)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/data.bin", payload
    finally:
        httpd.shutdown()
        httpd.server_close()


async def test_download_reports_size_and_sha256(server: ServerProcess, file_server):
    url, payload = file_server
    events, code = await submit_and_collect(server, "download", {"url": url})
    assert code == 1000
    final = events[-1]
    assert final["type"] == "completed", events
    result = final["data"]
    assert result["bytes"] == len(payload)
    assert result["sha256"] == hashlib.sha256(payload).hexdigest()
    steps = [e["data"] for e in events if e["type"] == "step"]
    assert steps[0] == "Downloading input"


async def test_download_of_a_failing_url_ends_in_fatal(server: ServerProcess, file_server):
    url, _ = file_server
    events, code = await submit_and_collect(server, "download", {"url": url + ".missing"})
    assert code == 1000
    assert events[-1]["type"] == "fatal"
    record = httpx.get(f"{server.url}/api/jobs/{events[0]['job']}").json()
    assert record["state"] == "failed"
    assert record["error"]


async def test_a_job_that_exits_without_reporting_gets_fatal_with_its_exit_status(
        server: ServerProcess):
    events, code = await submit_and_collect(server, "exit3", {})
    assert code == 1000
    assert events[-1]["type"] == "fatal"
    assert events[-1]["data"]["exit_status"] == 3
    record = httpx.get(f"{server.url}/api/jobs/{events[0]['job']}").json()
    assert (record["state"], record["exit_status"]) == ("failed", 3)


async def test_exit_0_without_completed_is_completed_by_the_launcher(server: ServerProcess):
    events, _ = await submit_and_collect(server, "silent_ok", {})
    assert events[-1]["type"] == "completed"
    assert events[-1]["data"] == {"exit_status": 0}


async def test_parameters_reach_the_job_and_shell_metacharacters_stay_data(
        server: ServerProcess, tmp_path: Path):
    marker = tmp_path / "pwned"
    word = f"$(touch {marker}); `touch {marker}` | & ; 'q' \"d\" a,b"
    events, _ = await submit_and_collect(server, "echo_param", {"word": word})
    assert events[-1]["type"] == "completed", events
    logs = [e["data"] for e in events if e["type"] == "log"]
    assert logs == [word]
    assert not marker.exists()


async def test_watch_with_after_replays_only_later_events_of_an_ended_job(
        server: ServerProcess):
    events, _ = await submit_and_collect(server, "tokens", {"text": "one two", "delay": 0})
    job_id = events[0]["job"]
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{job_id}?after=3") as socket:
        replay = [json.loads(frame) async for frame in socket]
        assert socket.close_code == 1000
    assert replay == events[3:]
    history = httpx.get(f"{server.url}/api/jobs/{job_id}/events", params={"after": 0}).json()
    assert history["events"] == events


async def test_two_watchers_see_the_same_live_events(server: ServerProcess):
    job = httpx.post(f"{server.url}/api/jobs",
                     json={"template": "tokens", "params": {"text": "a b c d e f",
                                                            "delay": 0.05}}).json()

    async def watch() -> list[dict[str, Any]]:
        async with websockets.connect(f"{server.ws_url}/ws/jobs/{job['id']}") as socket:
            return [json.loads(frame) async for frame in socket]

    first, second = await asyncio.gather(watch(), watch())
    assert first == second
    assert first[-1]["type"] == "completed"
    assert [e["seq"] for e in first] == list(range(1, len(first) + 1))


def test_a_curl_retry_of_the_same_event_is_not_doubled(server: ServerProcess):
    job = httpx.post(f"{server.url}/api/jobs", json={"template": "sleepy"}).json()
    token = job_token_for(server, job["id"])
    url = f"{server.url}/api/jobs/{job['id']}/events"
    wait_for_event(server, job["id"], "step")
    body = json.dumps({"type": "log", "data": "once", "id": "retry-key-1"})
    answers = [json.loads(subprocess.run(
        ["curl", "-fsS", "--retry", "3", "-H", f"Authorization: Bearer {token}",
         "-H", "Content-Type: application/json", "-d", body, url],
        capture_output=True, check=True, text=True).stdout) for _ in range(3)]
    assert answers[0]["duplicates"] == 0
    assert [a["seqs"] for a in answers] == [answers[0]["seqs"]] * 3
    assert [a["duplicates"] for a in answers[1:]] == [1, 1]
    logs = [e for e in httpx.get(url).json()["events"] if e["type"] == "log"]
    assert [e["data"] for e in logs] == ["once"]
    httpx.delete(f"{server.url}/api/jobs/{job['id']}")


def wait_for_state(server: ServerProcess, job_id: str, state: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/api/jobs/{job_id}").json()["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {state}")


def wait_for_event(server: ServerProcess, job_id: str, event_type: str,
                   timeout: float = 10) -> None:
    """Wait until the job has posted an event of ``event_type`` itself."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = httpx.get(f"{server.url}/api/jobs/{job_id}/events").json()["events"]
        if any(e["type"] == event_type for e in events):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never posted {event_type}")


async def test_cancel_kills_the_job_and_sends_cancelled(server: ServerProcess):
    async with websockets.connect(f"{server.ws_url}/ws/jobs") as socket:
        await socket.send(json.dumps({"template": "sleepy"}))
        seen = []
        async for frame in socket:
            seen.append(json.loads(frame))
            if seen[-1]["type"] == "step":
                job_id = seen[-1]["job"]
                answer = httpx.delete(f"{server.url}/api/jobs/{job_id}")
                assert answer.status_code == 200
                assert answer.json()["state"] == "cancelled"
        assert socket.close_code == 1000
    assert seen[-1]["type"] == "cancelled"
    again = httpx.delete(f"{server.url}/api/jobs/{job_id}")
    assert again.status_code == 409
    job_dir = server.state_dir / "jobs" / "local" / job_id
    assert not (job_dir / "token").exists()
    pid = int(seen[1]["data"].split(".")[0])
    deadline = time.monotonic() + 5
    while (job := find(pid)) is not None and job.running and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert job is None or not job.running


def test_the_job_spec_routes_answer_with_the_job_token(server: ServerProcess):
    job = httpx.post(f"{server.url}/api/jobs", json={
        "template": "sleepy", "inputs": ["https://example.org/a?x=1&y=2"]}).json()
    wait_for_state(server, job["id"], "running")
    headers = {"Authorization": f"Bearer {job_token_for(server, job['id'])}"}
    base = f"{server.url}/api/jobs/{job['id']}/spec"
    assert httpx.get(base, headers=headers).json()["inputs"] == [
        "https://example.org/a?x=1&y=2"]
    assert httpx.get(base + "/inputs", headers=headers).text == "https://example.org/a?x=1&y=2\n"
    assert httpx.get(base).status_code == 401
    assert httpx.get(base + "/params/nope", headers=headers).status_code == 404
    httpx.delete(f"{server.url}/api/jobs/{job['id']}")
    assert httpx.get(base, headers=headers).status_code == 409


def test_templates_and_job_listing(server: ServerProcess):
    names = [t["name"] for t in httpx.get(f"{server.url}/api/templates").json()["templates"]]
    assert {"tokens", "download"} <= set(names)
    job = httpx.post(f"{server.url}/api/jobs", json={"template": "sleepy"}).json()
    wait_for_state(server, job["id"], "running")
    running = httpx.get(f"{server.url}/api/jobs", params={"state": "running"}).json()["jobs"]
    assert [j["id"] for j in running] == [job["id"]]
    assert httpx.get(f"{server.url}/api/jobs", params={"state": "completed"}).json() == {
        "jobs": []}
    httpx.delete(f"{server.url}/api/jobs/{job['id']}")


def test_the_cli_submits_follows_and_exits_0_after_completed(server: ServerProcess):
    done = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "submit", "tokens", "-p", "text=hi there",
         "-p", "delay=0", "--follow", "--url", server.url],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "hi there\n" in done.stdout
    assert "completed" in done.stdout


def test_the_cli_tail_exits_1_after_fatal_and_jobs_lists_it(server: ServerProcess):
    job = httpx.post(f"{server.url}/api/jobs", json={"template": "exit3"}).json()
    tail = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "tail", job["id"], "--url", server.url,
         "--json"], capture_output=True, text=True, timeout=60)
    assert tail.returncode == 1
    lines = [json.loads(line) for line in tail.stdout.splitlines()]
    assert lines[-1]["type"] == "fatal"
    listing = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "jobs", "--url", server.url],
        capture_output=True, text=True, timeout=60, check=True)
    assert f"{job['id']}  failed" in listing.stdout


def test_the_cli_says_what_is_wrong_without_a_traceback(server: ServerProcess):
    unknown = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "tail", "j_01M87P14J6V8D2MYD25J6MJ0B2",
         "--url", server.url], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1
    assert "unknown job" in unknown.stderr and "Traceback" not in unknown.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "metis_stream.cli", "jobs", "--url", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1
    assert "cannot reach" in unreachable.stderr and "Traceback" not in unreachable.stderr


def sleepy_job_env(server: ServerProcess) -> tuple[str, dict[str, str]]:
    """A running job that reports nothing more, and the environment for metis-emit to
    report as that job."""
    job_id: str = httpx.post(f"{server.url}/api/jobs", json={"template": "sleepy"}).json()["id"]
    wait_for_state(server, job_id, "running")
    token_file = server.state_dir / "token-copy"
    token_file.write_text(job_token_for(server, job_id))
    return job_id, {"METIS_EVENTS_URL": f"{server.url}/api/jobs/{job_id}/events",
                    "METIS_TOKEN_FILE": str(token_file), "PATH": "/usr/bin:/bin"}


def test_an_element_token_posts_nothing_to_a_job_without_that_element(server: ServerProcess):
    # A token of the right form and MAC, for an element the job does not have (it is no
    # array): refused, and nothing appended.
    job_id, env = sleepy_job_env(server)
    secret = load_config(server.config_path).server.secret
    before = httpx.get(env["METIS_EVENTS_URL"]).json()["events"]
    forged = tokens.element_token(secret, job_id, 2)
    answer = httpx.post(env["METIS_EVENTS_URL"], json={"type": "step", "data": "forged"},
                        headers={"Authorization": f"Bearer {forged}"})
    assert answer.status_code == 403, answer.text
    assert f"job {job_id} has no array element 2" in answer.json()["error"]
    wrong_mac = httpx.post(env["METIS_EVENTS_URL"], json={"type": "step", "data": "forged"},
                           headers={"Authorization": "Bearer 2.AAAA"})
    assert wrong_mac.status_code == 401, wrong_mac.text
    assert httpx.get(env["METIS_EVENTS_URL"]).json()["events"] == before
    httpx.delete(f"{server.url}/api/jobs/{job_id}")


def test_metis_emit_pipe_streams_lines_live(server: ServerProcess):
    job_id, env = sleepy_job_env(server)
    pipe = subprocess.Popen([str(EMIT), "pipe", "log"], stdin=subprocess.PIPE, env=env)
    assert pipe.stdin is not None
    pipe.stdin.write(b"first line\n")
    pipe.stdin.flush()
    deadline = time.monotonic() + 10
    seen: list[Any] = []
    while time.monotonic() < deadline and "first line" not in seen:
        seen = [e["data"] for e in httpx.get(env["METIS_EVENTS_URL"]).json()["events"]
                if e["type"] == "log"]
        time.sleep(0.05)
    assert seen == ["first line"], "the first line must arrive before the pipe closes"
    pipe.stdin.write(b"second line\n")
    pipe.stdin.close()
    assert pipe.wait(20) == 0
    logged = [e["data"] for e in httpx.get(env["METIS_EVENTS_URL"]).json()["events"]
              if e["type"] == "log"]
    assert logged == ["first line", "second line"]
    httpx.delete(f"{server.url}/api/jobs/{job_id}")


def test_metis_emit_pipe_keeps_the_lines_after_invalid_utf8(server: ServerProcess):
    # The server refuses an event that is not UTF-8 (400): metis-emit must repair the line
    # (half of a euro sign, as a byte-level tokenizer may cut it), not end the pipe there.
    job_id, env = sleepy_job_env(server)
    done = subprocess.run([str(EMIT), "pipe", "log"], capture_output=True, env=env,
                          input=b"line 1\nhalf a euro: \xe2\x82\nline 3 \xe2\x82\xac\n",
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"metis-emit: replaced invalid UTF-8 in 1 line(s)\n"
    logged = [e["data"] for e in httpx.get(env["METIS_EVENTS_URL"]).json()["events"]
              if e["type"] == "log"]
    assert logged == ["line 1", "half a euro: \ufffd", "line 3 \u20ac"]
    httpx.delete(f"{server.url}/api/jobs/{job_id}")


def test_metis_emit_pipe_goes_on_past_the_servers_events_per_request(tmp_path: Path):
    # The server takes at most max_lines_per_request events in one request: a long pipe
    # spreads its lines over several requests instead of failing at the first line past it.
    server = ServerProcess(
        state_dir=tmp_path / "server", server_settings={"max_lines_per_request": 1500},
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + custom_templates(tmp_path / "scripts"))
    with running(server):
        job_id, env = sleepy_job_env(server)
        lines = [f"line {n}" for n in range(4_000)]
        done = subprocess.run([str(EMIT), "pipe", "log"], capture_output=True, env=env,
                              input="".join(line + "\n" for line in lines).encode(),
                              timeout=120)
        assert done.returncode == 0, done.stderr
        httpx.delete(f"{server.url}/api/jobs/{job_id}")
        logged: list[Any] = []
        after = 0
        while page := httpx.get(env["METIS_EVENTS_URL"], params={"after": after}).json()[
                "events"]:
            logged += [e["data"] for e in page if e["type"] == "log"]
            after = page[-1]["seq"]
        assert logged == lines


async def test_watch_tokens_never_reach_the_access_log(server: ServerProcess):
    job = httpx.post(f"{server.url}/api/jobs", json={"template": "tokens", "params": {
        "text": "a", "delay": 0}}).json()
    token = job["watch_token"]
    async with websockets.connect(f"{server.ws_url}/ws/jobs/{job['id']}?token={token}") as ws:
        assert [json.loads(frame) async for frame in ws][-1]["type"] == "completed"
    assert httpx.get(f"{server.url}/api/jobs/{job['id']}/events",
                     params={"after": 0, "token": token}).status_code == 200
    await asyncio.sleep(0.2)
    log = server.log()
    assert f"/ws/jobs/{job['id']}?token=REDACTED" in log
    assert "token=REDACTED" in log.split("/events?")[-1]
    assert token not in log


async def test_a_killed_sleep_stops_the_example_job_before_it_reports_success(
        server: ServerProcess):
    """A scheduler may signal the job's processes one by one: when only the `sleep`
    between two words dies, tokens.pbs must stop, not go on to post `completed`."""
    async with websockets.connect(f"{server.ws_url}/ws/jobs") as socket:
        await socket.send(json.dumps({"template": "tokens",
                                      "params": {"text": "one two three", "delay": 5}}))
        events = []
        async for frame in socket:
            events.append(json.loads(frame))
            if events[-1]["type"] == "progress":
                group = int(events[1]["data"].split(".")[0])
                sleeper = await wait_for_child(group, "sleep", argv="sleep 5")
                os.kill(sleeper, signal.SIGTERM)
    assert events[-1]["type"] == "fatal"
    assert events[-1]["data"]["exit_status"] == 143
    assert "completed" not in [e["type"] for e in events]


async def wait_for_child(group: int, name: str, timeout: float = 10,
                         argv: str | None = None) -> int:
    """The pid of the process called ``name`` in process group ``group`` (whose command
    line starts with ``argv``, when given: the launcher has sleeps of its own)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for process in process_group(group):
            if process.name == name and command_line(process.pid).startswith(argv or ""):
                return process.pid
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {name} in process group {group}")


async def test_metrics_count_what_this_process_did(server: ServerProcess):
    events, _ = await submit_and_collect(server, "tokens", {"text": "a b", "delay": 0})
    assert httpx.get(f"{server.url}/api/jobs/j_01M87P14J6V8D2MYD25J6MJ0B2").status_code == 404
    text = httpx.get(f"{server.url}/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
    by_job = sum(1 for e in events if e["type"] not in ("starting", "submitted")
                 and not (e["type"] == "running" and e["data"] == {"source": "scheduler"}))
    assert float(samples['metis_events_appended_total{by="job",path="http"}']) == by_job
    assert float(samples['metis_events_appended_total{by="server"}']) == 2
    assert float(samples["metis_jobs_created_total"]) == 1
    assert float(samples['metis_jobs_ended_total{type="completed"}']) == 1
    assert float(samples["metis_events_delivered_total"]) == len(events)
    assert float(samples['metis_http_errors_total{status="404"}']) == 1
    assert float(samples["metis_open_streams"]) == 0
    assert "# TYPE metis_events_appended_total counter" in text


def test_create_app_refuses_a_config_without_keys_unless_it_says_insecure_no_auth(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    config = load_config(None, {"METIS_STATE_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="refusing to serve without API keys"):
        create_app(config)
    create_app(replace(config, server=replace(config.server, api_keys=("k",))))
    assert "INSECURE" not in caplog.text
    create_app(replace(config, server=replace(config.server, insecure_no_auth=True)))
    assert "INSECURE: insecure_no_auth = true" in caplog.text


def test_without_keys_or_insecure_no_auth_nobody_is_a_client():
    """Even past create_app (an app assembled by hand): no keys is no client."""
    request = Request({"type": "http", "headers": [], "query_string": b""})
    assert auth.api_key(request, ServerConfig()) is None
    assert auth.api_key(request, ServerConfig(insecure_no_auth=True)) == keys.KEYLESS
    keyed = Request({"type": "http", "query_string": b"",
                     "headers": [(b"authorization", b"Bearer k")]})
    listed = auth.api_key(keyed, ServerConfig(api_keys=("k",)))
    assert listed is not None and listed.admin
    assert auth.api_key(request, ServerConfig(api_keys=("k",))) is None


def test_meta_serves_the_state_machine_even_without_a_key(tmp_path: Path):
    keyed = ServerProcess(state_dir=tmp_path / "keyed",
                          server_settings={"api_keys": [tokens.hash_api_key("a-key")]})
    keyed.start()
    try:
        assert httpx.get(f"{keyed.url}/api/templates").status_code == 401
        response = httpx.get(f"{keyed.url}/api/meta")
        assert response.status_code == 200
        assert response.json() == state_machine()
    finally:
        keyed.stop()


# The README's plain-curl example, as written

README = Path(__file__).parent.parent / "README.md"


def spy_curl(folder: Path) -> tuple[Path, Path]:
    """A folder with a curl that records its command line, then runs the real one; and
    the file it records in."""
    spy = folder / "bin"
    spy.mkdir()
    argv_log = folder / "curl-argv"
    real_curl = shutil.which("curl")
    assert real_curl is not None
    (spy / "curl").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" >> {argv_log}\nexec {real_curl} "$@"\n')
    (spy / "curl").chmod(stat.S_IRWXU)
    return spy, argv_log


def readme_curl_example() -> str:
    text = README.read_text()
    start = text.index("With nothing but `curl`:")
    return re.search(r"```sh\n(.*?)```", text[start:], re.S).group(1)  # type: ignore[union-attr]


def test_the_plain_curl_example_posts_its_event_without_the_token_on_a_command_line(
        server: ServerProcess, tmp_path: Path):
    job = RunningJob(server, "sleepy")
    try:
        token_file = tmp_path / "token"
        token_file.write_text(job.token)
        token_file.chmod(0o600)
        spy, argv_log = spy_curl(tmp_path)
        env = {"PATH": f"{spy}:{os.environ['PATH']}", "METIS_EVENTS_URL": job.url,
               "METIS_TOKEN_FILE": str(token_file)}
        done = subprocess.run(["sh", "-c", readme_curl_example()], env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        posted = [e for e in job.events() if e["type"] == "step"]
        assert posted[-1]["data"] == "Downloading input"
        assert argv_log.read_text(), "the example did not run curl"
        assert job.token not in argv_log.read_text()
    finally:
        job.end()


def readme_tour_api_helper() -> str:
    text = README.read_text()
    tour = text[text.index("## A five-minute tour"):text.index("### What a batch script does")]
    return re.search(r"^api\(\) \{.*\}$", tour, re.M).group(0)  # type: ignore[union-attr]


def test_the_tours_curl_helper_sends_the_demos_key_and_keeps_it_off_the_command_line(
        tmp_path: Path):
    demo = Demo(tmp_path / "state")
    try:
        spy, argv_log = spy_curl(tmp_path)
        script = f"{readme_tour_api_helper()}\napi {demo.url}/api/templates\n"
        env = {"PATH": f"{spy}:{os.environ['PATH']}", "METIS_API_KEY": demo.key}
        done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True,
                              timeout=30)
        assert done.returncode == 0, done.stderr
        assert {t["name"] for t in json.loads(done.stdout)["templates"]} >= {"tokens"}
        assert argv_log.read_text(), "the helper did not run curl"
        assert demo.key not in argv_log.read_text()
        refused = subprocess.run(["sh", "-c", script], env={**env, "METIS_API_KEY": "wrong"},
                                 capture_output=True, text=True, timeout=30)
        assert "API key" in json.loads(refused.stdout)["error"]
        demo.interrupt()
    finally:
        demo.stop()


def test_a_local_job_gets_nothing_of_the_servers_environment_beyond_the_allowlist(
        tmp_path: Path):
    secret, key = "secret-from-the-environment-" + "s" * 32, "plain-key-" + "k" * 32
    server = ServerProcess(
        state_dir=tmp_path / "server",
        server_settings={"api_keys": [tokens.hash_api_key(key)]},
        env={"METIS_SECRET": secret, "METIS_API_KEYS": key, "SERVER_ONLY": "canary",
             "LD_PRELOAD": "", "LC_TIME": "C"},
        extra_config=LOCAL_CLUSTER + script_templates(
            tmp_path / "scripts", {"print_env": 'env\n"$METIS_EMIT" completed\n'},
            {"print_env": 'params.word = { type = "str", default = "plain" }\n'}))
    server.start()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        job = httpx.post(f"{server.url}/api/jobs", headers=headers, timeout=10,
                         json={"template": "print_env"}).json()
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/api/jobs/{job['id']}", headers=headers,
                        timeout=10).json()["state"] != "completed":
            assert time.monotonic() < deadline, server.log()[-2000:]
            time.sleep(0.1)
        printed = (server.state_dir / "jobs" / "local" / job["id"] / "stdout").read_text()
    finally:
        server.stop()
    assert secret not in printed and key not in printed and "canary" not in printed
    environ = dict(line.split("=", 1) for line in printed.splitlines())
    server_own = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ"}
    the_jobs = {"WORD", "PBS_O_WORKDIR", "PBS_JOBNAME", "PWD"}  # PWD: set by sh
    # The launcher's: unbuffered Python, and stdbuf's line-buffered stdio (its LD_PRELOAD).
    the_launchers = {"PYTHONUNBUFFERED", "LD_PRELOAD", "_STDBUF_O"}
    assert {name for name in environ if not name.startswith(("LC_", "METIS_"))} <= \
        server_own | the_jobs | the_launchers, environ
    assert "stdbuf" in environ.get("LD_PRELOAD", "stdbuf")
    assert environ["LC_TIME"] == "C" and environ["WORD"] == "plain"
    assert {name for name in environ if name.startswith("METIS_")} == {
        "METIS_JOB_ID", "METIS_EVENTS_URL", "METIS_TOKEN_FILE", "METIS_SPEC_FILE", "METIS_EMIT",
        "METIS_JOB_DIR", "METIS_INPUTS_DIR", "METIS_TERMINAL_FILE", "METIS_DELIVERY"}
