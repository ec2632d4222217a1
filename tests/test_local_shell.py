"""LocalShell: what it adds to the shell contract (tests/test_shell_contract.py)."""

from __future__ import annotations

from pathlib import Path

from metis_stream.shells.base import CommandResult
from metis_stream.shells.local import LocalShell


async def test_home_is_where_commands_run_and_relative_paths_lead(tmp_path: Path) -> None:
    shell = LocalShell(home=tmp_path)
    assert await shell.run(["pwd"]) == CommandResult(0, f"{tmp_path}\n", "")
    await shell.write_file("jobs/token", b"s3cret")
    assert (tmp_path / "jobs" / "token").read_bytes() == b"s3cret"
    assert await shell.realpath("jobs/token") == str(tmp_path / "jobs" / "token")


def test_home_is_the_users_home_by_default() -> None:
    assert LocalShell().home == Path.home()
