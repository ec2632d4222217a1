"""metis-agent (docs/agent.md): what it refuses, over a real server and a real agent
process; that it stays a standard-library program for old interpreters; that its spool
frames are the sh reader's, byte for byte. The shell contract it passes is in
test_shell_contract.py; the test cluster's end-to-end runs are in test_agent_cluster.py."""

from __future__ import annotations

import ast
import asyncio
import base64
import hashlib
import json
import secrets
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest

from metis_stream import metis_agent
from metis_stream.backends.memory import MemoryBackend
from metis_stream.clusters import AGENT_AWAY_AFTER, AgentPresence
from metis_stream.config import AGENT_SCRIPT
from metis_stream.errors import AgentAway, ConnectionLost, OperationRefused, OutsideFolder
from metis_stream.shells.agent import AgentShell
from metis_stream.shells.local import LocalShell
from metis_stream.spool import SpoolRead, reader_argv
from tests.support.agent import AgentProcess, agent_link, write_key_file
from tests.support.redis_server import RedisServer

OLDEST_PYTHON = (3, 6)
"""The oldest Python the agent is written for (docs/agent.md)."""


def test_the_agent_is_written_for_old_pythons_and_the_standard_library_only() -> None:
    tree = ast.parse(AGENT_SCRIPT.read_text(), feature_version=OLDEST_PYTHON)
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= sys.stdlib_module_names
    assert "__future__" not in imported  # `annotations` is 3.7


def test_spool_frames_are_the_sh_readers_byte_for_byte(tmp_path: Path) -> None:
    jobs = tmp_path / "jobs"
    spools = {"grown": b'{"a": 1}\n{"b": 2}\n', "same": b"x\n", "cut": b"0123456789" * 10,
              "binary": bytes(range(256)), "shrunk": b"ab\n"}
    for job_id, data in spools.items():
        (jobs / job_id).mkdir(parents=True)
        (jobs / job_id / "events.ndjson").write_bytes(data)
    reads = [SpoolRead("grown", 3, 0, 100), SpoolRead("same", 0, 2, 100),
             SpoolRead("cut", 5, 0, 20), SpoolRead("binary", 0, 0, 1000),
             SpoolRead("missing", 0, 0, 100), SpoolRead("shrunk", 50, 60, 100)]
    boundary = secrets.token_hex(16)
    result = anyio.run(LocalShell(home=tmp_path).run, reader_argv(str(jobs), reads, boundary))
    assert result.exit_status == 0, result.stderr
    ours = metis_agent.spool_frames(str(jobs), [read.word() for read in reads], boundary)
    assert ours == result.raw_stdout
    assert ours.count(b"--" + boundary.encode()) == 5  # four frames (not "same"), and the end


@pytest.mark.redis
async def test_commands_outside_the_allowlist_are_refused_and_nothing_runs(
        tmp_path: Path, redis_server: RedisServer) -> None:
    async with agent_link(tmp_path, redis_server.url, workdir="work") as link:
        victim = link.home / "victim"
        victim.write_text("keep me")
        for argv in (["rm", "-f", str(victim)], ["sh", "-c", f"rm -f {victim}"],
                     ["/bin/rm", str(victim)], ["qsub", str(victim)],
                     ["sbatch", "--parsable", "../victim"]):
            with pytest.raises(OperationRefused, match="refused run"):
                await link.shell.run(argv)
        assert victim.read_text() == "keep me"
        assert link.agent.log().count("refused run") == 5


@pytest.mark.redis
async def test_paths_outside_the_workdir_are_refused_and_nothing_is_touched(
        tmp_path: Path, redis_server: RedisServer) -> None:
    async with agent_link(tmp_path, redis_server.url, workdir="work") as link:
        shell, home = link.shell, link.home
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "secret").write_text("secret")
        await shell.write_file("work/inside", b"fine")
        (home / "work" / "out").symlink_to(outside)
        for path in ("../outside/new", "work/../../outside/new", str(outside / "new"),
                     "work/out/new", "elsewhere/new"):
            with pytest.raises(OperationRefused, match="outside the agent's work folder"):
                await shell.write_file(path, b"x")
        for read in (shell.read_file("work/out/secret", max_bytes=10),
                     shell.read_file(str(outside / "secret"), max_bytes=10),
                     shell.list_folder("work/out"), shell.remove_file("work/out/secret"),
                     shell.realpath("work/out")):
            with pytest.raises(OperationRefused, match="outside the agent's work folder"):
                await read
        with pytest.raises(OutsideFolder):
            await shell.resolve("work/out/secret", within="work")
        assert sorted(p.name for p in outside.iterdir()) == ["secret"]
        assert (outside / "secret").read_text() == "secret"
        assert await shell.read_file("work/inside", max_bytes=10) == b"fine"


@pytest.mark.redis
async def test_an_agent_with_a_wrong_key_is_refused(tmp_path: Path,
                                                    redis_server: RedisServer) -> None:
    async with agent_link(tmp_path, redis_server.url, wait=1.0) as link:
        link.agent.stop()
        wrong = AgentProcess(link.server.url, write_key_file(tmp_path / "wrong", "not-the-key"),
                             tmp_path / "wrong.log", env={"HOME": str(link.home)},
                             cwd=link.home)
        wrong.start()
        try:
            deadline = anyio.current_time() + 15
            while "401" not in wrong.log():
                assert anyio.current_time() < deadline, wrong.log()
                await anyio.sleep(0.1)
        finally:
            wrong.stop()
        assert "connected to" not in wrong.log()
        assert "a key of no cluster's was refused" in link.server.log()


@pytest.mark.redis
async def test_the_agent_is_served_with_its_hash(tmp_path: Path,
                                                 redis_server: RedisServer) -> None:
    async with (agent_link(tmp_path, redis_server.url) as link,
                httpx.AsyncClient(base_url=link.server.url) as client):
        served = await client.get("/agent")
        listed = await client.get("/agent.sha256")
    digest = hashlib.sha256(AGENT_SCRIPT.read_bytes()).hexdigest()
    assert served.content == AGENT_SCRIPT.read_bytes()
    assert served.headers["x-metis-agent-sha256"] == digest
    assert listed.text == f"{digest}  metis-agent\n"


async def test_an_operation_no_agent_takes_is_withdrawn_and_fails_clearly() -> None:
    backend = MemoryBackend()
    shell = AgentShell("metis", backend, wait=0.3)
    try:
        with pytest.raises(AgentAway, match=r"not connected.*nothing ran"):
            await shell.run(["qsub", "job.sh"], idempotent=False)
        # An agent that connects later finds nothing to run.
        assert await backend.agent_take("metis", wait=0.05, limit=10) == []
    finally:
        await shell.close()


async def test_an_operation_taken_by_an_agent_that_leaves_fails_once_it_is_away() -> None:
    """The backend plays the agent's poll: it takes the operation. While the agent's
    presence is fresh, the call waits for the reply; once it lapses, ConnectionLost
    comes within seconds, not at the operation's own limit (60 s + the margin)."""
    backend = MemoryBackend()
    shell = AgentShell("metis", backend, wait=0.3)
    try:
        await backend.set_agent_presence(AgentPresence("metis", seen=time.time()))
        call = asyncio.create_task(shell.run(["squeue"], timeout=60))
        [raw] = await backend.agent_take("metis", wait=5, limit=10)
        operation = json.loads(raw)
        await asyncio.sleep(2.5)  # past `wait` and a look at the presence: it waits on
        assert not call.done()
        await backend.agent_reply(operation["reply_to"], json.dumps({
            "id": operation["id"], "result": {
                "exit": 0, "stdout": base64.b64encode(b"queued").decode(),
                "stderr": ""}}).encode())
        assert (await asyncio.wait_for(call, 5)).stdout == "queued"

        call = asyncio.create_task(shell.run(["squeue"], timeout=60))
        assert len(await backend.agent_take("metis", wait=5, limit=10)) == 1
        await backend.set_agent_presence(
            AgentPresence("metis", seen=time.time() - AGENT_AWAY_AFTER - 1))
        started = time.monotonic()
        with pytest.raises(ConnectionLost, match=r"lost its link.*may or may not have run"):
            await asyncio.wait_for(call, 10)
        assert time.monotonic() - started < 5
    finally:
        await shell.close()
