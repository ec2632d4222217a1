"""Regression tests for bugs that the end-to-end tests (tests/test_cluster_e2e.py) found in
the SSH shell and the batch scheduler."""

from __future__ import annotations

import anyio
import pytest

from metis_stream.shells.base import CommandResult
from metis_stream.shells.ssh import SSHShell
from tests.support.cluster import TestCluster


@pytest.mark.cluster
async def test_a_refused_session_waits_for_a_free_one(test_cluster: TestCluster) -> None:
    """sshd (MaxSessions 10) refuses an 11th channel. With the SFTP channel open and
    max_sessions=10, the 10th command is refused at first; it must wait for a channel to
    close on the server's side and run, not fail (20 jobs submitted at once hit this:
    sshd frees a session a moment after the client has closed it)."""
    shell = SSHShell(test_cluster.host, port=test_cluster.port, user=test_cluster.user,
                     known_hosts=test_cluster.known_hosts, key_file=test_cluster.key_file,
                     use_agent=False, max_sessions=10)
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

