"""A check that the test suite leaves nothing running (a pytest plugin).

After each test it notes the processes that appeared while the test ran and that the
suite started. When the session ends, any of them still running fails the run: an error
names the test, the process's pid and its command line. The process is then killed, so
that even a failed run leaves nothing behind.

Which processes are the suite's. A process a test starts is at first a descendant of
this pytest process, but it need not stay one: the local scheduler starts each job in a
session of its own, and a job whose server stopped is reparented to init; Slurm runs a
cluster job under slurmstepd, which slurmd detaches from itself. So a process is the
suite's too when it works in one of the suite's folders, or names one in its
environment: pytest's base temporary folder (every server's state folder is in it, and
with it every local job's folder and token file) and the test cluster's state folder
(``SLURM_CONF`` of every cluster job points there).

Why not make pytest a child subreaper (``PR_SET_CHILD_SUBREAPER``), so that orphans
stay its descendants: they would become its children, and each would stay a zombie
until pytest reaped it. Reaping with ``waitpid(-1)`` would steal exit statuses from the
tests' own ``Popen`` objects, and a test that waits for a killed job's pid to disappear
would wait on a zombie. Reading /proc changes nothing in what it watches.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import Process, command_line, descendants, find, processes, uses_folder

GRACE = 5.0
"""Seconds that the suite's processes still running when the session ends get to exit:
a process sent SIGTERM by the last teardown may take a moment."""


@dataclass
class LeakCheck:
    folders: list[Path] = field(default_factory=list)
    known: set[tuple[int, int]] = field(default_factory=set)
    """Every process seen so far, the suite's or not."""
    started: dict[tuple[int, int], pytest.Item] = field(default_factory=dict)
    """The suite's processes, each with the test during which it appeared."""

    def note(self, item: pytest.Item) -> None:
        table = processes()
        ours = {process.key for process in descendants(os.getpid(), table)}
        for process in table.values():
            if process.key in self.known:
                continue
            self.known.add(process.key)
            if process.running and (process.key in ours
                                    or uses_folder(process.pid, self.folders)):
                self.started[process.key] = item

    def still_running(self, grace: float) -> list[tuple[Process, pytest.Item]]:
        deadline = time.monotonic() + grace
        while True:
            alive = [(process, item) for (pid, started), item in self.started.items()
                     if (process := find(pid)) and process.started == started
                     and process.running]
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.1)


CHECK = pytest.StashKey[LeakCheck]()


def watch_folder(config: pytest.Config, folder: Path) -> None:
    """Count the processes that work in ``folder``, or name it in their environment,
    among the suite's."""
    config.stash[CHECK].folders.append(folder.resolve())


def pytest_configure(config: pytest.Config) -> None:
    config.stash[CHECK] = LeakCheck()


def pytest_sessionstart(session: pytest.Session) -> None:
    """What runs already is not the suite's."""
    session.config.stash[CHECK].known.update(process.key for process in processes().values())


@pytest.fixture(scope="session", autouse=True)
def _suite_temporary_folder(pytestconfig: pytest.Config,
                            tmp_path_factory: pytest.TempPathFactory) -> None:
    watch_folder(pytestconfig, tmp_path_factory.getbasetemp())


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None
                            ) -> Generator[None, object, object]:
    result = yield
    item.config.stash[CHECK].note(item)
    return result


# trylast: after pytest's own pytest_sessionfinish, which tears down the fixtures that a
# run stopped early (-x) left set up.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    leaked = session.config.stash[CHECK].still_running(GRACE)
    if not leaked:
        return
    table = processes()
    leaked_pids = {process.pid for process, _ in leaked}
    by_test: dict[pytest.Item, list[str]] = {}
    doomed: list[Process] = []
    for process, item in leaked:
        below = descendants(process.pid, table)
        doomed += [process, *below]
        if process.ppid in leaked_pids:
            continue  # part of a leaked process's tree: named with it
        line = f"pid {process.pid}: {command_line(process.pid)}"
        if below:
            line += f" (and {len(below)} process{'es' if len(below) > 1 else ''} it started)"
        by_test.setdefault(item, []).append(line)
    for item, lines in by_test.items():
        text = ("left running when the session ended (then killed):\n"
                + "\n".join(f"  {line}" for line in lines))
        session.config.hook.pytest_runtest_logreport(report=pytest.TestReport(
            nodeid=item.nodeid, location=item.location, keywords={}, outcome="failed",
            longrepr=text, when="teardown"))
    _kill(doomed)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _kill(doomed: list[Process]) -> None:
    for process in doomed:
        now = find(process.pid)
        if now is not None and now.started == process.started:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(process.pid, signal.SIGKILL)
