"""A check that the test suite leaves nothing running (a pytest plugin).

After each test it notes the processes that appeared while the test ran and that the
suite started. Once the tests of a file are done, and its fixtures torn down, any of
their processes still running is an error of the test that started it, naming the
process's pid and command line; the process is then killed, so that even a failed run
leaves nothing behind. When the session ends, the same holds for the processes that
may run until then: those that use a folder which a session-wide fixture declared with
``watch_folder(..., session_wide=True)`` (the shared Redis, even restarted by a test;
the test cluster's daemons, and its jobs, which the cluster's fixture ends). Checking
each file, not only the session's end, also catches a job that would have ended by
itself, but only after minutes of retrying against a server long gone.

Which processes are the suite's. A process a test starts is at first a descendant of
this pytest process, but it need not stay one: the local scheduler starts each job in a
session of its own, and a job whose server stopped is reparented to init; Slurm runs a
cluster job under slurmstepd, which slurmd detaches from itself. So a process is the
suite's too when it works in one of the suite's folders, or names one in its arguments
or environment: pytest's base temporary folder (every server's state folder is in it,
and with it every local job's folder and token file) and the test cluster's state
folder (``SLURM_CONF`` of every cluster job points there).

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
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.processes import (
    Process,
    command_line,
    descendants,
    find,
    folders_used,
    processes,
)

GRACE = 5.0
"""Seconds that the suite's processes still running when they are checked get to exit:
a process sent SIGTERM by the last teardown may take a moment."""

Key = tuple[int, int]
"""A process: its pid and start time."""


@dataclass
class LeakCheck:
    folders: dict[Path, bool] = field(default_factory=dict)
    """The suite's folders, each with whether its processes may run until the session
    ends."""
    known: set[Key] = field(default_factory=set)
    """Every process seen so far, the suite's or not."""
    started: dict[Key, pytest.Item] = field(default_factory=dict)
    """The suite's processes not yet checked, each with the test during which it
    appeared."""
    session_wide: set[Key] = field(default_factory=set)
    """The suite's processes that may run until the session ends."""

    def note(self, item: pytest.Item) -> None:
        """Attribute to ``item`` the suite's processes that appeared since the last call."""
        table = processes()
        ours = {process.key for process in descendants(os.getpid(), table)}
        for process in table.values():
            if process.key in self.known:
                continue
            self.known.add(process.key)
            if not process.running:
                continue
            used = folders_used(process.pid, self.folders)
            if process.key in ours or used:
                self.started[process.key] = item
            if any(self.folders[folder] for folder in used):
                self.session_wide.add(process.key)
        # What a session-wide process starts may run as long as it does, wherever it works
        # (slurmctld's slurmscriptd, the sessions of the cluster's sshd).
        for process in table.values():
            if process.key in self.session_wide:
                self.session_wide.update(below.key for below in descendants(process.pid, table))

    def check(self, session: pytest.Session, which: Callable[[Key, pytest.Item], bool],
              when: str) -> None:
        """Report the processes that ``which`` selects still running after GRACE as
        errors of the tests that started them, and kill them."""
        chosen = {key: item for key, item in self.started.items() if which(key, item)}
        for key in chosen:
            del self.started[key]
        leaked = _still_running(chosen, GRACE)
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
            # A failed teardown report: counted as an error of the test, and in the exit
            # status of the run.
            text = f"left running {when} (then killed):\n" + "\n".join(
                f"  {line}" for line in lines)
            session.config.hook.pytest_runtest_logreport(report=pytest.TestReport(
                nodeid=item.nodeid, location=item.location, keywords={}, outcome="failed",
                longrepr=text, when="teardown"))
        _kill(doomed)


def _still_running(chosen: dict[Key, pytest.Item], grace: float
                   ) -> list[tuple[Process, pytest.Item]]:
    deadline = time.monotonic() + grace
    while True:
        alive = [(process, item) for (pid, started), item in chosen.items()
                 if (process := find(pid)) and process.started == started and process.running]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _kill(doomed: list[Process]) -> None:
    for process in doomed:
        now = find(process.pid)
        if now is not None and now.started == process.started:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(process.pid, signal.SIGKILL)


CHECK = pytest.StashKey[LeakCheck]()


def watch_folder(config: pytest.Config, folder: Path, *, session_wide: bool = False) -> None:
    """Count the processes that work in ``folder``, or name it in their arguments or
    environment, among the suite's; with ``session_wide``, they may run until the
    session ends."""
    config.stash[CHECK].folders[folder.resolve()] = session_wide


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
    check = item.config.stash[CHECK]
    result = yield
    check.note(item)
    if nextitem is None or nextitem.path != item.path:
        # The file's fixtures are torn down: what its tests started must be gone.
        check.check(item.session, lambda key, started_by: started_by.path == item.path
                    and key not in check.session_wide, "after the tests of its file")
    return result


# trylast: after pytest's own pytest_sessionfinish, which tears down the fixtures that a
# run stopped early (-x) left set up.
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    failed = session.testsfailed
    session.config.stash[CHECK].check(session, lambda key, started_by: True,
                                      "when the session ended")
    if session.testsfailed > failed and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
