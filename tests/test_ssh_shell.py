"""SSHShell against the real sshd of the test cluster: what it adds to the shell contract
(tests/test_shell_contract.py), such as one kept connection, reconnects and host keys."""

from __future__ import annotations

import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from metis_stream.errors import CommandTimeout, ConnectionLost, HostKeyRefused, ShellError
from metis_stream.shells import ssh
from metis_stream.shells.ssh import SSHShell
from tests.support.cluster import TestCluster
from tests.support.shells import ssh_shell

pytestmark = pytest.mark.cluster


@pytest.fixture
async def shell(test_cluster: TestCluster) -> AsyncIterator[SSHShell]:
    shell = ssh_shell(test_cluster)
    yield shell
    await shell.close()


async def test_files_and_commands_share_one_connection(shell: SSHShell) -> None:
    await shell.write_file("metis-one-connection/file", b"x")
    assert (await shell.run(["cat", "metis-one-connection/file"])).stdout == "x"
    await shell.remove_file("metis-one-connection/file")
    assert (await shell.run(["rmdir", "metis-one-connection"])).exit_status == 0
    assert shell.connections_opened == 1


async def test_a_timeout_keeps_the_connection(shell: SSHShell) -> None:
    with pytest.raises(CommandTimeout):
        await shell.run(["sleep", "10"], timeout=0.5)
    assert (await shell.run(["true"])).exit_status == 0
    assert shell.connections_opened == 1


async def test_concurrent_commands_share_one_connection(test_cluster: TestCluster) -> None:
    shell = ssh_shell(test_cluster, max_sessions=8)
    results: dict[int, str] = {}

    async def one(n: int) -> None:
        results[n] = (await shell.run(["sh", "-c", f"sleep 0.3; echo {n}"])).stdout

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(one, n)
    elapsed = time.monotonic() - started
    await shell.close()
    assert results == {n: f"{n}\n" for n in range(20)}
    assert shell.connections_opened == 1
    # 8 at a time: three waves of 0.3 s, not one (all at once) nor twenty (one by one).
    assert 0.85 < elapsed < 5


async def test_reconnects_after_sshd_restart(shell: SSHShell, test_cluster: TestCluster) -> None:
    assert (await shell.run(["true"])).exit_status == 0
    await anyio.to_thread.run_sync(test_cluster.restart_sshd)
    assert (await shell.run(["echo", "back"])).stdout == "back\n"
    assert shell.connections_opened == 2
    # SFTP reopens on the new connection too.
    assert (await shell.realpath(".")).startswith("/home/")


async def test_connection_lost_during_a_command(shell: SSHShell, test_cluster: TestCluster) -> None:
    async def drop_soon() -> None:
        await anyio.sleep(0.5)
        await anyio.to_thread.run_sync(test_cluster.drop_connections)

    # Not idempotent (a qsub): it may have run, so it is reported, not repeated.
    async with anyio.create_task_group() as tg:
        tg.start_soon(drop_soon)
        with pytest.raises(ConnectionLost, match="sleep"):
            await shell.run(["sleep", "3"], idempotent=False)
    # Idempotent (a qstat): run again on a new connection.
    async with anyio.create_task_group() as tg:
        tg.start_soon(drop_soon)
        result = await shell.run(["sh", "-c", "sleep 1.5; echo done"])
    assert result.stdout == "done\n"
    assert shell.connections_opened == 3


async def test_unknown_host_key_is_refused(test_cluster: TestCluster, tmp_path: Path) -> None:
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    shell = ssh_shell(test_cluster, known_hosts=empty)
    with pytest.raises(HostKeyRefused, match=r"is not in .*refusing to connect") as info:
        await shell.run(["true"])
    assert test_cluster.host in str(info.value)
    assert "ssh-keyscan" in str(info.value)
    assert empty.read_text() == ""  # never added
    assert shell.connections_opened == 0


async def test_changed_host_key_is_refused(test_cluster: TestCluster, tmp_path: Path) -> None:
    forged = test_cluster.forge_known_hosts(tmp_path / "known_hosts")
    shell = ssh_shell(test_cluster, known_hosts=forged)
    with pytest.raises(HostKeyRefused, match="CHANGED") as info:
        await shell.run(["true"])
    assert test_cluster.host in str(info.value)
    assert "ssh-keygen -R" in str(info.value)
    assert shell.connections_opened == 0


async def test_missing_known_hosts_file_is_refused(
    test_cluster: TestCluster, tmp_path: Path
) -> None:
    missing = tmp_path / "nope"
    shell = ssh_shell(test_cluster, known_hosts=missing)
    with pytest.raises(ShellError, match="known_hosts file") as info:
        await shell.run(["true"])
    assert str(missing) in str(info.value)


async def test_wrong_key_is_refused_then_backs_off(
    test_cluster: TestCluster, tmp_path: Path
) -> None:
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    shell = ssh_shell(test_cluster, key_file=other)
    with pytest.raises(ShellError, match="authentication"):
        await shell.run(["true"])
    # The next attempt is due within a second: a caller waits for it and makes it.
    with pytest.raises(ShellError, match="authentication"):
        await shell.run(["true"])


async def test_callers_are_told_at_once_while_the_next_attempt_is_far(
    test_cluster: TestCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every attempt counts as far off, as after a long outage: nobody queues on the host.
    monkeypatch.setattr(ssh, "_WAIT_FOR_ATTEMPT", 0.0)
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    shell = ssh_shell(test_cluster, key_file=other)
    with pytest.raises(ShellError, match="authentication"):
        await shell.run(["true"])
    with pytest.raises(ShellError, match="retrying in"):
        await shell.run(["true"])


async def test_kept_connection_is_faster_than_new_ones(test_cluster: TestCluster) -> None:
    runs = 10
    shell = ssh_shell(test_cluster)
    await shell.run(["true"])  # the connection's own first use is not the point
    started = time.perf_counter()
    for _ in range(runs):
        await shell.run(["true"])
    kept = (time.perf_counter() - started) / runs
    await shell.close()

    started = time.perf_counter()
    for _ in range(runs):
        fresh_shell = ssh_shell(test_cluster)
        await fresh_shell.run(["true"])
        await fresh_shell.close()
    fresh = (time.perf_counter() - started) / runs
    print(
        f"\n`true` over ssh: kept connection {kept * 1000:.1f} ms, new connection "
        f"{fresh * 1000:.1f} ms ({runs} runs each)"
    )
    assert kept < fresh
