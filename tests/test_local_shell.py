"""LocalShell: what it adds to the shell contract (tests/test_shell_contract.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metis_stream.shells.base import CommandResult
from metis_stream.shells.local import LocalShell


async def test_home_is_where_commands_run_and_relative_paths_lead(tmp_path: Path) -> None:
    shell = LocalShell(home=tmp_path)
    assert await shell.run(["pwd"]) == CommandResult.from_output(0, f"{tmp_path}\n".encode(),
                                                                b"")
    await shell.write_file("jobs/token", b"s3cret")
    assert (tmp_path / "jobs" / "token").read_bytes() == b"s3cret"
    assert await shell.realpath("jobs/token") == str(tmp_path / "jobs" / "token")


def test_home_is_the_users_home_by_default() -> None:
    assert LocalShell().home == Path.home()


async def test_commands_get_only_the_allowed_part_of_the_servers_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scheduler's commands (sbatch, qsub: a cluster without host) would hand what they
    get to the job (sbatch --export=ALL, qsub -V): the server's secret must not be there."""
    secret, key = "server-secret-" + "s" * 32, "plain-api-key-" + "k" * 32
    monkeypatch.setenv("METIS_SECRET", secret)
    monkeypatch.setenv("METIS_API_KEYS", key)
    monkeypatch.setenv("SERVER_ONLY", "canary")
    monkeypatch.setenv("LD_PRELOAD", "/nowhere/evil.so")
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/test.conf")
    monkeypatch.setenv("PBS_CONF_FILE", "/etc/pbs-test.conf")
    monkeypatch.setenv("LC_TIME", "C")
    result = await LocalShell(home=tmp_path).run(["env"])
    assert result.exit_status == 0, result.stderr
    environ = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert secret not in result.stdout and key not in result.stdout
    assert not {"METIS_SECRET", "METIS_API_KEYS", "SERVER_ONLY", "LD_PRELOAD"} & set(environ)
    # What the scheduler's own client needs (its config, who runs it) is there.
    assert environ["SLURM_CONF"] == "/etc/slurm/test.conf"
    assert environ["PBS_CONF_FILE"] == "/etc/pbs-test.conf"
    assert environ["PATH"] == os.environ["PATH"] and environ["LC_TIME"] == "C"
    assert {name for name in environ if not name.startswith("LC_")} <= {
        "PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ",
        "SLURM_CONF", "PBS_CONF_FILE", "PBS_DEFAULT", "PBS_SERVER"}
