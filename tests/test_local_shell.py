"""LocalShell: the Shell protocol on this machine."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from metis_stream.errors import CommandTimeout, UnsafeArgument
from metis_stream.shells.base import Shell
from metis_stream.shells.local import LocalShell


@pytest.fixture
def shell(tmp_path: Path) -> LocalShell:
    return LocalShell(home=tmp_path)


def test_is_a_shell(shell: LocalShell) -> None:
    typed: Shell = shell  # checked by mypy: LocalShell follows the protocol
    assert typed is shell


async def test_runs_in_home(shell: LocalShell, tmp_path: Path) -> None:
    result = await shell.run(["pwd"])
    assert (result.exit_status, result.stdout, result.stderr) == (0, f"{tmp_path}\n", "")


async def test_exit_status_and_stderr(shell: LocalShell) -> None:
    result = await shell.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    assert (result.exit_status, result.stdout, result.stderr) == (3, "out\n", "err\n")


async def test_arguments_are_not_interpreted(shell: LocalShell, tmp_path: Path) -> None:
    args = ["; touch pwned", "$HOME", "a b", "`id`", "*"]
    result = await shell.run(["printf", "%s\\n", *args])
    assert result.stdout.splitlines() == args
    assert not (tmp_path / "pwned").exists()


async def test_nul_is_refused(shell: LocalShell) -> None:
    with pytest.raises(UnsafeArgument, match="NUL"):
        await shell.run(["echo", "a\0b"])


async def test_missing_command_exits_127(shell: LocalShell) -> None:
    result = await shell.run(["no-such-command-metis"])
    assert result.exit_status == 127
    assert "no-such-command-metis" in result.stderr


async def test_stdin_is_closed(shell: LocalShell) -> None:
    assert (await shell.run(["cat"], timeout=5)).stdout == ""


async def test_timeout(shell: LocalShell) -> None:
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="sleep"):
        await shell.run(["sleep", "10"], timeout=0.3)
    assert time.monotonic() - started < 3


async def test_concurrent_commands(shell: LocalShell) -> None:
    results: list[str] = []

    async def one(n: int) -> None:
        results.append((await shell.run(["sh", "-c", f"sleep 0.2; echo {n}"])).stdout)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(one, n)
    assert sorted(results) == sorted(f"{n}\n" for n in range(10))
    assert time.monotonic() - started < 2  # ran side by side, the loop never blocked


async def test_files(shell: LocalShell, tmp_path: Path) -> None:
    await shell.write_file("jobs/sub/token", b"first")
    await shell.write_file("jobs/sub/token", b"s3cret")
    target = tmp_path / "jobs" / "sub" / "token"
    assert target.read_bytes() == b"s3cret"
    assert target.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "jobs").stat().st_mode & 0o777 == 0o700
    assert [p.name for p in target.parent.iterdir()] == ["token"]  # no temporary left
    await shell.write_file("jobs/run.sh", b"#!/bin/sh\n", mode=0o755)
    assert (tmp_path / "jobs" / "run.sh").stat().st_mode & 0o777 == 0o755
    assert await shell.realpath("jobs/sub/token") == str(target)
    assert await shell.realpath(str(target)) == str(target)  # absolute stays absolute
    await shell.remove_file("jobs/sub/token")
    await shell.remove_file("jobs/sub/token")  # missing is not an error
    assert not target.exists()
    await shell.close()
