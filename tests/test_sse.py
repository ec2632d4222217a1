"""Server-Sent Events (``GET /api/jobs/{id}/events`` with ``Accept: text/event-stream``)
against a real server: real ``curl -N``, httpx streaming, and two server processes on Redis.

Every event is ``id: <seq>`` and ``data: <the event's JSON>``; ``Last-Event-ID: N`` (or
``?after=N``) resumes after N; ``: keep-alive`` comments keep a silent stream open; the
response ends after the terminal event.

One test waits ~16 s for a keep-alive comment (the server sends one every
``SSE_KEEPALIVE`` = 15 s); its name ends in ``_waits_16s``. Deselect it with
``-k 'not waits_16s'`` for a quick run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream.events import TERMINAL_TYPES
from tests.support.processes import end_group
from tests.support.redis_server import RedisServer
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    ServerProcess,
    free_port,
    history,
    local_job_script,
    submit,
)

SSE = {"Accept": "text/event-stream"}
WORDS = [f"w{n}" for n in range(12)]
TEXT = " ".join(WORDS)
SLEEPY_SCRIPT = '#!/bin/sh\n"$METIS_EMIT" step "Sleeping"\nsleep 60\n"$METIS_EMIT" completed\n'


@dataclass
class Stream:
    """One SSE response, parsed: the events (id and data), and the comment lines."""

    ids: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def feed_block(self, block: str) -> None:
        """One SSE message: the lines up to a blank line."""
        event_id: int | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if line.startswith(":"):
                self.comments.append(line)
            elif line.startswith("id: "):
                event_id = int(line.removeprefix("id: "))
            elif line.startswith("data: "):
                data.append(line.removeprefix("data: "))
            elif line:
                self.other.append(line)
        if data:
            event = json.loads("\n".join(data))
            assert event_id is not None, f"data without an id: {block!r}"
            assert event_id == event["seq"], f"id: {event_id} on event {event}"
            self.ids.append(event_id)
            self.events.append(event)
        else:
            assert event_id is None, f"an id without data: {block!r}"


def parse(body: str) -> Stream:
    stream = Stream()
    assert body == "" or body.endswith("\n\n"), f"a message was cut: {body[-200:]!r}"
    for block in body.split("\n\n"):
        if block:
            stream.feed_block(block)
    return stream


def wait_for_end(server: ServerProcess, job_id: str, timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        events = history(server, job_id)
        if events and events[-1]["type"] in TERMINAL_TYPES:
            return events
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end in {timeout}s")


def wait_for_seq(server: ServerProcess, job_id: str, seq: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(history(server, job_id)) >= seq:
            return
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never reached seq {seq}")


def token_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"] for e in events if e["type"] == "token")


def curl_sse(url: str, tmp_path: Path, *headers: str, timeout: float = 30
             ) -> tuple[subprocess.CompletedProcess[str], str, float]:
    """``curl -sN`` with ``Accept: text/event-stream``: the result, the response headers and
    the time it took."""
    header_file = tmp_path / f"headers-{time.monotonic_ns()}.txt"
    args = ["curl", "-sS", "-N", "-H", "Accept: text/event-stream", "-D", str(header_file)]
    for header in headers:
        args += ["-H", header]
    started = time.monotonic()
    done = subprocess.run([*args, url], capture_output=True, text=True, timeout=timeout)
    return done, header_file.read_text(), time.monotonic() - started


def sse_with_httpx(url: str, headers: dict[str, str] | None = None, *, stop_after: int | None
                   = None, timeout: float = 30) -> Stream:
    """Read an SSE response with httpx; with ``stop_after``, drop the connection after that
    many events, as a network failure would."""
    stream = Stream()
    with httpx.stream("GET", url, headers={**SSE, **(headers or {})}, timeout=timeout
                      ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        buffer = ""
        for chunk in response.iter_text():
            buffer += chunk
            while "\n\n" in buffer:
                block, buffer = buffer.split("\n\n", 1)
                stream.feed_block(block)
                if stop_after is not None and len(stream.events) >= stop_after:
                    return stream  # leaving the block closes the connection mid-stream
        assert buffer == "", f"a message was cut: {buffer!r}"
    return stream


def assert_complete(events: list[dict[str, Any]], text: str = TEXT) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "starting"
    assert events[-1]["type"] == "completed"
    assert token_text(events) == text


# One server process, memory backend


def test_curl_receives_every_event_of_a_live_job_and_exits_0(live_server: ServerProcess,
                                                            tmp_path: Path):
    job_id = submit(live_server, text=TEXT, delay=0.08)
    assert httpx.get(f"{live_server.url}/api/jobs/{job_id}").json()["state"] not in (
        "completed", "failed", "cancelled")
    done, headers, took = curl_sse(f"{live_server.url}/api/jobs/{job_id}/events", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "content-type: text/event-stream" in headers.lower()
    assert "cache-control: no-cache" in headers.lower()
    stream = parse(done.stdout)
    assert stream.other == [], "only id: and data: lines, and comments"
    assert_complete(stream.events)
    assert stream.ids == [e["seq"] for e in stream.events]
    # Exactly what the log holds, byte for byte as JSON.
    assert stream.events == history(live_server, job_id)
    assert took > 0.08 * (len(WORDS) - 2), "curl must have streamed a live job"


def test_last_event_id_resumes_after_n_on_a_live_job(live_server: ServerProcess):
    job_id = submit(live_server, text=TEXT, delay=0.08)
    wait_for_seq(live_server, job_id, 4)
    stream = sse_with_httpx(f"{live_server.url}/api/jobs/{job_id}/events",
                            {"Last-Event-ID": "4"})
    full = history(live_server, job_id)
    assert_complete(full)
    assert stream.events == full[4:]
    assert stream.ids == list(range(5, len(full) + 1))


def test_after_query_resumes_after_n(live_server: ServerProcess):
    job_id = submit(live_server, text=TEXT, delay=0)
    full = wait_for_end(live_server, job_id)
    for after in (0, 1, 5, len(full) - 1):
        stream = sse_with_httpx(f"{live_server.url}/api/jobs/{job_id}/events?after={after}")
        assert stream.events == full[after:], after
        by_header = sse_with_httpx(f"{live_server.url}/api/jobs/{job_id}/events",
                                   {"Last-Event-ID": str(after)})
        assert by_header.events == full[after:], after


def test_last_event_id_of_a_reconnection_wins_over_the_after_of_the_url(
        live_server: ServerProcess):
    """A browser's EventSource reconnects to the same URL and adds Last-Event-ID: the
    header is the newer position and must win, or the client gets duplicates."""
    job_id = submit(live_server, text=TEXT, delay=0)
    full = wait_for_end(live_server, job_id)
    stream = sse_with_httpx(f"{live_server.url}/api/jobs/{job_id}/events?after=2",
                            {"Last-Event-ID": "6"})
    assert stream.events == full[6:]


def test_a_dropped_connection_resumed_with_last_event_id_misses_and_doubles_nothing(
        live_server: ServerProcess):
    job_id = submit(live_server, text=TEXT, delay=0.1)
    url = f"{live_server.url}/api/jobs/{job_id}/events"
    first = sse_with_httpx(url, stop_after=6)
    assert len(first.events) == 6
    assert first.events[-1]["type"] not in TERMINAL_TYPES, "the drop must be mid-stream"
    time.sleep(0.3)  # the job goes on while nobody listens
    rest = sse_with_httpx(url, {"Last-Event-ID": str(first.ids[-1])})
    combined = first.events + rest.events
    assert_complete(combined)
    assert combined == history(live_server, job_id)
    assert rest.ids[0] == first.ids[-1] + 1


def test_a_finished_job_is_replayed_and_the_response_ends(live_server: ServerProcess,
                                                          tmp_path: Path):
    job_id = submit(live_server, text=TEXT, delay=0)
    full = wait_for_end(live_server, job_id)
    done, _, took = curl_sse(f"{live_server.url}/api/jobs/{job_id}/events", tmp_path,
                             timeout=10)
    assert done.returncode == 0, done.stderr
    assert parse(done.stdout).events == full
    assert took < 5


def test_last_event_id_of_the_terminal_event_ends_at_once_with_nothing(
        live_server: ServerProcess, tmp_path: Path):
    job_id = submit(live_server, text=TEXT, delay=0)
    full = wait_for_end(live_server, job_id)
    done, headers, took = curl_sse(f"{live_server.url}/api/jobs/{job_id}/events", tmp_path,
                                   f"Last-Event-ID: {len(full)}", timeout=10)
    assert done.returncode == 0, done.stderr
    assert " 200" in headers.splitlines()[0]
    assert done.stdout == ""
    assert took < 3


def test_unknown_job_and_bad_last_event_id_are_refused_before_the_stream(
        live_server: ServerProcess):
    unknown = httpx.get(f"{live_server.url}/api/jobs/j_01M87P14J6V8D2MYD25J6MJ0B2/events",
                        headers=SSE, timeout=10)
    assert unknown.status_code == 404
    assert "error" in unknown.json()
    job_id = submit(live_server, text="x", delay=0)
    bad = httpx.get(f"{live_server.url}/api/jobs/{job_id}/events",
                    headers={**SSE, "Last-Event-ID": "seven"}, timeout=10)
    assert bad.status_code == 400
    assert "error" in bad.json()
    wait_for_end(live_server, job_id)  # before its server stops: it would retry for minutes


def test_an_open_sse_stream_does_not_hold_up_a_server_shutdown(tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "server")
    server.start()
    job_id = submit(server, text="a b c d e f", delay=5)
    wait_for_seq(server, job_id, 3)
    script = local_job_script(server.url, job_id)
    try:
        with httpx.stream("GET", f"{server.url}/api/jobs/{job_id}/events", headers=SSE,
                          timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            server.process.wait(6)  # the websockets are closed with 1012 at once
    finally:
        server.stop()  # SIGKILL after 10 s
        end_group(script)  # the job outlives its server: end it here


@pytest.fixture
def sleepy_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with a ``sleepy`` template: one step, then a minute of silence."""
    script = tmp_path / "sleepy.sh"
    script.write_text(SLEEPY_SCRIPT)
    server = ServerProcess(
        state_dir=tmp_path / "server",
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES
        + f'\n[templates.sleepy]\ncluster = "local"\nscript = "{script}"\n')
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_keep_alive_comment_when_the_job_is_silent_waits_16s(sleepy_server: ServerProcess):
    """SLOW on purpose: the server sends ``: keep-alive`` after 15 s without an event."""
    server = sleepy_server
    job_id = submit(server, "sleepy")
    url = f"{server.url}/api/jobs/{job_id}/events"
    lines: list[tuple[float, str]] = []
    with httpx.stream("GET", url, headers=SSE, timeout=40) as response:
        assert response.status_code == 200
        lines_of = response.iter_lines()
        for line in lines_of:
            lines.append((time.monotonic(), line))
            if line == ": keep-alive":
                break
        else:
            raise AssertionError(f"the stream ended without a keep-alive: {lines}")
        step_at = next(at for at, line in lines if line.startswith("data: ")
                       and json.loads(line[6:])["type"] == "step")
        silence = lines[-1][0] - step_at
        assert 13 < silence < 20, silence
        # The stream is still open and still delivers: cancel the job, see `cancelled`, end.
        assert httpx.delete(f"{server.url}/api/jobs/{job_id}", timeout=10).status_code == 200
        rest = list(lines_of)
    data = [json.loads(line[6:]) for line in rest if line.startswith("data: ")]
    assert [e["type"] for e in data] == ["cancelled"]
    assert data[0]["seq"] == history(server, job_id)[-1]["seq"]


# Two server processes on one redis-server


@pytest.mark.redis
def test_sse_on_one_process_streams_events_posted_to_another(redis_server: RedisServer,
                                                            tmp_path: Path):
    """Jobs submitted to A post their events to B; A's SSE clients see them all, live."""
    secret = "shared-by-both-processes-of-this-test"
    b_port, a_port = free_port(), free_port()
    b = ServerProcess(state_dir=tmp_path / "b", port=b_port, server_settings={
        "redis_url": redis_server.url, "secret": secret})
    a = ServerProcess(state_dir=tmp_path / "a", port=a_port, server_settings={
        "redis_url": redis_server.url, "secret": secret, "public_url": b.url})
    b.start()
    a.start()
    try:
        words = [f"r{n}" for n in range(20)]
        job_id = submit(a, text=" ".join(words), delay=0.05)
        stream = sse_with_httpx(f"{a.url}/api/jobs/{job_id}/events")
        assert_complete(stream.events, " ".join(words))
        assert stream.events == history(b, job_id)
        # And the other way round: SSE on B, after a Last-Event-ID.
        again = sse_with_httpx(f"{b.url}/api/jobs/{job_id}/events", {"Last-Event-ID": "3"})
        assert again.events == stream.events[3:]
    finally:
        a.stop()
        b.stop()
    # Access lines go to the servers' stdout, which is block-buffered: read after they exit.
    posts = [line for line in b.log().splitlines() if f"POST /api/jobs/{job_id}/events" in line]
    assert len(posts) >= len(words), "the job must have posted to the other process"
    assert f"POST /api/jobs/{job_id}/events" not in a.log()
