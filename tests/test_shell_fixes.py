"""Regression tests for bugs that the end-to-end tests (tests/test_cluster_e2e.py) found in
the SSH shell and the batch scheduler."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from metis_stream.schedulers import pbs
from metis_stream.schedulers.base import Submission
from metis_stream.schedulers.batch import BatchScheduler
from metis_stream.shells.base import CommandResult
from metis_stream.templates import Template
from tests.support.cluster import TestCluster
from tests.support.samples import ok
from tests.support.shells import FakeShell, ssh_shell


@pytest.mark.cluster
async def test_a_refused_session_waits_for_a_free_one(test_cluster: TestCluster) -> None:
    """sshd (MaxSessions 10) refuses an 11th channel. With the SFTP channel open and
    max_sessions=10, the 10th command is refused at first; it must wait for a channel to
    close on the server's side and run, not fail (20 jobs submitted at once hit this:
    sshd frees a session a moment after the client has closed it)."""
    shell = ssh_shell(test_cluster, max_sessions=10)
    try:
        assert (await shell.realpath(".")).startswith("/")  # the SFTP channel is open
        results: dict[int, CommandResult] = {}

        async def one(n: int) -> None:
            results[n] = await shell.run(["sh", "-c", f"sleep 0.5; echo {n}"], timeout=30)

        async with anyio.create_task_group() as tasks:
            for n in range(10):
                tasks.start_soon(one, n)
        assert {n: r.stdout for n, r in results.items()} == {n: f"{n}\n" for n in range(10)}
        assert shell.connections_opened == 1
    finally:
        await shell.close()


async def test_the_submit_command_is_never_retried(tmp_path: Path) -> None:
    """SSHShell.run retries a command whose connection broke after it was sent unless it
    is told ``idempotent=False``; BatchScheduler.submit did not say so, so a qsub that lost
    its connection could be run twice: two jobs with one id and one token."""
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n")
    shell = FakeShell(ok("42\n"))
    scheduler = BatchScheduler("c", pbs.DIALECT, shell, workdir="ms", poll_interval=1,
                               emit_script=script)
    template = Template(name="t", cluster="c", script=script)
    submission = Submission(job_id="j_1", name="ms-1", template=template, env={}, token="s")
    assert await scheduler.submit(submission) == "42"
    assert [run.idempotent for run in shell.runs if run.argv[0] == "qsub"] == [False]
