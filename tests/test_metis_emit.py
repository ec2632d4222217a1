"""The metis-emit helper's wire behaviour, and the two example batch scripts.

These run the REAL shell script with the real ``curl`` against a small stub of
the events route (a stdlib HTTP server on 127.0.0.1), under ``dash`` (Debian's
/bin/sh) and, for the escaping, every POSIX shell found on the machine. The
end-to-end test against the real server lives elsewhere.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from metis_stream.errors import EventTooLarge, InvalidEvent
from metis_stream.events import parse_event_json

JOBSCRIPTS = Path(__file__).resolve().parents[1] / "metis_stream" / "jobscripts"
SCRIPT = JOBSCRIPTS / "metis-emit"
JOB = "j_test01"
ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}\Z")

pytestmark = pytest.mark.skipif(
    shutil.which("curl") is None or shutil.which("dash") is None,
    reason="needs curl and dash",
)


def _shells() -> list[list[str]]:
    shells = []
    for name in ("dash", "bash"):
        if shutil.which(name):
            shells.append([name] if name != "bash" else [name, "--posix"])
    if shutil.which("busybox"):
        shells.append(["busybox", "sh"])
    return shells


SHELLS = _shells()


# ---------------------------------------------------------------------------
# The stub server


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    chunked: bool = False
    status: int = 0


@dataclass
class Stub:
    token: str
    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)
    fail: list[str] = field(default_factory=list)
    """Actions for the next event POSTs, one per attempt: "503", "drop", "409", "400"."""
    drop_stream_after: int | None = None
    """Drop the next streamed request's connection after this many lines."""
    ended: bool = False
    params: dict[str, str] = field(default_factory=dict)
    inputs: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)
    spool: Path | None = None
    """The job's spool: each event that arrives is checked to be in it already."""
    not_yet_spooled: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    @property
    def events_url(self) -> str:
        return f"{self.url}/api/jobs/{JOB}/events"

    def posts(self) -> list[Recorded]:
        return [r for r in self.requests if r.method == "POST"]

    def append(self, raw_lines: list[bytes]) -> tuple[list[int], int]:
        """Validate every line first (all or nothing), then append; dedupe by id."""
        parsed = [parse_event_json(line) for line in raw_lines]
        seqs, duplicates = [], 0
        if self.spool is not None:
            spooled = {json.loads(line)["id"] for line in whole_lines(self.spool)}
            self.not_yet_spooled += [str(e.id) for e in parsed if e.id not in spooled]
        with self.cond:
            for event in parsed:
                if event.id is not None and event.id in self.ids:
                    seqs.append(self.ids[event.id])
                    duplicates += 1
                    continue
                seq = len(self.events) + 1
                self.events.append({"seq": seq, "type": event.type, "data": event.data,
                                    "id": event.id})
                if event.id is not None:
                    self.ids[event.id] = seq
                seqs.append(seq)
                if event.type in ("completed", "fatal"):
                    self.ended = True
            self.cond.notify_all()
        return seqs, duplicates

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]


def make_handler(stub: Stub) -> type[BaseHTTPRequestHandler]:
    prefix = f"/api/jobs/{JOB}"

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _record(self) -> Recorded:
            rec = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
            with stub.cond:
                stub.requests.append(rec)
            return rec

        def _send(self, rec: Recorded, status: int, body: bytes,
                  ctype: str = "application/json") -> None:
            rec.status = status
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, rec: Recorded, status: int, message: str) -> None:
            self._send(rec, status, json.dumps({"error": message}).encode())

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

        def _authorized(self) -> bool:
            return self.headers.get("Authorization") == f"Bearer {stub.token}"

        def do_GET(self) -> None:
            rec = self._record()
            if self.path.startswith("/files/"):
                name = self.path.removeprefix("/files/")
                if name in stub.files:
                    self._send(rec, 200, stub.files[name], "application/octet-stream")
                else:
                    self._send(rec, 404, b"not found", "text/plain")
                return
            if not self._authorized():
                self._error(rec, 401, "bad or missing token")
                return
            if self.path == f"{prefix}/spec":
                spec = {"job": JOB, "template": "t", "params": stub.params, "inputs": stub.inputs}
                self._send(rec, 200, json.dumps(spec).encode())
            elif self.path.startswith(f"{prefix}/spec/params/"):
                name = self.path.removeprefix(f"{prefix}/spec/params/")
                if name in stub.params:
                    self._send(rec, 200, stub.params[name].encode(), "text/plain; charset=utf-8")
                else:
                    self._error(rec, 404, f"no parameter {name!r}")
            elif self.path == f"{prefix}/spec/inputs":
                text = "".join(u + "\n" for u in stub.inputs)
                self._send(rec, 200, text.encode(), "text/plain; charset=utf-8")
            else:
                self._error(rec, 404, "not found")

        def do_POST(self) -> None:
            rec = self._record()
            rec.chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
            if self.path != f"{prefix}/events":
                self._read_all(rec)
                self._error(rec, 404, "unknown job")
                return
            with stub.cond:
                action = stub.fail.pop(0) if stub.fail else None
            if rec.chunked and action is None:
                self._stream(rec)
                return
            self._read_all(rec)
            if action == "drop":
                self._drop()
                return
            if action == "503":
                self._error(rec, 503, "backend unavailable")
                return
            if action == "400":
                self._error(rec, 400, "not valid JSON: stub says no")
                return
            if not self._authorized():
                self._error(rec, 401, "bad or missing token")
                return
            if action == "409" or stub.ended:
                self._error(rec, 409, "job j_test01 has already ended")
                return
            ctype = self.headers.get("Content-Type", "")
            try:
                if ctype.startswith("application/json"):
                    seqs, dups = stub.append([rec.body])
                elif ctype.startswith("application/x-ndjson"):
                    lines = [ln for ln in rec.body.split(b"\n") if ln.strip()]
                    seqs, dups = stub.append(lines)
                else:
                    self._error(rec, 415, f"unsupported content type {ctype!r}")
                    return
            except EventTooLarge as exc:
                self._error(rec, 413, str(exc))
                return
            except InvalidEvent as exc:
                self._error(rec, 422, str(exc))
                return
            self._send(rec, 200, json.dumps({"seqs": seqs, "duplicates": dups}).encode())

        def _read_all(self, rec: Recorded) -> None:
            if rec.chunked:
                for chunk in self._chunks():
                    rec.body += chunk
            else:
                rec.body = self.rfile.read(int(self.headers.get("Content-Length", "0")))

        def _chunks(self) -> Iterator[bytes]:
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                data = self.rfile.read(size)
                self.rfile.readline()
                yield data

        def _stream(self, rec: Recorded) -> None:
            """Append each line as it arrives (as the real route does)."""
            if not self._authorized():
                self._read_all(rec)
                self._error(rec, 401, "bad or missing token")
                return
            buffer = b""
            seqs: list[int] = []
            dups = 0
            count = 0
            for chunk in self._chunks():
                rec.body += chunk
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if not line.strip():
                        continue
                    if stub.ended:
                        self._error(rec, 409, "job j_test01 has already ended")
                        self._drop()
                        return
                    try:
                        new, dup = stub.append([line])
                    except InvalidEvent as exc:
                        self._error(rec, 422, str(exc))
                        self._drop()
                        return
                    seqs += new
                    dups += dup
                    count += 1
                    if stub.drop_stream_after is not None and count >= stub.drop_stream_after:
                        stub.drop_stream_after = None
                        self._drop()
                        return
            if buffer.strip():
                new, dup = stub.append([buffer])
                seqs += new
                dups += dup
            self._send(rec, 200, json.dumps({"seqs": seqs, "duplicates": dups}).encode())

    return Handler


@pytest.fixture
def stub() -> Iterator[Stub]:
    state = Stub(token="mtk_" + secrets.token_urlsafe(24))
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def env(stub: Stub, tmp_path: Path) -> dict[str, str]:
    token_file = tmp_path / "token"
    token_file.write_text(stub.token + "\n")
    token_file.chmod(0o600)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "TMPDIR": str(tmp),
        "NO_PROXY": "*",
        "METIS_JOB_ID": JOB,
        "METIS_EVENTS_URL": stub.events_url,
        "METIS_TOKEN_FILE": str(token_file),
        "METIS_EMIT": str(SCRIPT),
        "METIS_EMIT_RETRY_DELAY": "1",
    }


def emit(env: dict[str, str], *args: str, shell: list[str] | None = None,
         stdin: bytes | None = None, extra: dict[str, str] | None = None,
         timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    cmd = [*(shell or ["dash"]), str(SCRIPT), *args]
    # umask 022, as a login shell has: the spool must be 0600 all the same.
    return subprocess.run(cmd, input=stdin if stdin is not None else b"", capture_output=True,
                          env={**env, **(extra or {})}, timeout=timeout, check=False,
                          umask=0o022)


def only_event(stub: Stub) -> dict[str, Any]:
    posts = stub.posts()
    assert len(posts) == 1, posts
    post = posts[0]
    assert post.path == f"/api/jobs/{JOB}/events"
    assert post.headers["authorization"] == f"Bearer {stub.token}"
    assert post.headers["content-type"] == "application/json"
    body = json.loads(post.body)
    assert isinstance(body, dict)
    assert ID_RE.match(body["id"]), body
    return body


# ---------------------------------------------------------------------------
# One event a call

NASTY_TEXTS = [
    "Loading model",
    "   leading spaces and trailing  ",
    'quote " backslash \\ slash / \\n not a newline \\u0041',
    "tab\there\nnewline\r\ncrlf\rcr",
    "".join(chr(c) for c in range(1, 32)) + "\x7f",
    "unicode: é € ą ň Ё 中文 🎉 \u2028 \u00a0",
    "trailing newlines\n\n",
    "\nleading newline",
    "-n -e --help %s %d %b \\c $HOME `id` $(id) * ? [a] ~ ; & | > <",
    "",
    "x" * 700 + '"\\\t\n\x01é' * 50,  # long: the awk path
]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_text_events_carry_the_text_exactly(stub: Stub, env: dict[str, str],
                                            shell: list[str]) -> None:
    for i, text in enumerate(NASTY_TEXTS):
        kind = ("step", "token", "log")[i % 3]
        stub.requests.clear()
        done = emit(env, kind, text, shell=shell)
        assert done.returncode == 0, done.stderr
        assert done.stdout == b""
        body = only_event(stub)
        assert set(body) == {"type", "data", "id"}
        assert body["type"] == kind
        assert body["data"] == text, (text, body)
    assert [e["data"] for e in stub.events] == NASTY_TEXTS


def test_quote_prints_a_json_string(env: dict[str, str]) -> None:
    for text in NASTY_TEXTS:
        done = emit(env, "quote", text)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == text


def test_event_of_64_kib_goes_through(stub: Stub, env: dict[str, str]) -> None:
    text = ('ab"\\\té' * 9000)[: 60 * 1024 // 2]
    done = emit(env, "token", text)
    assert done.returncode == 0, done.stderr
    assert only_event(stub)["data"] == text


def test_progress(stub: Stub, env: dict[str, str]) -> None:
    cases = [
        (("3", "10"), {"current": 3, "total": 10}),
        (("0", "1", 'label "x"\t'), {"current": 0, "total": 1, "label": 'label "x"\t'}),
        (("-1.5e3", "2.25", ""), {"current": -1500.0, "total": 2.25, "label": ""}),
    ]
    for args, data in cases:
        stub.requests.clear()
        done = emit(env, "progress", *args)
        assert done.returncode == 0, done.stderr
        body = only_event(stub)
        assert body["type"] == "progress"
        assert body["data"] == data
    for bad in (("x", "1"), ("01", "2"), ("1.", "2"), ("1", ""), ("1", "2e"), ("1",)):
        done = emit(env, "progress", *bad)
        assert done.returncode == 2, (bad, done)
    assert len(stub.posts()) == 1


def test_raw_json_events(stub: Stub, env: dict[str, str]) -> None:
    payload = {"text": 'a "b"\n', "n": [1, 2.5, None, True], "é": {}}
    pretty = json.dumps(payload, indent=2, ensure_ascii=False)
    cases: list[tuple[tuple[str, ...], str, Any]] = [
        (("result", pretty), "result", payload),
        (("result", '"just a string"'), "result", "just a string"),
        (("event", "custom.thing-1", '{"k": [1]}'), "custom.thing-1", {"k": [1]}),
        (("event", "ping"), "ping", None),
        (("completed", json.dumps(payload)), "completed", payload),
    ]
    for args, kind, data in cases:
        stub.requests.clear()
        stub.ended = False
        done = emit(env, *args)
        assert done.returncode == 0, done.stderr
        body = only_event(stub)
        assert body["type"] == kind
        assert body.get("data") == data


def test_completed_without_data_and_fatal(stub: Stub, env: dict[str, str]) -> None:
    done = emit(env, "completed")
    assert done.returncode == 0, done.stderr
    body = only_event(stub)
    assert body["type"] == "completed"
    assert body.get("data") is None
    stub.requests.clear()
    stub.ended = False
    message = 'download of "x" failed\n(curl exit 22)'
    done = emit(env, "fatal", message)
    assert done.returncode == 0, done.stderr
    body = only_event(stub)
    assert body["type"] == "fatal"
    assert body["data"] == {"error": message}


def test_ids_are_unique_and_can_be_given(stub: Stub, env: dict[str, str]) -> None:
    for _ in range(5):
        assert emit(env, "log", "same text").returncode == 0
    ids = [json.loads(r.body)["id"] for r in stub.posts()]
    assert len(set(ids)) == 5
    assert all(ID_RE.match(i) for i in ids)
    assert emit(env, "--id", "my-key:1", "log", "x").returncode == 0
    assert emit(env, "--id", "my-key:1", "log", "x").returncode == 0
    assert json.loads(stub.posts()[-1].body)["id"] == "my-key:1"
    assert [e["data"] for e in stub.events] == ["same text"] * 5 + ["x"]
    assert emit(env, "--id", "bad id", "log", "x").returncode == 2


def test_token_and_data_never_on_a_command_line(stub: Stub, env: dict[str, str],
                                               tmp_path: Path) -> None:
    real_curl = shutil.which("curl")
    assert real_curl
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "argv.log"
    wrapper = bindir / "curl"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$0" "$@" >> "{log}"\nexec "{real_curl}" "$@"\n')
    wrapper.chmod(0o755)
    env = {**env, "PATH": f"{bindir}{os.pathsep}{env['PATH']}"}
    secret_text = "private words of the job"
    assert emit(env, "token", secret_text).returncode == 0
    assert emit(env, "pipe", "token", stdin=f"{secret_text}\n".encode()).returncode == 0
    stub.params["p"] = "value"
    assert emit(env, "param", "p").returncode == 0
    argv = log.read_text()
    assert argv.count(str(wrapper)) >= 3
    assert stub.token not in argv
    assert secret_text not in argv
    assert [e["data"] for e in stub.events] == [secret_text, secret_text]
    # Nothing is left behind in TMPDIR (no copy of the token, no copy of the lines).
    assert list(Path(env["TMPDIR"]).iterdir()) == []


# ---------------------------------------------------------------------------
# Retries and errors


@pytest.mark.parametrize("failure", ["503", "drop"])
def test_retries_reuse_the_idempotency_id(stub: Stub, env: dict[str, str], failure: str) -> None:
    stub.fail = [failure, failure]
    done = emit(env, "token", " world")
    assert done.returncode == 0, done.stderr
    posts = stub.posts()
    assert len(posts) == 3
    assert posts[0].body == posts[1].body == posts[2].body
    assert [e["data"] for e in stub.events] == [" world"]


def fake_curl(tmp_path: Path, version: str) -> Path:
    """A directory with a `curl` that claims VERSION and runs the real curl."""
    real_curl = shutil.which("curl")
    assert real_curl
    bindir = tmp_path / f"curl-{version}"
    bindir.mkdir()
    wrapper = bindir / "curl"
    wrapper.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "curl {version} (x86_64-pc-linux-gnu)"; exit 0; fi\n'
        f'for a in "$@"; do echo "$a"; done >> "{bindir}/argv.log"\n'
        f'exec "{real_curl}" "$@"\n'
    )
    wrapper.chmod(0o755)
    return bindir


@pytest.mark.parametrize("version", ["7.29.0", "7.68.0"])
def test_older_curl_still_retries_a_dropped_connection(stub: Stub, env: dict[str, str],
                                                       tmp_path: Path, version: str) -> None:
    bindir = fake_curl(tmp_path, version)
    stub.fail = ["drop", "503"]
    done = emit(env, "token", "x", extra={"PATH": f"{bindir}{os.pathsep}{env['PATH']}"})
    assert done.returncode == 0, done.stderr
    posts = stub.posts()
    assert len(posts) == 3
    assert posts[0].body == posts[1].body == posts[2].body
    assert [e["data"] for e in stub.events] == ["x"]
    argv = (bindir / "argv.log").read_text().splitlines()
    assert "--retry-all-errors" not in argv
    assert ("--retry-connrefused" in argv) == (version == "7.68.0")


def test_duplicate_delivery_is_not_appended_twice(stub: Stub, env: dict[str, str]) -> None:
    # The server appended the event but the answer was lost: the retry is a duplicate.
    assert emit(env, "--id", "k1", "step", "once").returncode == 0
    assert emit(env, "--id", "k1", "step", "once").returncode == 0
    assert len(stub.events) == 1


def test_gives_up_after_the_retries(stub: Stub, env: dict[str, str]) -> None:
    stub.fail = ["503"] * 10
    done = emit(env, "step", "x", extra={"METIS_EMIT_RETRIES": "1"})
    assert done.returncode == 4
    assert b"backend unavailable" in done.stderr
    assert len(stub.posts()) == 2


def test_unreachable_server(env: dict[str, str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = emit(env, "step", "x", extra={"METIS_EVENTS_URL": f"http://127.0.0.1:{port}/events",
                                         "METIS_EMIT_RETRIES": "0"})
    assert done.returncode == 4
    assert b"curl" in done.stderr


def test_rejections(stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    stub.fail = ["409"]
    done = emit(env, "step", "late")
    assert done.returncode == 5
    assert b"already ended" in done.stderr
    stub.fail = ["400"]
    done = emit(env, "step", "x")
    assert done.returncode == 1
    assert b"stub says no" in done.stderr
    done = emit(env, "result", "{not json")
    assert done.returncode == 1
    assert b"not valid JSON" in done.stderr
    assert len(stub.posts()) == 3  # a 4xx is never retried
    bad_token = tmp_path / "bad-token"
    bad_token.write_text("wrong")
    done = emit(env, "step", "x", extra={"METIS_TOKEN_FILE": str(bad_token)})
    assert done.returncode == 6
    assert b"bad or missing token" in done.stderr
    done = emit(env, "step", "x", extra={"METIS_EVENTS_URL": f"{stub.url}/api/jobs/nope/events"})
    assert done.returncode == 1
    assert b"unknown job" in done.stderr
    assert stub.events == []
    assert stub.token.encode() not in done.stderr + done.stdout


def test_usage_and_environment_errors(stub: Stub, env: dict[str, str]) -> None:
    done = emit(env, "--help")
    assert done.returncode == 0
    assert b"Usage: metis-emit" in done.stdout
    for args in [(), ("nope",), ("step",), ("step", "a", "b"), ("event", "Bad"),
                 ("event", "starting"), ("pipe", "9x"), ("result",), ("param", "a/b"),
                 ("--bogus", "step", "x")]:
        done = emit(env, *args)
        assert done.returncode == 2, args
        assert done.stderr, args
    for missing in ("METIS_EVENTS_URL", "METIS_TOKEN_FILE"):
        partial = {k: v for k, v in env.items() if k != missing}
        done = emit(partial, "step", "x")
        assert done.returncode == 3
        assert missing.encode() in done.stderr
    done = emit(env, "step", "x", extra={"METIS_TOKEN_FILE": "/nonexistent/token"})
    assert done.returncode == 3
    assert stub.requests == []


# ---------------------------------------------------------------------------
# pipe


def finish(proc: subprocess.Popen[bytes], timeout: float = 60) -> tuple[bytes, bytes]:
    """Close the process's stdin and wait for it; return its stdout and stderr."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.close()
    proc.wait(timeout)
    return proc.stdout.read(), proc.stderr.read()


def test_pipe_streams_lines_live_over_one_request(stub: Stub, env: dict[str, str]) -> None:
    lines = ["Hello", " world", "", '  "quoted" \\ and\ttab', "é€ 中文 🎉", "last, no newline"]
    with subprocess.Popen(["dash", str(SCRIPT), "pipe", "token"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdin is not None
        try:
            proc.stdin.write((lines[0] + "\n").encode())
            proc.stdin.flush()
            # The server has the first line while stdin is still open.
            assert stub.wait_for(lambda: len(stub.events) == 1), "first line not seen live"
            proc.stdin.write((lines[1] + "\n").encode())
            proc.stdin.flush()
            assert stub.wait_for(lambda: len(stub.events) == 2), "second line not seen live"
            proc.stdin.write("".join(x + "\n" for x in lines[2:-1]).encode()
                             + lines[-1].encode())
            out, err = finish(proc)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert out == b""
    posts = stub.posts()
    assert len(posts) == 1
    post = posts[0]
    assert post.chunked
    assert post.headers["content-type"] == "application/x-ndjson"
    assert post.headers["authorization"] == f"Bearer {stub.token}"
    assert [e["type"] for e in stub.events] == ["token"] * len(lines)
    assert [e["data"] for e in stub.events] == lines
    ids = [e["id"] for e in stub.events]
    assert len(set(ids)) == len(ids)
    assert all(ID_RE.match(i) for i in ids)
    # Without --id, two pipes never share ids.
    assert emit(env, "pipe", "log", stdin=b"a\nb\n").returncode == 0
    assert len({e["id"] for e in stub.events}) == len(lines) + 2


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_pipe_in_every_shell(stub: Stub, env: dict[str, str], shell: list[str]) -> None:
    lines = ["a", ' "b" ', "\tc\\", "é 🎉", ""]
    done = emit(env, "pipe", "token", shell=shell,
                stdin="".join(x + "\n" for x in lines).encode())
    assert done.returncode == 0, done.stderr
    assert [e["data"] for e in stub.events] == lines
    assert len(stub.posts()) == 1


def test_pipe_of_nothing_and_of_many_lines(stub: Stub, env: dict[str, str]) -> None:
    done = emit(env, "pipe", "log", stdin=b"")
    assert done.returncode == 0, done.stderr
    assert stub.events == []
    many = [f"line {i} \"q\" \\ \t" for i in range(500)]
    done = emit(env, "pipe", "log", stdin="".join(x + "\n" for x in many).encode())
    assert done.returncode == 0, done.stderr
    assert [e["data"] for e in stub.events] == many


def test_pipe_recovers_from_a_dropped_stream(stub: Stub, env: dict[str, str]) -> None:
    stub.drop_stream_after = 2
    lines = [f"word {i}" for i in range(6)]
    with subprocess.Popen(["dash", str(SCRIPT), "pipe", "token"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdin is not None
        try:
            for line in lines:
                proc.stdin.write((line + "\n").encode())
                proc.stdin.flush()
                time.sleep(0.2)
            _, err = finish(proc)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    # Every line exactly once, in order, although some were sent twice.
    assert [e["data"] for e in stub.events] == lines
    posts = stub.posts()
    # The broken stream, the resend of what it had carried, a new stream.
    assert [p.chunked for p in posts] == [True, False, True], posts
    resent = [json.loads(line)["data"] for line in posts[1].body.splitlines()]
    assert resent[:2] == lines[:2]


# Bytes that are not UTF-8 (half of a character from a byte-level tokenizer, overlong
# forms, surrogates, beyond U+10FFFF, stray bytes) and valid characters beside them; each
# line must arrive as Python's decode(errors="replace") reads it: one U+FFFD for each
# maximal ill-formed part, as Unicode recommends.
NOT_UTF8 = [
    b"half of a euro: \xe2\x82",
    b"\xe2\x82x then ASCII",
    b"\x80 lone continuation \xbf",
    b"overlong \xc0\xaf \xe0\x80\xaf \xf0\x80\x80\xaf",
    b"surrogate \xed\xa0\x80 and past U+10FFFF \xf4\x90\x80\x80",
    b"never a lead: \xf5\x80 \xff\xfe \xc1\xbf",
    b"cut emoji \xf0\x9f\x8e and a whole one \xf0\x9f\x8e\x89",
    b"\xe1\x80\xe1\x80\x80\xf1\x80\x80\xf1",
    b'escapes after: \xe2\x82"\\\t\x01',
    b"valid: \xc3\xa9 \xe2\x82\xac \xed\x9f\xbf \xf4\x8f\xbf\xbf \xc3",
]


def replaced(line: bytes) -> str:
    return line.decode("utf-8", errors="replace")


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_pipe_replaces_invalid_utf8_and_keeps_every_following_line(
        stub: Stub, env: dict[str, str], shell: list[str]) -> None:
    lines = [b"line 1", b"half a euro: \xe2\x82", b"line 3 \xe2\x82\xac"]
    done = emit(env, "pipe", "token", shell=shell, stdin=b"".join(x + b"\n" for x in lines))
    assert done.returncode == 0, done.stderr
    assert [e["data"] for e in stub.events] == ["line 1", "half a euro: \ufffd", "line 3 \u20ac"]
    assert done.stderr == b"metis-emit: replaced invalid UTF-8 in 1 line(s)\n"


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_pipe_replaces_each_ill_formed_part_as_python_does(
        stub: Stub, env: dict[str, str], shell: list[str]) -> None:
    # Short lines take the shell's path, long ones awk's.
    lines = NOT_UTF8 + [b"x" * 600 + line * 3 for line in NOT_UTF8] + [b"fine"]
    done = emit(env, "pipe", "log", shell=shell, stdin=b"".join(x + b"\n" for x in lines))
    assert done.returncode == 0, done.stderr
    assert [e["data"] for e in stub.events] == [replaced(line) for line in lines]
    bad = sum("\ufffd" in replaced(line) for line in lines)
    assert done.stderr == f"metis-emit: replaced invalid UTF-8 in {bad} line(s)\n".encode()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_text_events_replace_invalid_utf8_and_say_so(
        stub: Stub, env: dict[str, str], shell: list[str]) -> None:
    texts = [NOT_UTF8[0], NOT_UTF8[4], b"y" * 700 + NOT_UTF8[6]]
    for text in texts:
        stub.requests.clear()
        done = subprocess.run([*shell, str(SCRIPT), "log", text], capture_output=True,
                              env=env, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        assert only_event(stub)["data"] == replaced(text)
        assert done.stderr == b"metis-emit: replaced invalid UTF-8 in the text\n"
    quoted = subprocess.run([*shell, str(SCRIPT), "quote", NOT_UTF8[1]], capture_output=True,
                            env=env, timeout=60, check=False)
    assert quoted.returncode == 0, quoted.stderr
    assert json.loads(quoted.stdout) == replaced(NOT_UTF8[1])
    fatal = subprocess.run([*shell, str(SCRIPT), "fatal", NOT_UTF8[2]], capture_output=True,
                           env=env, timeout=60, check=False)
    assert fatal.returncode == 0, fatal.stderr
    assert stub.events[-1]["data"] == {"error": replaced(NOT_UTF8[2])}


def test_valid_utf8_gets_no_warning(stub: Stub, env: dict[str, str]) -> None:
    text = "é € 中文 🎉 \U0010ffff \ud7ff".encode()
    done = emit(env, "pipe", "token", stdin=text + b"\n" + b"z" * 600 + text + b"\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr == b""
    assert [e["data"] for e in stub.events] == [text.decode(), "z" * 600 + text.decode()]


def test_pipe_stops_when_the_job_has_ended(stub: Stub, env: dict[str, str]) -> None:
    stub.ended = True
    done = emit(env, "pipe", "log", stdin=b"one\ntwo\n")
    assert done.returncode == 5, done.stderr
    assert b"already ended" in done.stderr


# ---------------------------------------------------------------------------
# Media: chunk and pipe-chunks (docs/media.md)


def media(stub: Stub, stream: str | None = None) -> list[tuple[str, int, str, bytes]]:
    """The chunk events the stub took: (stream, index, media type, bytes)."""
    chunks = [e["data"] for e in stub.events if e["type"] == "chunk"]
    return [(c["stream"], c["index"], c["media_type"], base64.b64decode(c["base64"]))
            for c in chunks if stream is None or c["stream"] == stream]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_pipe_chunks_cuts_binary_input_into_ordered_chunks_over_one_request(
        stub: Stub, env: dict[str, str], shell: list[str]) -> None:
    payload = bytes(range(256)) * 40 + b"\x00\n\r\"\\" + secrets.token_bytes(5003)
    done = emit(env, "pipe-chunks", "audio/pcm;rate=16000;channels=1", "--size", "4000",
                shell=shell, stdin=payload)
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    chunks = media(stub)
    assert [(name, index, kind) for name, index, kind, _ in chunks] == [
        ("audio", i, "audio/pcm;rate=16000;channels=1") for i in range(4)]
    assert [len(piece) for *_, piece in chunks] == [4000, 4000, 4000, 3248]
    assert b"".join(piece for *_, piece in chunks) == payload
    posts = stub.posts()
    assert len(posts) == 1 and posts[0].chunked
    assert posts[0].headers["content-type"] == "application/x-ndjson"
    assert all(ID_RE.match(e["id"]) for e in stub.events)


def test_pipe_chunks_sends_each_chunk_as_it_is_complete(stub: Stub,
                                                        env: dict[str, str]) -> None:
    # od hands on whole lines of 16 bytes: a chunk of a multiple of 16 leaves as soon as
    # its last byte has come.
    with subprocess.Popen(["dash", str(SCRIPT), "pipe-chunks", "--size", "1008", "--stream",
                           "cam.0", "image/png"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) as proc:
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"\x89PNG" * 252 + b"rest")
            proc.stdin.flush()
            assert stub.wait_for(lambda: len(stub.events) == 1), "first chunk not seen live"
            assert media(stub) == [("cam.0", 0, "image/png", b"\x89PNG" * 252)]
            proc.stdin.write(b"more")
            out, err = finish(proc)
        finally:
            proc.kill()
    assert (proc.returncode, out, err) == (0, b"", b"")
    assert media(stub)[1] == ("cam.0", 1, "image/png", b"restmore")


def test_chunk_sends_a_file_or_stdin_and_the_job_dir_counts_each_stream(
        stub: Stub, env: dict[str, str], tmp_path: Path, job_dir: Path) -> None:
    image = tmp_path / "frame.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(30_000))
    counted = {**env, "METIS_JOB_DIR": str(job_dir)}
    steps: list[tuple[tuple[str, ...], bytes]] = [
        (("chunk", "image/png", str(image)), b""),
        (("chunk", "audio/wav"), b"RIFF...."),
        (("chunk", "image/png", "-"), b"second frame"),
        (("pipe-chunks", "--size", "3", "audio/wav"), b"0123456"),
        (("chunk", "--index", "40", "audio/wav"), b"given"),
        (("chunk", "audio/wav"), b"after it"),
        (("chunk", "--stream", "empty", "application/octet-stream"), b""),
    ]
    for args, stdin in steps:
        done = emit(counted, *args, stdin=stdin)
        assert (done.returncode, done.stderr) == (0, b""), args
    assert media(stub, "image") == [
        ("image", 0, "image/png", image.read_bytes()), ("image", 1, "image/png", b"second frame")]
    assert [(index, piece) for _, index, _, piece in media(stub, "audio")] == [
        (0, b"RIFF...."), (1, b"012"), (2, b"345"), (3, b"6"), (40, b"given"), (41, b"after it")]
    assert media(stub, "empty") == [("empty", 0, "application/octet-stream", b"")]
    # Without a job dir, nothing counts: chunk needs --index, pipe-chunks starts at 0.
    done = emit(env, "chunk", "audio/wav", stdin=b"x")
    assert done.returncode == 2 and b"--index" in done.stderr
    assert emit(env, "pipe-chunks", "audio/wav", stdin=b"x").returncode == 0
    assert media(stub)[-1] == ("audio", 0, "audio/wav", b"x")


def test_chunks_go_to_the_spool_too(stub: Stub, env: dict[str, str], job_dir: Path) -> None:
    payload = secrets.token_bytes(70_000)
    done = emit(spool_env(env, job_dir, "spool"), "pipe-chunks", "audio/ogg", stdin=payload)
    assert (done.returncode, done.stderr) == (0, b"")
    done = emit(spool_env(env, job_dir, "both"), "chunk", "audio/ogg", stdin=b"tail")
    assert (done.returncode, done.stderr) == (0, b"")
    events = spooled(job_dir)
    assert [(e["data"]["index"], len(e["data"]["base64"])) for e in events] == [
        (0, 43692), (1, 43692), (2, 5952), (3, 8)]
    assert b"".join(base64.b64decode(e["data"]["base64"]) for e in events) == payload + b"tail"
    assert [e["id"] for e in stub.events] == [events[-1]["id"]]  # only `both` posted


def test_chunk_usage_errors_and_a_chunk_too_large(stub: Stub, env: dict[str, str],
                                                  tmp_path: Path) -> None:
    for args in [("chunk",), ("chunk", "audio"), ("chunk", 'audio/"wav'),
                 ("chunk", "audio/wav", "a", "b"), ("chunk", "--stream", "Bad", "audio/wav"),
                 ("chunk", "--index", "-1", "audio/wav"), ("pipe-chunks", "--size", "0", "a/b"),
                 ("pipe-chunks", "--size", "999999", "a/b"), ("pipe-chunks", "--bogus", "a/b"),
                 ("chunk", "--index", "0", "audio/wav", str(tmp_path / "missing")),
                 ("pipe", "chunk")]:
        done = emit(env, *args, stdin=b"x")
        assert done.returncode == 2, (args, done.stderr)
    assert stub.requests == []
    done = emit(env, "chunk", "--index", "0", "audio/wav", stdin=bytes(49_200))
    assert done.returncode == 1
    assert b"HTTP 413" in done.stderr and b"bytes of media" in done.stderr
    done = emit(env, "chunk", "--index", "0", "audio/wav;rate", stdin=b"x")
    assert done.returncode == 1
    assert b"HTTP 422" in done.stderr and b"media_type" in done.stderr
    assert stub.events == []


# ---------------------------------------------------------------------------
# param, inputs, spec


def test_param_from_env_or_spec(stub: Stub, env: dict[str, str]) -> None:
    stub.params = {"text": 'two words "quoted"\nand a line', "delay": "0.5", "path": "p"}
    done = emit(env, "param", "text", extra={"TEXT": "from env"})
    assert (done.returncode, done.stdout) == (0, b"from env")
    assert stub.requests == []
    done = emit(env, "param", "text")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == stub.params["text"]
    assert stub.requests[-1].path == f"/api/jobs/{JOB}/spec/params/text"
    # A variable that the system sets is never taken for a parameter.
    done = emit(env, "param", "path")
    assert (done.returncode, done.stdout) == (0, b"p")
    done = emit(env, "param", "missing")
    assert done.returncode == 1
    assert b"no parameter" in done.stderr


def test_inputs_and_spec(stub: Stub, env: dict[str, str]) -> None:
    done = emit(env, "inputs")
    assert (done.returncode, done.stdout) == (0, b"")
    stub.inputs = ["https://example.org/a.txt", "https://example.org/b?x=1&y=2"]
    done = emit(env, "inputs")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == stub.inputs
    done = emit(env, "spec")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["inputs"] == stub.inputs


# ---------------------------------------------------------------------------
# The example batch scripts


def run_job(name: str, env: dict[str, str], workdir: Path,
            extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    script = JOBSCRIPTS / name
    return subprocess.run(["dash", str(script)], capture_output=True, cwd=workdir,
                          env={**env, "PBS_O_WORKDIR": str(workdir), **(extra or {})},
                          timeout=120, check=False)


def test_tokens_job(stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    done = run_job("tokens.pbs", env, tmp_path,
                   {"TEXT": "Hello  from\tthe cluster", "DELAY": "0.01"})
    assert done.returncode == 0, done.stderr
    words = ["Hello", " from", " the", " cluster"]
    expected: list[tuple[str, Any]] = [("step", "Loading model"), ("step", "Generating")]
    for i, word in enumerate(words, start=1):
        expected += [("token", word), ("progress", {"current": i, "total": 4})]
    expected.append(("completed", {"text": "Hello from the cluster", "tokens": 4}))
    assert [(e["type"], e["data"]) for e in stub.events] == expected


def test_tokens_job_reads_params_from_the_spec(stub: Stub, env: dict[str, str],
                                               tmp_path: Path) -> None:
    stub.params = {"text": 'say "hi" \\ now', "delay": "0"}
    done = run_job("tokens.pbs", env, tmp_path)
    assert done.returncode == 0, done.stderr
    tokens = [e["data"] for e in stub.events if e["type"] == "token"]
    assert tokens == ["say", ' "hi"', " \\", " now"]
    assert stub.events[-1]["data"] == {"text": 'say "hi" \\ now', "tokens": 4}


def test_jobs_run_a_helper_without_its_execute_bit(stub: Stub, env: dict[str, str],
                                                  tmp_path: Path) -> None:
    copy = tmp_path / "helper" / "metis-emit"
    copy.parent.mkdir()
    copy.write_bytes(SCRIPT.read_bytes())
    copy.chmod(0o644)
    done = run_job("tokens.pbs", {**env, "METIS_EMIT": str(copy)}, tmp_path,
                   {"TEXT": "one two", "DELAY": "0"})
    assert done.returncode == 0, done.stderr
    assert stub.events[-1]["data"] == {"text": "one two", "tokens": 2}


def test_download_job(stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    content = secrets.token_bytes(100_000)
    stub.files["data.bin"] = content
    url = f"{stub.url}/files/data.bin"
    done = run_job("download.pbs", env, tmp_path, {"URL": url})
    assert done.returncode == 0, done.stderr
    assert [(e["type"], e["data"]) for e in stub.events] == [
        ("step", "Downloading input"),
        ("step", "Hashing"),
        ("completed", {"url": url, "bytes": len(content),
                       "sha256": hashlib.sha256(content).hexdigest()}),
    ]


def test_download_job_with_inputs(stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    files = {"a.txt": b"alpha\n", "b.txt": b"", "c.bin": bytes(range(256)) * 10}
    stub.files.update(files)
    stub.params["url"] = f"{stub.url}/files/a.txt"
    stub.inputs = [f"{stub.url}/files/b.txt", f"{stub.url}/files/c.bin"]
    done = run_job("download.pbs", env, tmp_path)  # URL from the spec
    assert done.returncode == 0, done.stderr
    assert stub.types() == ["step", "step", "completed"]
    result = stub.events[-1]["data"]

    def entry(name: str) -> dict[str, Any]:
        return {"url": f"{stub.url}/files/{name}", "bytes": len(files[name]),
                "sha256": hashlib.sha256(files[name]).hexdigest()}

    assert result == {**entry("a.txt"), "inputs": [entry("b.txt"), entry("c.bin")]}


def test_download_job_failure(stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    url = f"{stub.url}/files/missing.bin"
    done = run_job("download.pbs", env, tmp_path, {"URL": url})
    assert done.returncode != 0
    assert stub.types() == ["step", "fatal"]
    error = stub.events[-1]["data"]["error"]
    assert url in error
    assert "curl exit code 22" in error


# ---------------------------------------------------------------------------
# The spool (METIS_DELIVERY spool or both): $METIS_JOB_DIR/events.ndjson


def whole_lines(spool: Path) -> list[bytes]:
    """The spool's lines as a reader takes them: a last line without its newline is
    still being written, and waits."""
    if not spool.exists():
        return []
    return spool.read_bytes().split(b"\n")[:-1]


def spooled(job_dir: Path) -> list[dict[str, Any]]:
    """The spool's events, each checked to be one whole line of the wire JSON."""
    data = (job_dir / "events.ndjson").read_bytes()
    assert data.endswith(b"\n")
    events = []
    for line in whole_lines(job_dir / "events.ndjson"):
        event = json.loads(line)
        assert list(event) in (["type", "data", "id"], ["type", "id"]), line
        assert ID_RE.match(event["id"]), line
        events.append(event)
    assert len({e["id"] for e in events}) == len(events)
    return events


@pytest.fixture
def job_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir(mode=0o700)
    return folder


def spool_env(env: dict[str, str], job_dir: Path, delivery: str) -> dict[str, str]:
    return {**env, "METIS_DELIVERY": delivery, "METIS_JOB_DIR": str(job_dir)}


def without_curl(env: dict[str, str], tmp_path: Path) -> tuple[dict[str, str], Path]:
    """ENV with a PATH whose `curl` only leaves a mark, and the mark's path."""
    bindir = tmp_path / "no-curl"
    bindir.mkdir(exist_ok=True)
    mark = tmp_path / "curl-was-called"
    (bindir / "curl").write_text(f'#!/bin/sh\necho "$@" >> "{mark}"\nexit 99\n')
    (bindir / "curl").chmod(0o755)
    return {**env, "PATH": f"{bindir}{os.pathsep}{env['PATH']}"}, mark


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/jobs/{JOB}/events"


PRETTY = json.dumps({"text": 'a "b"\n', "n": [1, 2.5, None, True], "é": {}}, indent=2,
                    ensure_ascii=False)

# Every kind of event metis-emit makes, as (args, stdin), and what each gives.
EVERY_KIND: list[tuple[tuple[str, ...], bytes]] = [
    (("step", NASTY_TEXTS[2]), b""),
    (("log", NASTY_TEXTS[-1]), b""),
    (("progress", "3", "10", "epochs"), b""),
    (("result", PRETTY), b""),
    (("event", "ping"), b""),
    (("--id", "my-key:1", "token", " given id"), b""),
    (("pipe", "token"), b'Hello\n world\n\n"q" \\ \t\n'),
    (("pipe-events",), b'{"type": "step", "data": "a"}\n#idle\n\n{"type": "x.y", "data": [1]}\n'),
    (("fatal", "went wrong\n(exit 3)"), b""),
]
EVERY_KIND_GIVES: list[tuple[str, Any]] = [
    ("step", NASTY_TEXTS[2]),
    ("log", NASTY_TEXTS[-1]),
    ("progress", {"current": 3, "total": 10, "label": "epochs"}),
    ("result", json.loads(PRETTY)),
    ("ping", None),
    ("token", " given id"),
    ("token", "Hello"), ("token", " world"), ("token", ""), ("token", '"q" \\ \t'),
    ("step", "a"), ("x.y", [1]),
    ("fatal", {"error": "went wrong\n(exit 3)"}),
]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_spool_mode_appends_every_event_and_touches_no_network(
        stub: Stub, env: dict[str, str], job_dir: Path, tmp_path: Path,
        shell: list[str]) -> None:
    """Each event is one line of the spool, exactly the JSON it would post, with its id;
    no request, not even a curl --version, and neither token nor URL is needed."""
    spool_mode, curl_mark = without_curl(spool_env(env, job_dir, "spool"), tmp_path)
    del spool_mode["METIS_TOKEN_FILE"]
    for args, stdin in EVERY_KIND:
        done = emit(spool_mode, *args, shell=shell, stdin=stdin)
        assert (done.returncode, done.stdout, done.stderr) == (0, b"", b""), args
    events = spooled(job_dir)
    assert [(e["type"], e.get("data")) for e in events] == EVERY_KIND_GIVES
    assert events[5]["id"] == "my-key:1"
    assert stub.requests == []
    assert not curl_mark.exists()
    assert oct((job_dir / "events.ndjson").stat().st_mode & 0o777) == "0o600"
    assert sorted(p.name for p in job_dir.iterdir()) == ["events.ndjson"]
    assert list(Path(env["TMPDIR"]).iterdir()) == []


def test_both_mode_spools_each_event_before_posting_it(stub: Stub, env: dict[str, str],
                                                       job_dir: Path) -> None:
    stub.spool = job_dir / "events.ndjson"
    both = spool_env(env, job_dir, "both")
    for args, stdin in EVERY_KIND:
        done = emit(both, *args, stdin=stdin)
        assert (done.returncode, done.stderr) == (0, b""), args
        stub.ended = False  # the fatal
    events = spooled(job_dir)
    assert [(e["type"], e.get("data")) for e in events] == EVERY_KIND_GIVES
    assert [e["id"] for e in stub.events] == [e["id"] for e in events]
    assert [(e["type"], e["data"]) for e in stub.events] == EVERY_KIND_GIVES
    assert stub.not_yet_spooled == []
    assert not (job_dir / "spool-only").exists()


def test_both_mode_with_the_server_unreachable_loses_nothing(
        stub: Stub, env: dict[str, str], job_dir: Path) -> None:
    """The event is in the spool: exit 0 with a warning, and from then on the job's
    events go to the spool only, even once the server is back, to keep their order."""
    both = {**spool_env(env, job_dir, "both"), "METIS_EMIT_RETRIES": "0"}
    # What the job asks of the server is no event, and not in the spool.
    for args in [("param", "p"), ("inputs",), ("spec",)]:
        done = emit(both, *args, extra={"METIS_EVENTS_URL": closed_port_url()})
        assert done.returncode == 4, args
        assert b"warning" not in done.stderr
    assert list(job_dir.iterdir()) == []
    done = emit(both, "step", "first", extra={"METIS_EVENTS_URL": closed_port_url()})
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith(
        b"; the event is in the spool; the server will read it from there\n")
    assert b"metis-emit: warning: posting the step event failed: curl exit status 7" \
        in done.stderr
    assert (job_dir / "spool-only").exists()
    for args, stdin in [(("step", "second"), b""), (("pipe", "log"), b"a\nb\n"),
                        (("pipe-events",), b'{"type": "x"}\n#idle\n{"type": "y"}\n')]:
        done = emit(both, *args, stdin=stdin)
        assert (done.returncode, done.stderr) == (0, b""), args
    assert [(e["type"], e.get("data")) for e in spooled(job_dir)] == [
        ("step", "first"), ("step", "second"), ("log", "a"), ("log", "b"), ("x", None),
        ("y", None)]
    assert stub.requests == []


def test_both_mode_after_server_errors_and_a_pipe_that_cannot_resend(
        stub: Stub, env: dict[str, str], job_dir: Path) -> None:
    both = {**spool_env(env, job_dir, "both"), "METIS_EMIT_RETRIES": "1"}
    stub.fail = ["503", "503"]
    done = emit(both, "step", "x")
    assert done.returncode == 0, done.stderr
    assert b"server error (HTTP 503): backend unavailable; the event is in the spool" \
        in done.stderr
    assert (job_dir / "spool-only").exists()
    (job_dir / "spool-only").unlink()
    # The stream fails, and so does the resend of what it carried: the rest of stdin
    # goes to the spool.
    stub.fail = ["503", "503", "503"]
    done = emit(both, "pipe", "log", stdin=b"one\ntwo\nthree\n")
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith(b"the events are in the spool, and the rest go there only; "
                                b"the server will read them from there\n")
    assert (job_dir / "spool-only").exists()
    assert [e["data"] for e in spooled(job_dir)] == ["x", "one", "two", "three"]
    assert stub.events == []


def test_a_pipe_turns_spool_only_as_soon_as_the_job_does(
        stub: Stub, env: dict[str, str], job_dir: Path) -> None:
    """Another writer of the job (the script's own metis-emit) could not reach the
    server: the stream's next line goes to the spool only, and so does the rest."""
    with subprocess.Popen(["dash", str(SCRIPT), "pipe", "log"], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=spool_env(env, job_dir, "both")) as proc:
        assert proc.stdin is not None
        try:
            proc.stdin.write(b"one\n")
            proc.stdin.flush()
            assert stub.wait_for(lambda: len(stub.events) == 1)
            (job_dir / "spool-only").touch()
            proc.stdin.write(b"two\nthree\n")
            _, err = finish(proc)
        finally:
            proc.kill()
    assert proc.returncode == 0, err
    assert [e["data"] for e in spooled(job_dir)] == ["one", "two", "three"]
    assert [e["data"] for e in stub.events] == ["one"]


def test_both_mode_keeps_the_servers_definitive_answers(
        stub: Stub, env: dict[str, str], job_dir: Path, tmp_path: Path) -> None:
    """The line is in the spool all the same: the server refuses or drops it there too."""
    both = spool_env(env, job_dir, "both")
    stub.fail = ["400"]
    assert emit(both, "step", "refused").returncode == 1
    bad_token = tmp_path / "bad-token"
    bad_token.write_text("wrong")
    assert emit(both, "step", "unauthorized",
                extra={"METIS_TOKEN_FILE": str(bad_token)}).returncode == 6
    stub.fail = ["409"]
    assert emit(both, "step", "late").returncode == 5
    assert (job_dir / "ended").exists()
    assert not (job_dir / "spool-only").exists()
    assert [e["data"] for e in spooled(job_dir)] == ["refused", "unauthorized", "late"]


def test_spool_lines_stay_whole_with_concurrent_writers(env: dict[str, str],
                                                        job_dir: Path) -> None:
    """Writers of one job append lines of 20 KiB at once: every line is whole, none lost
    (a write of that size to a file is no atomic pipe write: only O_APPEND with one write
    per line keeps them apart)."""
    spool_mode = spool_env(env, job_dir, "spool")
    writers, lines = 4, 25

    def text(writer: int, line: int) -> str:
        return f"writer {writer} line {line} " + "abcdefgh"[writer] * 20_000

    def write(writer: int) -> subprocess.CompletedProcess[bytes]:
        stdin = "".join(text(writer, i) + "\n" for i in range(lines)).encode()
        return emit(spool_mode, "pipe", "log", stdin=stdin, timeout=120)

    results: list[subprocess.CompletedProcess[bytes]] = []
    threads = [threading.Thread(target=lambda w=w: results.append(write(w)))
               for w in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0] * writers, [r.stderr for r in results]
    events = spooled(job_dir)
    assert len(events) == writers * lines
    assert sorted(e["data"] for e in events) == sorted(
        text(w, i) for w in range(writers) for i in range(lines))
    for w in range(writers):
        mine = [e["data"] for e in events if e["data"].startswith(f"writer {w} ")]
        assert mine == [text(w, i) for i in range(lines)]


@pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")
@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_each_spool_line_is_one_write_with_o_append(env: dict[str, str], job_dir: Path,
                                                    tmp_path: Path, shell: list[str]) -> None:
    lines = ["x" * 100_000, "short", "é" * 30_000]
    traces = tmp_path / "trace"
    done = subprocess.run(
        ["strace", "-f", "-ff", "-qq", "-s", "0", "-o", str(traces),
         "-e", "trace=open,openat,write,execve", *shell, str(SCRIPT), "pipe", "log"],
        input="".join(x + "\n" for x in lines).encode(), capture_output=True,
        env=spool_env(env, job_dir, "spool"), timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert [e["data"] for e in spooled(job_dir)] == lines
    opens, writes = [], []
    for trace in tmp_path.glob("trace.*"):
        text = trace.read_text()
        opens += re.findall(r'open(?:at)?\([^"]*"[^"]*/events\.ndjson", ([^,)]*)', text)
        if re.search(r'execve\("[^"]*/dd"', text):
            writes.append([int(n) for n in re.findall(r"^write\(1, .*= (\d+)$", text, re.M)])
    assert opens and all("O_APPEND" in flags for flags in opens), opens
    lengths = [len(line) for line in whole_lines(job_dir / "events.ndjson")]
    assert sorted(writes) == sorted([n + 1] for n in lengths)


def test_spool_refuses_what_cannot_be_one_line(env: dict[str, str], job_dir: Path) -> None:
    spool_mode = spool_env(env, job_dir, "spool")
    huge = json.dumps({"type": "log", "data": "x" * (1 << 20)}).encode()
    done = emit(spool_mode, "pipe-events", stdin=huge + b"\n")
    assert done.returncode == 1
    assert b"longer than the spool takes" in done.stderr
    done = emit(spool_mode, "result", '{"text": "a line break\nin a string"}')
    assert done.returncode == 1
    assert b"not valid JSON" in done.stderr
    assert whole_lines(job_dir / "events.ndjson") == []


def test_a_bad_delivery_is_an_environment_error(stub: Stub, env: dict[str, str],
                                                job_dir: Path) -> None:
    for args in [("step", "x"), ("pipe", "log"), ("run", "script.sh"), ("param", "p"),
                 ("inputs",), ("spec",)]:
        done = emit(spool_env(env, job_dir, "spooled"), *args, stdin=b"a\n")
        assert done.returncode == 3, args
        assert done.stderr == (b"metis-emit: METIS_DELIVERY must be http, spool or both, "
                               b"not 'spooled'\n")
    for delivery in ("spool", "both"):
        done = emit({**env, "METIS_DELIVERY": delivery}, "step", "x")
        assert done.returncode == 3
        assert b"needs METIS_JOB_DIR" in done.stderr
    assert list(job_dir.iterdir()) == []
    assert stub.requests == []
    # Empty is unset: HTTP only, as before there was a spool.
    assert emit(spool_env(env, job_dir, ""), "step", "x").returncode == 0
    assert [e["data"] for e in stub.events] == ["x"]
    assert list(job_dir.iterdir()) == []


def test_param_inputs_and_spec_in_spool_mode(stub: Stub, env: dict[str, str], job_dir: Path,
                                             tmp_path: Path) -> None:
    spool_mode, curl_mark = without_curl(spool_env(env, job_dir, "spool"), tmp_path)
    stub.params = {"text": "from the server"}
    done = emit(spool_mode, "param", "text", extra={"TEXT": "from env"})
    assert (done.returncode, done.stdout) == (0, b"from env")
    done = emit(spool_mode, "param", "text")
    assert done.returncode == 1
    assert done.stderr == (b"metis-emit: no parameter text (in spool mode the job's "
                           b"parameters come from its environment)\n")
    # No input-urls in spool mode: no inputs.
    done = emit(spool_mode, "inputs")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    (job_dir / "input-urls").write_text("https://example.org/a.txt\n\nhttps://example.org/b?x=1")
    done = emit(spool_mode, "inputs")
    assert (done.returncode, done.stdout) == (
        0, b"https://example.org/a.txt\nhttps://example.org/b?x=1\n")
    done = emit(spool_mode, "spec")
    assert done.returncode == 3
    assert b"METIS_SPEC_FILE" in done.stderr
    spec = tmp_path / "spec.json"
    spec.write_text('{"job": "j_test01", "params": {"text": "t"}}')
    done = emit(spool_mode, "spec", extra={"METIS_SPEC_FILE": str(spec)})
    assert (done.returncode, done.stdout) == (0, spec.read_bytes())
    assert stub.requests == []
    assert not curl_mark.exists()


def test_inputs_come_from_the_job_folder_whatever_the_delivery(
        stub: Stub, env: dict[str, str], job_dir: Path) -> None:
    stub.inputs = ["https://example.org/from-the-server"]
    (job_dir / "input-urls").write_text("https://example.org/from-the-file\n")
    done = emit({**env, "METIS_JOB_DIR": str(job_dir)}, "inputs")
    assert (done.returncode, done.stdout) == (0, b"https://example.org/from-the-file\n")
    assert stub.requests == []
    (job_dir / "input-urls").unlink()
    done = emit({**env, "METIS_JOB_DIR": str(job_dir)}, "inputs")
    assert (done.returncode, done.stdout) == (0, b"https://example.org/from-the-server\n")
