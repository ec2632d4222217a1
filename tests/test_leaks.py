"""The suite's check that it leaves nothing running (tests/support/leaks.py), run on a
small suite of its own in a pytest subprocess."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.processes import find

ROOT = Path(__file__).parent.parent

CONFTEST = """
import os
import signal
import subprocess

import pytest

from tests.support.leaks import watch_folder


def start_daemon(config, folder, seconds):
    watch_folder(config, folder, session_wide=True)
    # The shell names the folder (as its $0); its child does not, and is the daemon's
    # all the same.
    return subprocess.Popen(["sh", "-c", f"sleep {seconds} & wait", str(folder)], cwd="/",
                            start_new_session=True)


@pytest.fixture(scope="session")
def daemon(pytestconfig, tmp_path_factory):
    process = start_daemon(pytestconfig, tmp_path_factory.mktemp("daemon"), "600")
    yield process
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture(scope="session")
def forgotten_daemon(pytestconfig, tmp_path_factory):
    yield start_daemon(pytestconfig, tmp_path_factory.mktemp("forgotten"), "303")
"""

FIRST = """
import subprocess


def test_that_waits_for_its_child(daemon, tmp_path):
    subprocess.run(["sleep", "0.1"], cwd=tmp_path, check=True)


def test_that_leaves_a_child(daemon):
    subprocess.Popen(["sleep", "301"])


def test_whose_session_fixture_leaves_a_process(forgotten_daemon):
    pass
"""

SECOND = """
import subprocess


def test_that_leaves_an_orphan(daemon, tmp_path):
    # The shell exits at once: its background sleep is nobody's child in this run, and is
    # found by its working folder, as a job whose server stopped would be.
    subprocess.run(["sh", "-c", "sleep 302 >/dev/null 2>&1 &"], cwd=tmp_path, check=True)
"""


def run_suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch,
              **files: str) -> pytest.RunResult:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(**files)
    return pytester.runpytest_subprocess("-p", "tests.support.leaks", "-p", "no:cacheprovider")


def test_a_run_that_leaves_processes_running_fails_naming_the_tests(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    result = run_suite(pytester, monkeypatch, conftest=CONFTEST, test_first=FIRST,
                       test_second=SECOND)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=4, errors=3)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_that_leaves_a_child*",
        "left running after the tests of its file (then killed):",
        "  pid *: sleep 301",
        "*ERROR at teardown of test_that_leaves_an_orphan*",
        "left running after the tests of its file (then killed):",
        "  pid *: sleep 302",
        "*ERROR at teardown of test_whose_session_fixture_leaves_a_process*",
        "left running when the session ended (then killed):",
        "  pid *: sh -c sleep 303 & wait */forgotten0 (and 1 process it started)",
    ])
    output = result.stdout.str()
    assert "test_that_waits_for_its_child" not in output
    assert "sleep 600" not in output, "a session fixture's process may outlive a file"
    # ... and then killed them. (Each pid may be named twice: with CI set, pytest repeats
    # the errors untruncated in its short summary.)
    pids = {int(pid) for pid in re.findall(r"pid (\d+): ", output)}
    assert len(pids) == 3
    assert all(process is None or not process.running
               for process in map(find, pids)), output


def test_a_run_that_leaves_nothing_running_passes(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch):
    result = run_suite(pytester, monkeypatch, conftest=CONFTEST, test_tidy="""
        import subprocess

        def test_tidy(daemon, tmp_path):
            subprocess.run(["sleep", "0.1"], cwd=tmp_path, check=True)
    """)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)
