"""The suite's check that it leaves nothing running (tests/support/leaks.py), run on a
small suite of its own in a pytest subprocess."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.processes import find

ROOT = Path(__file__).parent.parent

STRAYS = """
import subprocess


def test_that_waits_for_its_child():
    subprocess.run(["sleep", "0.1"], check=True)


def test_that_leaves_a_child():
    subprocess.Popen(["sleep", "301"])


def test_that_leaves_an_orphan(tmp_path):
    # The shell exits at once: its background sleep is nobody's child in this run, and is
    # found by its working folder, as a job whose server stopped would be.
    subprocess.run(["sh", "-c", "sleep 302 >/dev/null 2>&1 &"], cwd=tmp_path, check=True)
"""


def test_a_run_that_leaves_processes_running_fails_naming_the_tests(
        pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_strays=STRAYS)
    result = pytester.runpytest_subprocess("-p", "tests.support.leaks",
                                           "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=3, errors=2)
    output = result.stdout.str()
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_that_leaves_a_child*",
        "*pid * sleep 301",
        "*ERROR at teardown of test_that_leaves_an_orphan*",
        "*pid * sleep 302",
    ])
    assert "test_that_waits_for_its_child" not in output
    # ... and then killed them.
    pids = [int(pid) for pid in re.findall(r"pid (\d+): sleep 30[12]", output)]
    assert len(pids) == 2
    assert all(process is None or not process.running
               for process in map(find, pids)), output


def test_a_run_that_leaves_nothing_running_passes(pytester: pytest.Pytester,
                                                  monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pytester.makepyfile(test_tidy="""
        import subprocess

        def test_tidy(tmp_path):
            subprocess.run(["sleep", "0.1"], cwd=tmp_path, check=True)
    """)
    result = pytester.runpytest_subprocess("-p", "tests.support.leaks",
                                           "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)
