"""Fixtures shared by the test suite. Each service fixture lives in tests/support/."""

from __future__ import annotations

import signal
from collections.abc import Generator

import pytest

from tests.support import IN_CI

pytest_plugins = [
    "pytester",
    "tests.support.leaks",
    "tests.support.server",
    "tests.support.redis_server",
    "tests.support.cluster",
    "tests.support.users",
]


def pytest_configure(config: pytest.Config) -> None:
    # SIGTERM ends the run as Ctrl-C does, fixtures torn down: `./dev test` stops its
    # second pytest so when the first is interrupted, and a test cluster's daemons and
    # jobs must not outlive the run.
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """In CI a skipped test is a failed one: every service the tests need must be there."""
    report: pytest.TestReport = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"
    return report
