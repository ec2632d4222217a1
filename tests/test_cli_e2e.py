"""The ``metis-stream`` CLI as a subprocess (``python -m metis_stream.cli``) against a real
server: tail (live, fatal, cancelled, across a restart on Redis, Ctrl-C), jobs, token, emit,
and where the URL and key come from (and a URL where nothing listens)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

from metis_stream.tokens import hash_api_key
from tests.support import service_unavailable
from tests.support.processes import Process, command_line, end_group, process_group
from tests.support.redis_server import RedisServer
from tests.support.server import (
    EXAMPLE_TEMPLATES,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    free_port,
    history,
    local_job_script,
    script_templates,
    submit,
)
from tests.support.users import run_as

CLI = [sys.executable, "-m", "metis_stream.cli"]
WORDS = [f"t{n}" for n in range(10)]
TEXT = " ".join(WORDS)
UNKNOWN_JOB = "j_01M87P14J6V8D2MYD25J6MJ0B2"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any METIS_* variable, plus ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("METIS_")}
    env.update(extra or {})
    return env


def cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(env))


class Background:
    """A CLI command running in the background, its stdout collected as it comes."""

    def __init__(self, *args: str, env: Mapping[str, str] | None = None) -> None:
        self.process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, env=clean_env(env))
        self._out = bytearray()
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            with self._lock:
                self._out += chunk

    @property
    def stdout(self) -> str:
        with self._lock:
            return self._out.decode()

    def wait_for_output(self, text: str, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.stdout:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"{text!r} never appeared; output so far: {self.stdout!r}")

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        """The exit code, stdout and stderr."""
        code = self.process.wait(timeout)
        self._reader.join(5)
        assert self.process.stderr is not None
        stderr = self.process.stderr.read().decode()
        self._close_pipes()
        return code, self.stdout, stderr

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


def wait_for_state(server: ServerProcess, job_id: str, state: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=5).json()["state"] == state:
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {state}")


def count_tokens(server: ServerProcess, job_id: str) -> int:
    return sum(e["type"] == "token" for e in history(server, job_id))


def assert_text_once(stdout: str, text: str) -> None:
    """Token text is printed inline, on a line of its own between the event lines."""
    lines = stdout.splitlines()
    assert lines.count(text) == 1, stdout
    first_word = text.split()[0]
    # Nowhere else but in that line and in the `completed` line's result.
    assert stdout.count(first_word + " ") == 2, stdout


def is_event_line(line: str, event_type: str) -> bool:
    parts = line.split()
    return len(parts) >= 2 and parts[1] == event_type


# tail


def test_tail_of_a_live_job_prints_the_text_inline_and_exits_0(live_server: ServerProcess):
    job_id = submit(live_server, text=TEXT, delay=0.1)
    tail = Background("tail", job_id, "--url", live_server.url)
    try:
        tail.wait_for_output("step")
        assert count_tokens(live_server, job_id) < len(WORDS), "tail must follow a live job"
        code, out, err = tail.wait()
    finally:
        tail.stop()
    assert code == 0, err
    assert_text_once(out, TEXT)
    lines = out.splitlines()
    assert is_event_line(lines[0], "starting")
    assert is_event_line(lines[-1], "completed")
    assert lines[-2] == TEXT, "the text ends its line before the next event"
    assert "Traceback" not in err


def test_tail_exits_1_after_fatal(live_server: ServerProcess):
    closed = f"http://127.0.0.1:{free_port()}/missing.bin"  # nothing listens: curl fails
    job_id = submit(live_server, "download", url=closed)
    done = cli("tail", job_id, "--url", live_server.url)
    assert done.returncode == 1, done.stderr
    assert is_event_line(done.stdout.splitlines()[-1], "fatal"), done.stdout
    assert "Traceback" not in done.stderr
    as_json = cli("tail", job_id, "--json", "--url", live_server.url)
    assert as_json.returncode == 1
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events == history(live_server, job_id)


def test_the_demos_download_job_hashes_the_files_uploaded_with_it(
        live_server: ServerProcess, tmp_path: Path):
    # docs/files.md's upload, tried on the demo as a newcomer would: the CLI uploads a
    # local file with the submission, and the job reports what it received.
    upload = tmp_path / "weights one.bin"
    upload.write_bytes(os.urandom(300_000))
    done = cli("submit", "download", "-p", f"url={live_server.url}/healthz",
               "--input", str(upload), "--url", live_server.url)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[-1]
    assert cli("tail", job_id, "--url", live_server.url).returncode == 0
    [end] = [e for e in history(live_server, job_id) if e["type"] == "completed"]
    assert end["data"]["uploaded"] == [{
        "name": "weights one.bin", "bytes": 300_000,
        "sha256": hashlib.sha256(upload.read_bytes()).hexdigest()}]


def test_tail_exits_1_after_cancelled(live_server: ServerProcess):
    job_id = submit(live_server, text="slow words here", delay=5)
    tail = Background("tail", job_id, "--url", live_server.url)
    try:
        tail.wait_for_output("step")
        r = httpx.delete(f"{live_server.url}/api/jobs/{job_id}", timeout=10)
        assert r.status_code == 200, (r.text, history(live_server, job_id))
        code, out, err = tail.wait(30)
    finally:
        tail.stop()
    assert code == 1, err
    assert is_event_line(out.splitlines()[-1], "cancelled"), out
    assert "Traceback" not in err


def test_tail_interrupted_with_sigint_exits_130_without_a_traceback(
        live_server: ServerProcess):
    job_id = submit(live_server, text="slow words here", delay=5)
    tail = Background("tail", job_id, "--url", live_server.url)
    try:
        tail.wait_for_output("step")
        tail.process.send_signal(signal.SIGINT)
        code, _, err = tail.wait(15)
    finally:
        tail.stop()
        httpx.delete(f"{live_server.url}/api/jobs/{job_id}", timeout=10)
    assert code == 130, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" not in err


@pytest.mark.redis
def test_tail_across_a_server_restart_prints_the_text_once_and_exits_0(
        private_redis: RedisServer, tmp_path: Path):
    # Without capture: while the server is away, metis-emit's retries print to the
    # script's stderr, which would come back as log events between the words.
    server = ServerProcess(state_dir=tmp_path / "server",
                           server_settings={"redis_url": private_redis.url},
                           extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES.replace(
                               "[templates.tokens]\n", "[templates.tokens]\ncapture = false\n"))
    server.start()
    words = [f"r{n}" for n in range(24)]
    text = " ".join(words)
    tail: Background | None = None
    try:
        job_id = submit(server, text=text, delay=0.05)
        tail = Background("tail", job_id, "--url", server.url)
        tail.wait_for_output(" r4")
        printed_before = tail.stdout
        server.restart()
        code, out, err = tail.wait(60)
        events = history(server, job_id)
    finally:
        if tail is not None:
            tail.stop()
        server.stop()
    assert code == 0, err
    assert "completed" not in printed_before, "the restart must come in the middle"
    assert out.startswith(printed_before)
    assert_text_once(out, text)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "completed"
    assert "Traceback" not in err
    log = server.log()
    assert log.count("Started server process") == 2
    resumed = re.findall(rf"WebSocket /ws/jobs/{job_id}\?after=(\d+)", log)
    assert len(resumed) >= 2 and int(resumed[-1]) > 0, "tail must have resumed after N"


# A job's text that reaches a terminal

# A job that waits until its token file is removed, so that the test posts its events.
IDLE = {"idle": '"$METIS_EMIT" step "idle"\nwhile [ -f "$METIS_TOKEN_FILE" ]; do sleep 0.1; done\n'}
HOSTILE_TOKENS = [
    "before ",
    "\x1b]52;c;cHduZWQtY2xpcGJvYXJk\x07",  # OSC 52: write "pwned-clipboard" to the clipboard
    "\x1b]0;pwned-title\x07",  # OSC 0: set the window and pane title
    "\x1b[2J\x1b[H",  # CSI 2J: clear the screen
    "\x9b2J",  # the same as one C1 character, U+009B (CSI)
    "\x07 after",
]
SHOWN_TEXT = (r"before \x1b]52;c;cHduZWQtY2xpcGJvYXJk\x07\x1b]0;pwned-title\x07\x1b[2J\x1b[H"
              r"\x9b2J\x07 after")
HOSTILE_LOG = "log \x1b]0;pwned-log\x07\x9b2J\r\x7f"
# Output lines as the launcher sends them: colours a terminal may show, and the rest.
HOSTILE_OUTPUT = {"stream": "stdout", "lines": [
    "\x1b[32mgreen\x1b[0m ok",
    "out \x1b]0;pwned-out\x07\x1b[2J\x1b]52;c;cHduZWQ=\x07\x9b2J\x7f end",
]}
SHOWN_OUTPUT = ["green ok", r"out \x7f end"]


@pytest.fixture
def hostile_job(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    """A finished job whose text holds terminal escape sequences."""
    server = ServerProcess(state_dir=tmp_path / "server", extra_config=LOCAL_CLUSTER
                           + EXAMPLE_TEMPLATES + script_templates(tmp_path / "scripts", IDLE))
    server.start()
    try:
        job = RunningJob(server, "idle")
        events = ([{"type": "token", "data": text} for text in HOSTILE_TOKENS]
                  + [{"type": "log", "data": HOSTILE_LOG},
                     {"type": "log", "data": HOSTILE_OUTPUT},
                     {"type": "progress", "data": {"current": 1, "total": 2,
                                                   "label": HOSTILE_TOKENS[2]}},
                     {"type": "completed", "data": {"text": HOSTILE_TOKENS[1]}}])
        for event in events:
            assert job.post_event(event).status_code == 200
        yield server, job.id
    finally:
        server.stop()


def assert_no_terminal_controls(output: str) -> None:
    """Nothing a terminal would act on but line ends and tabs."""
    assert not [char for char in output if char not in "\n\t" and (
        char < " " or "\x7f" <= char < "\xa0")], repr(output)


def test_tail_shows_escape_sequences_in_job_text_instead_of_sending_them(
        hostile_job: tuple[ServerProcess, str]):
    server, job_id = hostile_job
    done = cli("tail", job_id, "--url", server.url)
    assert done.returncode == 0, done.stderr
    assert_no_terminal_controls(done.stdout)
    assert SHOWN_TEXT in done.stdout.splitlines()
    assert r" log        log \x1b]0;pwned-log\x07\x9b2J\x0d\x7f" + "\n" in done.stdout
    assert "\n".join(SHOWN_OUTPUT) + "\n" in done.stdout
    # --json keeps every event exact, and escapes what JSON leaves raw (DEL, C1).
    as_json = cli("tail", job_id, "--json", "--url", server.url)
    assert as_json.returncode == 0, as_json.stderr
    assert_no_terminal_controls(as_json.stdout)
    assert [json.loads(line) for line in as_json.stdout.splitlines()] == history(
        server, job_id)


def test_tail_in_a_real_terminal_changes_no_title_clipboard_or_screen(
        hostile_job: tuple[ServerProcess, str], tmp_path: Path):
    if shutil.which("tmux") is None:
        service_unavailable("tmux is not installed (./dev test installs it)")
    server, job_id = hostile_job
    socket = str(tmp_path / "tmux.sock")
    config = tmp_path / "tmux.conf"
    config.write_text("set -g set-clipboard on\n")  # OSC 52 may fill a tmux buffer
    status_file = tmp_path / "status"

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", "-S", socket, "-f", str(config), *args],
                              capture_output=True, text=True, timeout=10, check=True,
                              env=clean_env()).stdout

    # The pane outlives tail (with remain-on-exit, tmux's own notice would scroll it).
    tail = shlex.join([*CLI, "tail", job_id, "--url", server.url])
    tmux("new-session", "-d", "-x", "200", "-y", "50",
         f"{tail}; echo $? > {shlex.quote(str(status_file))}; exec sleep 600")
    try:
        deadline = time.monotonic() + 30
        while not status_file.exists() or not status_file.read_text():
            assert time.monotonic() < deadline, tmux("capture-pane", "-p")
            time.sleep(0.1)
        screen = tmux("capture-pane", "-p")
        title = tmux("display-message", "-p", "#{pane_title}").strip()
        buffers = tmux("list-buffers", "-F", "#{buffer_sample}")
    finally:
        subprocess.run(["tmux", "-S", socket, "kill-server"], capture_output=True, timeout=10)
    assert status_file.read_text() == "0\n", screen
    assert "pwned" not in title
    assert buffers == "", "nothing may reach the clipboard"
    lines = [line for line in screen.splitlines() if line]
    assert is_event_line(lines[0], "starting"), f"the screen was cleared: {screen}"
    assert SHOWN_TEXT in lines
    assert all(line in lines for line in SHOWN_OUTPUT), screen
    assert is_event_line(lines[-1], "completed")


def test_tail_stream_prints_one_stream_of_an_unmodified_script_and_says_how_it_ended(
        tmp_path: Path):
    # The script knows nothing of metis-stream: the launcher streams what it prints.
    body = ('echo "out 1"; echo "err 1" >&2; printf "\\033[31mred\\033[0m\\n"\n'
            'sleep 0.3; echo "out 2"; echo "err 2" >&2; exit 3\n')
    server = ServerProcess(state_dir=tmp_path / "server", extra_config=LOCAL_CLUSTER
                           + script_templates(tmp_path / "scripts", {"plain": body}))
    server.start()
    try:
        job_id = submit(server, template="plain")
        stdout = cli("tail", job_id, "--stream", "stdout", "--url", server.url)
        stderr = cli("tail", job_id, "--stream", "stderr", "--url", server.url)
        everything = cli("tail", job_id, "--url", server.url)
    finally:
        server.stop()
    assert (stdout.returncode, stdout.stdout) == (1, "out 1\nred\nout 2\n"), stdout.stderr
    assert stdout.stderr.startswith("job fatal: "), stdout.stderr
    assert json.loads(stdout.stderr.removeprefix("job fatal: "))["exit_status"] == 3
    assert (stderr.returncode, stderr.stdout) == (1, "err 1\nerr 2\n"), stderr.stderr
    # Without --stream, both streams: each in its order (between the two, the order is
    # the one the launcher read them in).
    lines = everything.stdout.splitlines()
    assert [line for line in lines if line.startswith(("out", "red"))] == [
        "out 1", "red", "out 2"]
    assert [line for line in lines if line.startswith("err")] == ["err 1", "err 2"]
    assert is_event_line(lines[-1], "fatal")


def test_tail_refuses_an_unknown_stream():
    done = cli("tail", UNKNOWN_JOB, "--stream", "stdin")
    assert done.returncode == 2
    assert "argument --stream: invalid choice: 'stdin'" in done.stderr
    assert done.stdout == ""


# Where the URL and key come from


@pytest.mark.parametrize("command", [["tail", UNKNOWN_JOB], ["jobs"], ["cancel", UNKNOWN_JOB],
                                     ["submit", "tokens"]])
def test_a_closed_port_is_an_error_within_5_seconds_naming_the_url(command: list[str]):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = cli(*command, "--url", url, timeout=5)
    assert time.monotonic() - started < 5
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"metis-stream: cannot reach {url}: connection refused; is the "
                           "server running, and is --url (or METIS_URL) right?\n")
    assert done.stdout == ""


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(state_dir=tmp_path / "keyed",
                           server_settings={"api_keys": [hash_api_key("cli-key")]})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_url_and_key_after_the_subcommand_and_from_the_environment(
        keyed_server: ServerProcess):
    job_id = submit(keyed_server, key="cli-key", text="keyed text", delay=0)
    # Tailed to its end first: the two listings below must not race its state.
    tail = cli("tail", job_id, "--key", "cli-key", "--url", keyed_server.url)
    assert tail.returncode == 0, tail.stderr
    assert_text_once(tail.stdout, "keyed text")
    by_options = cli("jobs", "--url", keyed_server.url, "--key", "cli-key")
    assert by_options.returncode == 0, by_options.stderr
    assert job_id in by_options.stdout
    by_env = cli("jobs", env={"METIS_URL": keyed_server.url, "METIS_API_KEY": "cli-key"})
    assert by_env.returncode == 0, by_env.stderr
    assert by_env.stdout == by_options.stdout
    # An option wins over the environment.
    mixed = cli("jobs", "--key", "cli-key", env={"METIS_URL": keyed_server.url,
                                                 "METIS_API_KEY": "stale-key"})
    assert mixed.returncode == 0, mixed.stderr


def test_submit_and_jobs_by_end_user_with_a_client_key(tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "named", server_settings={"keys": {
        "a": {"key": hash_api_key("key-a")}, "b": {"key": hash_api_key("key-b")}}})
    server.start()
    try:
        env = {"METIS_URL": server.url, "METIS_API_KEY": "key-a"}
        submitted = cli("submit", "tokens", "-p", "text=for u9", "-p", "delay=0",
                        "--user", "u9", "--follow", env=env)
        assert submitted.returncode == 0, submitted.stderr
        job_id = submitted.stderr.split()[1]
        plain = cli("submit", "tokens", "-p", "text=for nobody", "-p", "delay=0",
                    "--follow", env=env)
        assert plain.returncode == 0, plain.stderr
        listed = cli("jobs", "--user", "u9", env=env)
        assert listed.returncode == 0, listed.stderr
        [line] = listed.stdout.splitlines()
        assert line.startswith(job_id) and line.endswith("  u9")
        assert len(cli("jobs", env=env).stdout.splitlines()) == 2
        theirs = cli("jobs", env={**env, "METIS_API_KEY": "key-b"})
        assert (theirs.returncode, theirs.stdout) == (0, "")
        refused = cli("tail", job_id, env={**env, "METIS_API_KEY": "key-b"})
        assert refused.returncode == 1 and "unknown job" in refused.stderr
        bad = cli("jobs", "--user", "u 9", env=env)
        assert bad.returncode == 1 and "'user' must be" in bad.stderr
    finally:
        server.stop()


@pytest.mark.parametrize("command", ["jobs", "tail"])
def test_a_wrong_key_is_a_readable_error_and_exit_1(keyed_server: ServerProcess, command: str):
    job_id = submit(keyed_server, key="cli-key", text="x", delay=0)
    args = ["jobs"] if command == "jobs" else ["tail", job_id]
    for key_args in (["--key", "wrong-key"], []):
        done = cli(*args, "--url", keyed_server.url, *key_args, timeout=30)
        assert done.returncode == 1, (key_args, done.stderr)
        assert done.stderr.startswith("metis-stream: "), done.stderr
        assert "(401)" in done.stderr and "key" in done.stderr
        assert "Traceback" not in done.stderr
        assert done.stdout == ""


def test_new_key_prints_a_random_key_then_the_form_for_api_keys(tmp_path: Path):
    first, second = cli("new-key"), cli("new-key")
    assert first.returncode == 0, first.stderr
    key, hashed = first.stdout.splitlines()
    assert len(key) >= 32 and re.fullmatch(r"[A-Za-z0-9_-]+", key)
    assert hashed == hash_api_key(key)
    assert second.stdout.splitlines()[0] != key
    # The second line, put in api_keys, lets the first one in.
    server = ServerProcess(state_dir=tmp_path / "server", server_settings={"api_keys": [hashed]})
    server.start()
    try:
        listed = cli("jobs", env={"METIS_URL": server.url, "METIS_API_KEY": key})
        assert listed.returncode == 0, listed.stderr
        refused = cli("jobs", env={"METIS_URL": server.url, "METIS_API_KEY": hashed})
        assert refused.returncode == 1 and "(401)" in refused.stderr
    finally:
        server.stop()


# token, emit, jobs


def test_token_prints_the_job_token_that_the_server_accepts(live_server: ServerProcess):
    job_id = submit(live_server, text="slow words here", delay=5)
    try:
        wait_for_state(live_server, job_id, "running")
        done = cli("token", job_id, "--config", str(live_server.config_path))
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        assert done.stdout == token + "\n" and len(token) >= 32
        url = f"{live_server.url}/api/jobs/{job_id}/events"
        body = json.dumps({"type": "log", "data": "posted with the CLI's token"})
        posted = subprocess.run(
            ["curl", "-sS", "-w", "\n%{http_code}", "-H", f"Authorization: Bearer {token}",
             "-H", "Content-Type: application/json", "-d", body, url],
            capture_output=True, text=True, timeout=30)
        answer, status = posted.stdout.rsplit("\n", 1)
        assert status == "200", posted.stdout
        seq = json.loads(answer)["seqs"][0]
        assert history(live_server, job_id)[seq - 1]["data"] == "posted with the CLI's token"
        other = cli("token", "j_01M87P14J6V8D2MYD25J6MJ0B2", "--config",
                    str(live_server.config_path)).stdout.strip()
        refused = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
             f"Authorization: Bearer {other}", "-H", "Content-Type: application/json",
             "-d", body, url], capture_output=True, text=True, timeout=30)
        assert refused.stdout == "401", "another job's token is refused"
    finally:
        httpx.delete(f"{live_server.url}/api/jobs/{job_id}", timeout=10)


def test_emit_posts_an_event_from_inside_a_job_and_prints_its_seq(live_server: ServerProcess):
    job_id = submit(live_server, text="slow words here", delay=5)
    try:
        wait_for_state(live_server, job_id, "running")
        token_file = live_server.state_dir / "jobs" / "local" / job_id / "token"
        assert token_file.exists(), "the local scheduler writes the job's token file"
        job_env = {"METIS_EVENTS_URL": f"{live_server.url}/api/jobs/{job_id}/events",
                   "METIS_TOKEN_FILE": str(token_file)}
        as_json = cli("emit", "result", '{"rows": 3}', env=job_env)
        as_text = cli("emit", "log", "loaded 3 rows", env=job_env)
        for done in (as_json, as_text):
            assert done.returncode == 0, done.stderr
        seqs = [int(done.stdout) for done in (as_json, as_text)]
        events = history(live_server, job_id)
        assert (events[seqs[0] - 1]["type"], events[seqs[0] - 1]["data"]) == (
            "result", {"rows": 3})
        assert (events[seqs[1] - 1]["type"], events[seqs[1] - 1]["data"]) == (
            "log", "loaded 3 rows")
        outside = cli("emit", "log", "nowhere")
        assert outside.returncode == 2
        assert "METIS_EVENTS_URL" in outside.stderr and "Traceback" not in outside.stderr
    finally:
        httpx.delete(f"{live_server.url}/api/jobs/{job_id}", timeout=10)


def test_jobs_state_running_lists_only_the_running_job(live_server: ServerProcess):
    done_id = submit(live_server, text="quick", delay=0)
    running_id = submit(live_server, text="slow words here", delay=5)
    try:
        wait_for_state(live_server, done_id, "completed")
        wait_for_state(live_server, running_id, "running")
        running = cli("jobs", "--state", "running", "--url", live_server.url)
        assert running.returncode == 0, running.stderr
        lines = running.stdout.splitlines()
        assert len(lines) == 1, running.stdout
        assert lines[0].split()[:3] == [running_id, "running", "tokens"]
        everything = cli("jobs", "--url", live_server.url).stdout.splitlines()
        assert [line.split()[:2] for line in everything] == [
            [running_id, "running"], [done_id, "completed"]]
        as_json = cli("jobs", "--state", "completed", "--json", "--url", live_server.url)
        assert [json.loads(line)["id"] for line in as_json.stdout.splitlines()] == [done_id]
        bad = cli("jobs", "--state", "sleeping", "--url", live_server.url)
        assert bad.returncode == 1 and "(400)" in bad.stderr
    finally:
        httpx.delete(f"{live_server.url}/api/jobs/{running_id}", timeout=10)



# demo and serve: who stops the jobs


def start_slow_job(url: str, key: str | None = None, timeout: float = 20) -> Process:
    """Submit a ``tokens`` job that takes minutes; once it streams, its script."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    while True:
        try:
            created = httpx.post(f"{url}/api/jobs", timeout=10, headers=headers, json={
                "template": "tokens", "params": {"text": TEXT, "delay": 5}})
            break
        except httpx.TransportError:  # not listening yet
            assert time.monotonic() < deadline, f"nothing answers at {url}"
            time.sleep(0.05)
    assert created.status_code == 201, created.text
    job_url = f"{url}/api/jobs/{created.json()['id']}"
    while not any(event["type"] == "token" for event in httpx.get(
            f"{job_url}/events", headers=headers, timeout=10).json()["events"]):
        assert time.monotonic() < deadline, "the job never streamed a token"
        time.sleep(0.05)
    return local_job_script(url, created.json()["id"], key)


class Demo(Background):
    """``metis-stream demo`` on a free port, its state in ``state_dir``, once it listens at
    ``url``; ``viewer_url`` is the address it printed, ``key`` the API key in that."""

    def __init__(self, state_dir: Path, env: Mapping[str, str] | None = None) -> None:
        port = free_port()
        super().__init__("demo", "--no-browser", "--port", str(port),
                         env={"METIS_STATE_DIR": str(state_dir), **(env or {})})
        self.wait_for_output("Ctrl-C stops the demo and its jobs")
        found = re.search(r"open (http://\S+)", self.stdout)
        assert found, self.stdout
        self.viewer_url = found.group(1)
        self.url = f"http://127.0.0.1:{port}"
        _, _, fragment = self.viewer_url.partition("#")
        self.key = fragment.removeprefix("key=")
        deadline = time.monotonic() + 20
        while True:  # it prints before it listens
            try:
                httpx.get(f"{self.url}/healthz", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"the demo never listened: {self.stdout}"
                time.sleep(0.05)

    def interrupt(self) -> int:
        """Ctrl-C, and the exit code."""
        self.process.send_signal(signal.SIGINT)
        code, _, err = self.wait(30)
        assert code == 0, err
        return code


def curl_status(base: str, method: str, path: str, *, user: str, key: str | None = None,
                body: str | None = None) -> str:
    """The HTTP status that ``user`` of this machine gets from curl."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", method]
    if key is not None:
        argv += ["-H", f"Authorization: Bearer {key}"]
    if body is not None:
        argv += ["-H", "Content-Type: application/json", "-d", body]
    done = run_as(user, [*argv, base + path])
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_another_local_user_gets_nothing_from_the_demo_without_its_key(
        tmp_path: Path, other_user: str):
    demo = Demo(tmp_path / "state")
    try:
        # Loopback is no trust boundary: this is another account of the same machine.
        job = '{"template": "tokens", "params": {"text": "from another user"}}'
        assert curl_status(demo.url, "POST", "/api/jobs", user=other_user, body=job) == "401"
        assert curl_status(demo.url, "GET", "/api/jobs", user=other_user) == "401"
        assert curl_status(demo.url, "GET", "/api/templates", user=other_user) == "401"
        listed = httpx.get(f"{demo.url}/api/jobs", timeout=10,
                           headers={"Authorization": f"Bearer {demo.key}"})
        assert listed.status_code == 200 and listed.json()["jobs"] == []
        # The key that the demo printed is what lets a client in, whoever it is.
        assert curl_status(demo.url, "GET", "/api/jobs", user=other_user,
                           key=demo.key) == "200"
        demo.interrupt()
    finally:
        demo.stop()
    # A random key per run: the next demo has another.
    again = Demo(tmp_path / "state")
    try:
        assert len(again.key) >= 32 and again.key != demo.key
        again.interrupt()
    finally:
        again.stop()


def test_metis_demo_token_fixes_the_key_for_curl_and_the_cli(tmp_path: Path):
    demo = Demo(tmp_path / "state", env={"METIS_DEMO_TOKEN": "scripted-demo-token"})
    try:
        assert demo.viewer_url == f"{demo.url}/#key=scripted-demo-token"
        assert "METIS_API_KEY=scripted-demo-token" in demo.stdout
        by_cli = cli("jobs", env={"METIS_URL": demo.url, "METIS_API_KEY": "scripted-demo-token"})
        assert by_cli.returncode == 0, by_cli.stderr
        without = cli("jobs", env={"METIS_URL": demo.url})
        assert without.returncode == 1 and "(401)" in without.stderr
        demo.interrupt()
    finally:
        demo.stop()


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_serve_without_api_keys_refuses_to_start_and_says_what_to_do(
        tmp_path: Path, workers: list[str]):
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {free_port()}\nstate_dir = "{tmp_path / "state"}"\n'
                      + LOCAL_CLUSTER + EXAMPLE_TEMPLATES)
    done = cli("serve", "--config", str(config), *workers, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("metis-stream: refusing to serve without API keys"), \
        done.stderr
    for hint in ("metis-stream new-key", "insecure_no_auth = true", "every user of this machine"):
        assert hint in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("keys", "message"), [
    ('api_keys = ["k"]\n[server.keys.web]\nkey = "k"\n',
     "[server] api_keys (or METIS_API_KEYS) and [server.keys.web] give the same key: a key "
     "has one name and one role; remove one of them"),
    ('[server.keys.web]\nkey = "k"\nrole = "owner"\n',
     "[server.keys.web]: role must be one of client, admin, not 'owner': a client key sees "
     "the jobs it created, an admin key every job"),
])
def test_serve_refuses_a_bad_key_and_says_which(tmp_path: Path, keys: str, message: str):
    config = tmp_path / "config.toml"
    config.write_text(f'[server]\nport = {free_port()}\nstate_dir = "{tmp_path / "state"}"\n'
                      + keys + LOCAL_CLUSTER + EXAMPLE_TEMPLATES)
    done = cli("serve", "--config", str(config), timeout=30)
    assert (done.returncode, done.stderr) == (2, f"metis-stream: {message}\n")


def test_serve_with_insecure_no_auth_starts_and_says_so_loudly(tmp_path: Path):
    server = ServerProcess(state_dir=tmp_path / "server",
                           server_settings={"insecure_no_auth": True})
    server.start()
    try:
        assert httpx.get(f"{server.url}/api/jobs", timeout=10).status_code == 200
        assert "INSECURE: insecure_no_auth = true" in server.log()
    finally:
        server.stop()


def wait_for_group_to_end(group: int, timeout: float) -> list[str]:
    """The command lines of the group's processes still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := process_group(group)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [command_line(process.pid) for process in left]


def test_stopping_the_demo_stops_the_jobs_it_started(tmp_path: Path):
    demo = Demo(tmp_path / "state")
    script = None
    try:
        script = start_slow_job(demo.url, demo.key)
        demo.interrupt()
        assert wait_for_group_to_end(script.pid, 5) == []
    finally:
        demo.stop()
        if script is not None:
            end_group(script)


def test_a_stopped_server_leaves_its_local_jobs_running(tmp_path: Path):
    """As a cluster's scheduler would: a server's restart must not end its jobs."""
    server = ServerProcess(state_dir=tmp_path / "server")
    server.start()
    try:
        script = start_slow_job(server.url)
    finally:
        server.stop()
    try:
        assert process_group(script.pid), "the job was stopped with its server"
    finally:
        end_group(script)
