"""The launcher (``metis-emit run``): a batch script runs unchanged, its output goes to
the job's files and, line by line, to ``log`` events; its exit status is kept; the end
is reported for it. Real ``dash``, ``curl`` and ``awk`` against the stub of the events
route from test_metis_emit; the test on the real server and cluster is elsewhere.
"""

# The stub's fixtures are imported, and named again by every test that uses them:
# ruff: noqa: F811
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.test_metis_emit import (  # noqa: F401
    SCRIPT,
    SHELLS,
    Stub,
    closed_port_url,
    env,
    spooled,
    stub,
    without_curl,
)

pytestmark = pytest.mark.skipif(not SHELLS, reason="needs a POSIX shell")


def launch(env: dict[str, str], folder: Path, body: str, *, extra: dict[str, str] | None = None,
           shell: list[str] | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess[bytes]:
    """Run ``body`` (an sh script) under the launcher; the job's folder is folder/job."""
    script = folder / "script.sh"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o700)
    run_env = {**env, "METIS_JOB_DIR": str(folder / "job"), **(extra or {})}
    return subprocess.run([*(shell or ["dash"]), str(SCRIPT), "run", str(script)],
                          capture_output=True, env=run_env, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def log_lines(stub: Stub, stream: str | None = None) -> list[str]:
    return [line for e in stub.events if e["type"] == "log"
            and (stream is None or e["data"]["stream"] == stream)
            for line in e["data"]["lines"]]


def terminal(stub: Stub) -> list[dict[str, Any]]:
    return [e for e in stub.events if e["type"] in ("completed", "fatal")]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_an_unmodified_script_streams_its_lines_and_completes(
        stub: Stub, env: dict[str, str], tmp_path: Path, shell: list[str]) -> None:
    body = ('i=1; while [ $i -le 20 ]; do echo "line $i"; echo "warn $i" >&2; '
            'i=$((i + 1)); done\nprintf "no newline at the end"\n')
    done = launch(env, tmp_path, body, shell=shell)
    assert done.returncode == 0, done.stderr
    # Nothing of the launcher's own (its stderr is the scheduler's launcher.err): a
    # shell's "Killed" for a helper it stopped there once worried users.
    assert done.stderr == b""
    job = tmp_path / "job"
    stdout = "".join(f"line {i}\n" for i in range(1, 21)) + "no newline at the end"
    assert (job / "stdout").read_text() == stdout
    assert (job / "stderr").read_text() == "".join(f"warn {i}\n" for i in range(1, 21))
    assert (job / "exit").read_text() == "0\n"
    assert log_lines(stub, "stdout") == stdout.split("\n")
    assert log_lines(stub, "stderr") == [f"warn {i}" for i in range(1, 21)]
    assert stub.events[-1]["type"] == "completed"
    assert stub.events[-1]["data"] == {"exit_status": 0}
    assert len(terminal(stub)) == 1
    # Fewer events than lines: lines that came together went together.
    assert len([e for e in stub.events if e["type"] == "log"]) < 41
    assert oct((job / "stdout").stat().st_mode & 0o777) == "0o600"


def test_a_failing_script_is_fatal_with_its_status_and_last_stderr_lines(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    body = ('i=1; while [ $i -le 30 ]; do echo "err $i" >&2; i=$((i + 1)); done\n'
            'echo "ValueError: bad input" >&2\nexit 3\n')
    done = launch(env, tmp_path, body, extra={"METIS_STDERR_TAIL_LINES": "5"})
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "job" / "exit").read_text() == "3\n"
    [end] = terminal(stub)
    assert end == stub.events[-1]
    assert end["type"] == "fatal"
    assert end["data"] == {
        "error": "the script exited with status 3", "exit_status": 3,
        "stderr_tail": ["err 27", "err 28", "err 29", "err 30", "ValueError: bad input"]}


def test_a_script_killed_by_a_signal_names_it(stub: Stub, env: dict[str, str],
                                              tmp_path: Path) -> None:
    done = launch(env, tmp_path, 'echo "about to die" >&2\nkill -s KILL $$\n')
    assert done.returncode == 128 + signal.SIGKILL
    assert (tmp_path / "job" / "exit").read_text() == "137 SIGKILL\n"
    [end] = terminal(stub)
    assert end["data"] == {"error": "the script was killed by signal 9 (SIGKILL)",
                           "exit_status": 137, "signal": "SIGKILL",
                           "stderr_tail": ["about to die"]}


def test_a_script_that_reports_its_end_is_not_doubled(stub: Stub, env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """Its own terminal event comes after every line it printed before it, once."""
    body = ('"$METIS_EMIT" step "Working"\n'
            'i=1; while [ $i -le 50 ]; do echo "line $i"; i=$((i + 1)); done\n'
            '"$METIS_EMIT" completed \'{"answer": 42}\'\n'
            '"$METIS_EMIT" fatal "too late" && exit 9\n'
            'echo "after the end"\nexit 1\n')
    done = launch(env, tmp_path, body)
    assert done.returncode == 1, done.stderr
    assert "already reported its end" in (tmp_path / "job" / "stderr").read_text()
    types = stub.types()
    assert types[0] == "step"
    assert types[-1] == "completed"
    assert stub.events[-1]["data"] == {"answer": 42}
    assert len(terminal(stub)) == 1
    assert log_lines(stub, "stdout") == [f"line {i}" for i in range(1, 51)] + ["after the end"]


def test_the_output_budget_holds_and_the_files_keep_everything(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    count = 20_000
    body = f'awk \'BEGIN {{ for (i = 1; i <= {count}; i++) print "line " i }}\'\n'
    done = launch(env, tmp_path, body,
                  extra={"METIS_LOG_MAX_EVENTS": "5", "METIS_LOG_MAX_BYTES": "1000000"})
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "job" / "stdout").read_text().splitlines()
    assert lines == [f"line {i}" for i in range(1, count + 1)]
    logs = [e for e in stub.events if e["type"] == "log"]
    assert len(logs) <= 5
    notices = [e for e in logs if e["data"]["stream"] == "notice"]
    assert len(notices) == 1 and notices[0] is logs[-1]
    sent = log_lines(stub, "stdout")
    assert sent == lines[:len(sent)]
    assert notices[0]["data"]["lines"] == [
        f"output truncated after {len(sent)} lines; the files hold all of it"]
    assert stub.events[-1]["type"] == "completed"


def test_the_byte_budget_holds(stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    body = 'i=1; while [ $i -le 300 ]; do echo "0123456789"; i=$((i + 1)); done\n'
    done = launch(env, tmp_path, body, extra={"METIS_LOG_MAX_BYTES": "1000"})
    assert done.returncode == 0, done.stderr
    sent = log_lines(stub, "stdout")
    assert sum(len(line) for line in sent) <= 1000
    assert len(sent) == 100
    assert log_lines(stub, "notice") == [
        "output truncated after 100 lines; the files hold all of it"]


def test_hostile_output_never_breaks_the_stream(stub: Stub, env: dict[str, str],
                                                tmp_path: Path) -> None:
    big = "é" + "x" * (1 << 20) + "€"  # 1 MB and more, with characters at the cuts
    (tmp_path / "big.txt").write_text(big + "\n")
    body = (f'cat {tmp_path / "big.txt"}\n'
            r"printf 'bad \377\376 utf8 \303(\n'" "\n"
            r"printf 'progress 10%%\rprogress 50%%\rprogress 100%%\n'" "\n"
            r"printf 'windows line\r\n'" "\n"
            "printf 'nulZbyte\\n' | tr Z '\\000'\n"
            r"printf '\033[1;31mred\033[0m\n'" "\n"
            'echo done\n')
    done = launch(env, tmp_path, body, extra={"METIS_LOG_MAX_BYTES": "4000000"})
    assert done.returncode == 0, done.stderr
    sent = log_lines(stub, "stdout")
    tail = ["bad \ufffd\ufffd utf8 \ufffd(", "progress 100%", "windows line",
            "nul\ufffdbyte", "\x1b[1;31mred\x1b[0m", "done"]
    assert sent[-len(tail):] == tail
    pieces = sent[:-len(tail)]
    assert len(pieces) > 1 and all(len(p.encode()) < 4096 for p in pieces)
    assert "".join(pieces) == big
    assert stub.events[-1]["type"] == "completed"
    raw = (tmp_path / "job" / "stdout").read_bytes()
    assert b"bad \377\376 utf8 \303(\n" in raw and b"nul\000byte" in raw


def test_without_capture_the_files_and_the_end_remain(stub: Stub, env: dict[str, str],
                                                      tmp_path: Path) -> None:
    done = launch(env, tmp_path, "echo out\necho err >&2\nexit 4\n",
                  extra={"METIS_CAPTURE": "0"})
    assert done.returncode == 4
    assert (tmp_path / "job" / "stdout").read_text() == "out\n"
    assert (tmp_path / "job" / "stderr").read_text() == "err\n"
    assert stub.types() == ["fatal"]
    assert stub.events[0]["data"]["stderr_tail"] == ["err"]


def test_a_killed_job_keeps_its_status_and_leaves_the_end_to_the_server(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    """As a scheduler kills a job (walltime, qdel): SIGTERM to every process of it."""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho started\necho 'last words' >&2\nexec sleep 60\n")
    script.chmod(0o700)
    process = subprocess.Popen(
        ["dash", str(SCRIPT), "run", str(script)], start_new_session=True,
        env={**env, "METIS_JOB_DIR": str(tmp_path / "job")},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert stub.wait_for(lambda: len(log_lines(stub)) == 2), stub.events
        os.killpg(process.pid, signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert (tmp_path / "job" / "exit").read_text() == "143 SIGTERM\n"
    assert (tmp_path / "job" / "stderr").read_text() == "last words\n"
    assert log_lines(stub, "stdout") == ["started"]
    assert log_lines(stub, "stderr") == ["last words"]
    assert terminal(stub) == []
    assert b"stopped by SIGTERM" in stderr


def test_a_child_left_running_does_not_hold_the_job(stub: Stub, env: dict[str, str],
                                                    tmp_path: Path) -> None:
    started = time.monotonic()
    pid_file = tmp_path / "child.pid"
    try:
        done = launch(env, tmp_path, f"echo parent\nsleep 30 &\necho $! > {pid_file}\n",
                      extra={"METIS_RUN_GRACE": "1"})
    finally:
        # The child is the test's to end, as a scheduler ends what a job leaves behind.
        os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert time.monotonic() - started < 10
    assert done.returncode == 0
    assert b"left its output open" in done.stderr
    assert log_lines(stub) == ["parent"]
    assert stub.types()[-1] == "completed"


def test_an_idle_job_holds_no_connection(stub: Stub, env: dict[str, str],
                                         tmp_path: Path) -> None:
    """The stream's request ends after 2 s without output and the next line opens another:
    a server can restart at once, without waiting for its jobs' requests to end."""
    done = launch(env, tmp_path, "echo first\nsleep 3\necho second\n")
    assert done.returncode == 0, done.stderr
    assert log_lines(stub) == ["first", "second"]
    streams = [r for r in stub.posts() if r.chunked]
    assert len(streams) == 2
    assert [r.status for r in streams] == [200, 200]


def test_a_job_the_server_ended_gets_no_end_from_the_launcher(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    """The script's own metis-emit met a 409 (the job was cancelled, or ended by an event
    posted for it): the launcher does not post an end the server would refuse."""
    stub.ended = True
    done = launch(env, tmp_path, '"$METIS_EMIT" step "late" || exit\n')
    assert done.returncode == 5
    assert (tmp_path / "job" / "ended").exists()
    assert stub.events == []
    # The script's step; then only the stream (its stderr said why it stopped).
    assert [r.status for r in stub.posts() if not r.chunked] == [409]


def test_a_job_whose_token_is_gone_does_not_wait_for_the_server(
        env: dict[str, str], tmp_path: Path) -> None:
    """The server removes a job's token file when the job ends: its last lines would be
    refused, so the launcher does not wait minutes for a server that has gone away."""
    script = tmp_path / "script.sh"
    script.write_text('#!/bin/sh\necho "last line"\nrm -f "$METIS_TOKEN_FILE"\nexit 3\n')
    script.chmod(0o700)
    run_env = {**env, "METIS_JOB_DIR": str(tmp_path / "job"),
               "METIS_EVENTS_URL": "http://127.0.0.1:9/api/jobs/j_test01/events"}
    started = time.monotonic()
    # Its own process group, as a batch job's top process has.
    process = subprocess.Popen(["dash", str(SCRIPT), "run", str(script)], env=run_env,
                               start_new_session=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert process.wait(timeout=30) == 3
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert time.monotonic() - started < 15
    assert (tmp_path / "job" / "exit").read_text() == "3\n"
    assert (tmp_path / "job" / "stdout").read_text() == "last line\n"


# ---------------------------------------------------------------------------
# The spool (METIS_DELIVERY spool or both): jobs/<id>/events.ndjson

SPOOL_SCRIPT = ('echo "line 1"\necho "warn 1" >&2\n"$METIS_EMIT" step "Working"\n'
                'echo "line 2"\n')


def spool_lines(events: list[dict[str, Any]], stream: str) -> list[str]:
    return [line for e in events if e["type"] == "log" and e["data"]["stream"] == stream
            for line in e["data"]["lines"]]


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_in_spool_mode_a_job_sends_nothing_and_spools_everything(
        stub: Stub, env: dict[str, str], tmp_path: Path, shell: list[str]) -> None:
    """The output lines, the script's own events and the end, in the spool; no curl."""
    spool_mode, curl_mark = without_curl({**env, "METIS_DELIVERY": "spool"}, tmp_path)
    done = launch(spool_mode, tmp_path, SPOOL_SCRIPT + "exit 3\n", shell=shell)
    assert done.returncode == 3, done.stderr
    job = tmp_path / "job"
    events = spooled(job)
    assert spool_lines(events, "stdout") == ["line 1", "line 2"]
    assert spool_lines(events, "stderr") == ["warn 1"]
    assert [e["data"] for e in events if e["type"] == "step"] == ["Working"]
    assert events[-1]["type"] == "fatal"
    assert events[-1]["data"] == {"error": "the script exited with status 3", "exit_status": 3,
                                  "stderr_tail": ["warn 1"]}
    assert oct((job / "events.ndjson").stat().st_mode & 0o777) == "0o600"
    assert stub.requests == []
    assert not curl_mark.exists()


def test_in_spool_mode_the_scripts_own_end_comes_after_its_lines(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    body = ('i=1; while [ $i -le 30 ]; do echo "line $i"; i=$((i + 1)); done\n'
            '"$METIS_EMIT" completed \'{\n  "answer": 42\n}\'\necho "after the end"\n')
    done = launch({**env, "METIS_DELIVERY": "spool"}, tmp_path, body)
    assert done.returncode == 0, done.stderr
    events = spooled(tmp_path / "job")
    assert spool_lines(events, "stdout") == [f"line {i}" for i in range(1, 31)] + [
        "after the end"]
    assert [e["type"] for e in events if e["type"] != "log"] == ["completed"]
    assert events[-1]["data"] == {"answer": 42}
    assert stub.requests == []


def test_in_both_mode_the_spool_holds_what_the_server_got(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    stub.spool = tmp_path / "job" / "events.ndjson"
    done = launch({**env, "METIS_DELIVERY": "both"}, tmp_path, SPOOL_SCRIPT)
    assert done.returncode == 0, done.stderr
    events = spooled(tmp_path / "job")
    assert sorted(e["id"] for e in stub.events) == sorted(e["id"] for e in events)
    # The launcher's stream and the script's metis-emit write side by side: the order is
    # the same within each.
    for kinds in ({"log"}, {"step", "completed"}):
        assert [e["id"] for e in stub.events if e["type"] in kinds] == [
            e["id"] for e in events if e["type"] in kinds]
    assert spool_lines(events, "stdout") == ["line 1", "line 2"]
    assert stub.events[-1]["type"] == events[-1]["type"] == "completed"
    assert stub.not_yet_spooled == []
    assert not (tmp_path / "job" / "spool-only").exists()


def test_in_both_mode_a_job_that_cannot_reach_the_server_loses_nothing(
        stub: Stub, env: dict[str, str], tmp_path: Path) -> None:
    both = {**env, "METIS_DELIVERY": "both", "METIS_EMIT_RETRIES": "0",
            "METIS_EVENTS_URL": closed_port_url()}
    body = SPOOL_SCRIPT + 'echo "step said $?"\n'
    done = launch(both, tmp_path, body)
    assert done.returncode == 0, done.stderr
    job = tmp_path / "job"
    assert (job / "spool-only").exists()
    events = spooled(job)
    assert spool_lines(events, "stdout") == ["line 1", "line 2", "step said 0"]
    assert [e["data"] for e in events if e["type"] == "step"] == ["Working"]
    assert events[-1]["type"] == "completed"
    assert b"the server will read" in done.stderr + (job / "stderr").read_bytes()


@pytest.mark.parametrize("shell", SHELLS, ids=lambda s: s[0])
def test_the_job_folders_env_files_become_the_scripts_variables(
        stub: Stub, env: dict[str, str], tmp_path: Path, shell: list[str]) -> None:
    """Values that could not travel in the scheduler's -v list: exactly, newlines and all;
    never run; a name that is no variable's is ignored; the job's own variable is kept."""
    values = {
        "MULTI": b'two\nlines "double" \'single\' $(touch pwned) `touch pwned` \\ $HOME\n\n',
        "SPACES": b"  a  b  ",
        "EMPTY": b"",
        "UTF8": "é € 🎉".encode(),
        "_UNDER_1": b"u",
        "KEPT": b"from the file",
    }
    folder = tmp_path / "job" / "env"
    folder.mkdir(parents=True)
    for name, value in values.items():
        (folder / name).write_bytes(value)
    for bad in ("lower", "9LIVES", "A-B"):
        (folder / bad).write_bytes(b"x")
    out = tmp_path / "out"
    out.mkdir()
    body = (f'cd "{out}"\n'
            'for name in MULTI SPACES EMPTY UTF8 _UNDER_1 KEPT; do\n'
            '    eval "printf %s \\"\\$$name\\"" > "$name"\n'
            'done\n'
            'echo "${lower-unset}" > lower\n')
    done = launch(env, tmp_path, body, shell=shell, extra={"KEPT": "from the job"})
    assert done.returncode == 0, done.stderr
    for name, value in values.items():
        expected = b"from the job" if name == "KEPT" else value
        assert (out / name).read_bytes() == expected, name
    assert (out / "lower").read_text() == "unset\n"
    assert not (out / "pwned").exists()
    for bad in ("lower", "9LIVES", "A-B"):
        assert f"ignored {folder / bad}: not a variable name".encode() in done.stderr


def test_in_spool_mode_a_job_needs_no_token(stub: Stub, env: dict[str, str],
                                            tmp_path: Path) -> None:
    """A missing token file tells an HTTP job that the server ended it; in spool mode
    there is no token, and no request to stop: the end is reported all the same."""
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nawk 'BEGIN { for (i = 1; i <= 3000; i++) print \"line \" i }'\n")
    script.chmod(0o700)
    run_env = {**env, "METIS_DELIVERY": "spool", "METIS_JOB_DIR": str(tmp_path / "job"),
               "METIS_TOKEN_FILE": str(tmp_path / "no-token")}
    process = subprocess.Popen(["dash", str(SCRIPT), "run", str(script)], env=run_env,
                               start_new_session=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, stderr
    events = spooled(tmp_path / "job")
    assert spool_lines(events, "stdout") == [f"line {i}" for i in range(1, 3001)]
    assert events[-1]["type"] == "completed"
