"""The shell contract (metis_stream.shells.base.Shell), run against every shell: LocalShell,
SSHShell on the test cluster's sshd, AgentShell through a real server (on Redis) and a
real metis-agent, and, for the part that needs no real command, the FakeShell that the
scheduler tests use. A new shell joins ``REAL_SHELLS`` (and ``opened``) and must pass all
of it.

The agent runs only the scheduler's commands: for the contract it is started with
``--allow-command`` for the commands these tests run (``CONTRACT_COMMANDS``), as a site
can allow its own; what it refuses without them is tests/test_agent.py's.

Commands run as the login user, in its home folder; what a test leaves there goes with
the test (``folder``). Files are checked through the shell's own commands (``cat``,
``stat``, ``ls``), as a job on the cluster would see them.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from metis_stream.errors import CommandTimeout, OutsideFolder, ShellError, UnsafeArgument
from metis_stream.shells.base import CHUNK_BYTES, CommandResult, FileInfo, Shell
from metis_stream.shells.local import LocalShell
from tests.support.agent import agent_link
from tests.support.cluster import TestCluster
from tests.support.redis_server import RedisServer
from tests.support.shells import FakeShell, ssh_shell

REAL_SHELLS = ["local", pytest.param("ssh", marks=pytest.mark.cluster),
               pytest.param("agent", marks=pytest.mark.redis)]

CONTRACT_COMMANDS = ("cat", "echo", "head", "ls", "mkdir", "no-such-command-metis", "pwd",
                     "sh", "sha256sum", "stat", "touch", "true")
"""What the contract tests run besides the scheduler's commands (and each test's own
scripts: ``folder_commands``)."""


def folder_commands(folder: str) -> tuple[str, ...]:
    return (f"./{folder}/script", f"./{folder}/it's an \"argv\" printer")

UNSAFE_ARGVS = {
    "empty": [],
    "NUL in an argument": ["touch", "a\0b"],
    "NUL in the command": ["touch\0", "x"],
    "an option as the command": ["-x", "touch"],
}

# Each must reach the command as one argument, byte for byte. Those that a shell would
# interpret try to create {folder}/pwned.
HOSTILE_ARGUMENTS = [
    "$(touch {folder}/pwned)", "`touch {folder}/pwned`", "; touch {folder}/pwned",
    "&& touch {folder}/pwned", "| touch {folder}/pwned", "> {folder}/pwned",
    "'", '"', "\\", "'\"'\"'", "a\nb", "\n", "\r\n", "*", "?", "[a-z]*", "~", "~root",
    "-n", "--help", "-", "a b", " ", "\t", "$HOME", "${HOME}", "$$", "!!", "#", "%s%n",
    "héllo wörld ☃", "\u202e", "\x01\x7f", "\\0", "",
]


@pytest.fixture
def folder() -> str:
    """A fresh folder name (not created) under the shell's home, for one test's files."""
    return f"contract-{secrets.token_hex(4)}"


@contextlib.asynccontextmanager
async def opened(kind: str, request: pytest.FixtureRequest, tmp_path: Path,
                 folder: str) -> AsyncIterator[Shell]:
    # Typed as Shell: mypy checks that each implementation follows the protocol.
    shell: Shell
    cluster: TestCluster | None = None
    if kind == "local":
        shell = LocalShell(home=tmp_path)  # pytest removes tmp_path
    elif kind == "ssh":
        cluster = request.getfixturevalue("test_cluster")
        shell = ssh_shell(cluster)
    elif kind == "agent":
        redis: RedisServer = request.getfixturevalue("redis_server")
        async with agent_link(tmp_path, redis.url, allow_commands=(
                *CONTRACT_COMMANDS, *folder_commands(folder))) as link:
            yield link.shell
        return
    else:
        shell = FakeShell()
    try:
        yield shell
    finally:
        await shell.close()
        if cluster is not None:
            cluster.run_as_user(["rm", "-rf", "--", folder], check=True)


@pytest.fixture(params=REAL_SHELLS)
async def shell(request: pytest.FixtureRequest, tmp_path: Path,
                folder: str) -> AsyncIterator[Shell]:
    async with opened(request.param, request, tmp_path, folder) as made:
        yield made


@pytest.fixture(params=[*REAL_SHELLS, "fake"])
async def any_shell(request: pytest.FixtureRequest, tmp_path: Path,
                    folder: str) -> AsyncIterator[Shell]:
    """Every shell, the FakeShell too: for the checks that need no real command."""
    async with opened(request.param, request, tmp_path, folder) as made:
        yield made


async def cat(shell: Shell, path: str) -> str:
    result = await shell.run(["cat", path])
    assert (result.exit_status, result.stderr) == (0, "")
    return result.stdout


async def modes(shell: Shell, *paths: str) -> list[str]:
    result = await shell.run(["stat", "-c", "%a", *paths])
    assert result.exit_status == 0, result.stderr
    return result.stdout.split()


async def listing(shell: Shell, folder: str) -> list[str]:
    """Every name in ``folder``, hidden ones too (where a temporary file would hide)."""
    result = await shell.run(["ls", "-A", folder])
    assert result.exit_status == 0, result.stderr
    return result.stdout.splitlines()


# Commands


async def test_a_command_runs_in_the_home_folder(shell: Shell) -> None:
    home = await shell.realpath(".")
    assert home.startswith("/")
    assert await shell.run(["pwd"]) == CommandResult.from_output(0, f"{home}\n".encode(), b"")


async def test_the_exit_status_is_the_commands(shell: Shell) -> None:
    for status in (0, 1, 42, 255):
        assert await shell.run(["sh", "-c", f"exit {status}"]) == CommandResult(status, "", "")


async def test_a_missing_command_exits_127(shell: Shell) -> None:
    result = await shell.run(["no-such-command-metis", "arg"])
    assert (result.exit_status, result.stdout) == (127, "")
    assert "no-such-command-metis" in result.stderr


async def test_a_file_that_cannot_be_executed_exits_126(shell: Shell, folder: str) -> None:
    await shell.write_file(f"{folder}/script", b"#!/bin/sh\necho ran\n", mode=0o600)
    result = await shell.run([f"./{folder}/script"])
    assert (result.exit_status, result.stdout) == (126, "")
    assert f"{folder}/script" in result.stderr


async def test_a_command_killed_by_a_signal_has_a_negative_exit_status(shell: Shell) -> None:
    result = await shell.run(["sh", "-c", "kill -9 $$"])
    assert result.exit_status < 0


async def test_stdout_and_stderr_are_kept_apart_and_exact(shell: Shell) -> None:
    script = (
        r'printf "out\n\n"; printf "  err\n\n\n" >&2; '
        # héllo in UTF-8, then a byte that is not UTF-8
        r'printf "h\303\251llo \377\n"; printf "\376" >&2'
    )
    result = await shell.run(["sh", "-c", script])
    assert result == CommandResult(0, "out\n\nhéllo \ufffd\n", "  err\n\n\n\ufffd",
                                   raw_stdout=b"out\n\nh\xc3\xa9llo \xff\n")


async def test_raw_stdout_is_every_byte_as_written(shell: Shell) -> None:
    # Every byte value, NUL and half characters among them: the spool reader counts bytes.
    result = await shell.run(["sh", "-c", r'i=0; while [ $i -lt 256 ]; do '
                              r'printf "\\$(printf %o $i)"; i=$((i + 1)); done'])
    assert result.raw_stdout == bytes(range(256))


async def test_input_is_empty(shell: Shell) -> None:
    assert await shell.run(["cat"], timeout=10) == CommandResult(0, "", "")


@pytest.mark.parametrize("body", [
    pytest.param("sleep 60 & echo $! >> {pids}; wait", id="child in the background"),
    pytest.param("while :; do echo out; echo err >&2; sleep 0.01; done", id="output keeps flowing"),
])
async def test_a_command_past_its_timeout_is_killed_with_what_it_started(
    shell: Shell, folder: str, body: str
) -> None:
    pids = f"{folder}/pids"
    script = f"mkdir {folder}; echo $$ > {pids}; {body.format(pids=pids)}"
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match=r"^sh\b"):
        await shell.run(["sh", "-c", script], timeout=0.5)
    assert time.monotonic() - started < 3
    started_pids = (await cat(shell, pids)).split()
    assert started_pids
    deadline = time.monotonic() + 5
    while running := [pid for pid in started_pids if await is_running(shell, pid)]:
        assert time.monotonic() < deadline, f"still running after the timeout: {running}"
        await anyio.sleep(0.1)
    assert await shell.run(["echo", "next"]) == CommandResult.from_output(0, b"next\n", b"")


async def is_running(shell: Shell, pid: str) -> bool:
    """Whether process ``pid`` exists and is not a zombie (dead, not yet reaped)."""
    result = await shell.run(["cat", f"/proc/{pid}/stat"])
    # The state follows the command name, which is in parentheses.
    return result.exit_status == 0 and result.stdout.rsplit(")", 1)[1].split()[0] != "Z"


async def test_megabytes_on_stdout_and_stderr_at_once(shell: Shell) -> None:
    # More than any pipe or channel window on each stream, written at the same time:
    # a shell that reads one stream to its end before the other stalls.
    size = 4 << 20
    script = (f'head -c {size} /dev/zero | tr "\\0" o & '
              f'head -c {size} /dev/zero | tr "\\0" e >&2; wait')
    result = await shell.run(["sh", "-c", script], timeout=60)
    assert result.exit_status == 0
    assert (len(result.stdout), result.stdout.strip("o")) == (size, "")
    assert (len(result.stderr), result.stderr.strip("e")) == (size, "")


async def test_unsafe_argv_is_refused(any_shell: Shell) -> None:
    for name, argv in UNSAFE_ARGVS.items():
        with pytest.raises(UnsafeArgument):
            await any_shell.run(argv)
            pytest.fail(f"{name}: {argv!r} was run")


async def test_a_refused_argv_runs_nothing(shell: Shell, folder: str) -> None:
    assert (await shell.run(["mkdir", folder])).exit_status == 0
    with pytest.raises(UnsafeArgument):
        await shell.run(["sh", "-c", f"touch {folder}/ran", "a\0b"])
    assert await listing(shell, folder) == []


async def test_hostile_arguments_arrive_intact(shell: Shell, folder: str) -> None:
    # The command's own name needs quoting too.
    printer = f"{folder}/it's an \"argv\" printer"
    await shell.write_file(printer, b'#!/bin/sh\nprintf \'%s\\0\' "$@"\n', mode=0o700)
    arguments = [argument.replace("{folder}", folder) for argument in HOSTILE_ARGUMENTS]
    result = await shell.run([f"./{printer}", *arguments])
    assert result == CommandResult.from_output(
        0, "".join(f"{arg}\0" for arg in arguments).encode(), b"")
    assert await listing(shell, folder) == [printer.split("/")[1]]  # nothing was run


async def test_many_commands_at_once_each_get_their_own_output(shell: Shell) -> None:
    count, pause = 20, 0.3
    results: dict[int, CommandResult] = {}

    async def one(n: int) -> None:
        script = f'sleep {pause}; echo "out $1"; echo "err $1" >&2'
        results[n] = await shell.run(["sh", "-c", script, "sh", str(n)], timeout=30)

    started = time.monotonic()
    async with anyio.create_task_group() as tasks:
        for n in range(count):
            tasks.start_soon(one, n)
    assert results == {n: CommandResult.from_output(0, f"out {n}\n".encode(), f"err {n}\n".encode())
                       for n in range(count)}
    # Side by side (a shell may bound how many at once), not one after the other.
    assert time.monotonic() - started < count * pause / 2


# Files


async def test_write_file_creates_private_parent_folders(shell: Shell, folder: str) -> None:
    await shell.write_file(f"{folder}/a/b/token", b"s3cret")
    assert await cat(shell, f"{folder}/a/b/token") == "s3cret"
    paths = [folder, f"{folder}/a", f"{folder}/a/b", f"{folder}/a/b/token"]
    assert await modes(shell, *paths) == ["700", "700", "700", "600"]


async def test_write_file_gives_the_mode_asked_for(shell: Shell, folder: str) -> None:
    for mode in (0o600, 0o640, 0o700, 0o755):
        await shell.write_file(f"{folder}/{mode:o}", b"#!/bin/sh\n", mode=mode)
    assert await modes(shell, *(f"{folder}/{mode}" for mode in ("600", "640", "700", "755"))
                       ) == ["600", "640", "700", "755"]


async def test_write_file_replaces_a_file_whole(shell: Shell, folder: str) -> None:
    path = f"{folder}/file"
    await shell.write_file(path, b"a longer first version\n", mode=0o755)
    await shell.write_file(path, b"second\n")
    assert await cat(shell, path) == "second\n"
    assert await modes(shell, path) == ["600"]
    assert await listing(shell, folder) == ["file"]  # no temporary file left behind


async def test_a_reader_never_sees_half_a_file(shell: Shell, folder: str) -> None:
    path, size = f"{folder}/file", 256 << 10
    versions = [b"a" * size, b"b" * size]
    await shell.write_file(path, versions[0])
    seen: set[tuple[int, frozenset[str]]] = set()

    async def write() -> None:
        for n in range(1, 7):
            await shell.write_file(path, versions[n % 2])

    async def read() -> None:
        for _ in range(10):
            text = await cat(shell, path)
            seen.add((len(text), frozenset(text)))

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(write)
        tasks.start_soon(read)
    assert seen <= {(size, frozenset("a")), (size, frozenset("b"))}
    assert await listing(shell, folder) == ["file"]


async def test_a_written_file_reads_back_byte_for_byte(shell: Shell, folder: str) -> None:
    data = secrets.token_bytes(1 << 20) + bytes(range(256))
    await shell.write_file(f"{folder}/data", data)
    # run() decodes output as text: a checksum is how bytes come back through it.
    result = await shell.run(["sha256sum", f"{folder}/data"])
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    await shell.write_file(f"{folder}/text", "héllo\nwörld\n\n".encode())
    assert await cat(shell, f"{folder}/text") == "héllo\nwörld\n\n"
    await shell.write_file(f"{folder}/empty", b"")
    assert await cat(shell, f"{folder}/empty") == ""


async def test_read_file_gives_the_head_or_the_tail(any_shell: Shell, folder: str) -> None:
    data = bytes(range(256)) * 300 + b"\xff\x00 the end\n"
    await any_shell.write_file(f"{folder}/data", data)
    assert await any_shell.read_file(f"{folder}/data", max_bytes=len(data) + 10) == data
    assert await any_shell.read_file(f"{folder}/data", max_bytes=1000) == data[:1000]
    assert await any_shell.read_file(f"{folder}/data", max_bytes=1000, tail=True) == data[-1000:]
    assert await any_shell.read_file(f"{folder}/data", max_bytes=len(data) * 2,
                                     tail=True) == data
    await any_shell.write_file(f"{folder}/empty", b"")
    assert await any_shell.read_file(f"{folder}/empty", max_bytes=10, tail=True) == b""
    absolute = f"{await any_shell.realpath(folder)}/data"
    assert await any_shell.read_file(absolute, max_bytes=3) == data[:3]


async def test_reading_a_missing_file_gives_none(any_shell: Shell, folder: str) -> None:
    assert await any_shell.read_file(f"{folder}/no/such/file", max_bytes=10) is None
    await any_shell.write_file(f"{folder}/file", b"x")
    await any_shell.remove_file(f"{folder}/file")
    assert await any_shell.read_file(f"{folder}/file", max_bytes=10, tail=True) is None


async def test_read_file_sees_what_a_command_wrote(shell: Shell, folder: str) -> None:
    await shell.run(["sh", "-c", f"mkdir {folder} && printf 'a\\nb\\n' > {folder}/out"])
    assert await shell.read_file(f"{folder}/out", max_bytes=100) == b"a\nb\n"


async def test_remove_file(shell: Shell, folder: str) -> None:
    await shell.write_file(f"{folder}/file", b"x")
    await shell.write_file(f"{folder}/other", b"y")
    await shell.remove_file(f"{folder}/file")
    assert await listing(shell, folder) == ["other"]


async def test_removing_a_missing_file_is_not_an_error(any_shell: Shell, folder: str) -> None:
    await any_shell.write_file(f"{folder}/file", b"x")
    await any_shell.remove_file(f"{folder}/file")
    await any_shell.remove_file(f"{folder}/file")
    await any_shell.remove_file(f"{folder}/no/such/folder/file")


async def test_paths_may_be_absolute(shell: Shell, folder: str) -> None:
    await shell.write_file(f"{folder}/relative", b"")
    absolute = f"{await shell.realpath(folder)}/absolute"
    await shell.write_file(absolute, b"x")
    assert await cat(shell, f"{folder}/absolute") == "x"
    await shell.remove_file(absolute)
    assert await listing(shell, folder) == ["relative"]


async def test_realpath_is_absolute_and_relative_paths_start_at_home(
    any_shell: Shell, folder: str
) -> None:
    home = await any_shell.realpath(".")
    assert home.startswith("/")
    await any_shell.write_file(f"{folder}/file", b"x")
    assert await any_shell.realpath(f"{folder}/file") == f"{home}/{folder}/file"
    assert await any_shell.realpath(f"{home}/{folder}") == f"{home}/{folder}"


async def test_file_failures_are_shell_errors(shell: Shell, folder: str) -> None:
    await shell.write_file(f"{folder}/file", b"x")
    with pytest.raises(ShellError):
        await shell.write_file(f"{folder}/file/inner", b"y")  # a file where a folder must be
    with pytest.raises(ShellError):
        await shell.remove_file(folder)  # a folder
    assert await listing(shell, folder) == ["file"]


# Streamed files: the files API (docs/files.md)


async def make_folder(shell: Shell, folder: str, script: str) -> str:
    """Run ``script`` in a new ``folder`` with sh; the folder's absolute path."""
    result = await shell.run(["sh", "-c", f'mkdir -p "$1" && cd "$1" && {script}', "sh", folder])
    assert result.exit_status == 0, result.stderr
    return await shell.realpath(folder)


async def test_list_folder_gives_lstat_of_each_entry(shell: Shell, folder: str) -> None:
    await make_folder(shell, folder, "printf 12345 > file && mkdir sub && ln -s /etc link "
                      "&& touch -d @1700000000 file")
    entries = {entry.name: entry for entry in await shell.list_folder(folder) or []}
    assert set(entries) == {"file", "sub", "link"}
    assert entries["file"] == FileInfo("file", "file", 5, 1700000000.0)
    assert entries["sub"].kind == "folder"
    assert entries["link"].kind == "link"  # not what it points to


async def test_listing_a_missing_folder_gives_none(any_shell: Shell, folder: str) -> None:
    assert await any_shell.list_folder(f"{folder}/nothing") is None


async def test_resolve_gives_the_stat_of_a_file_inside(shell: Shell, folder: str) -> None:
    root = await make_folder(shell, folder, "mkdir sub && printf abc > sub/file "
                             "&& ln -s sub/file inner-link")
    found = await shell.resolve(f"{folder}/sub/file", within=folder)
    assert found is not None
    assert (found.name, found.kind, found.size) == (f"{root}/sub/file", "file", 3)
    via_link = await shell.resolve(f"{folder}/inner-link", within=folder)
    assert via_link is not None and via_link.name == f"{root}/sub/file"
    assert await shell.resolve(f"{folder}/sub/../sub/file", within=f"{root}/sub") == found
    assert await shell.resolve(f"{folder}/missing", within=folder) is None


@pytest.mark.parametrize("link_target", ["/etc/passwd", "..", "../../", "/"])
async def test_resolve_refuses_links_that_lead_outside(shell: Shell, folder: str,
                                                       link_target: str) -> None:
    await make_folder(shell, folder, f"mkdir job && ln -s '{link_target}' job/out")
    with pytest.raises(OutsideFolder):
        await shell.resolve(f"{folder}/job/out", within=f"{folder}/job")


async def test_resolve_refuses_a_path_that_climbs_out(any_shell: Shell, folder: str) -> None:
    await any_shell.write_file(f"{folder}/job/file", b"x")
    await any_shell.write_file(f"{folder}/secret", b"x")
    with pytest.raises(OutsideFolder):
        await any_shell.resolve(f"{folder}/job/../secret", within=f"{folder}/job")


async def test_resolve_follows_a_folder_that_is_itself_a_link(shell: Shell, folder: str) -> None:
    root = await make_folder(shell, folder, "mkdir real && printf x > real/file "
                             "&& ln -s real alias")
    found = await shell.resolve(f"{folder}/alias/file", within=f"{folder}/alias")
    assert found is not None and found.name == f"{root}/real/file"


async def read_all(shell: Shell, path: str, **where: int) -> list[bytes]:
    return [chunk async for chunk in shell.read_chunks(path, **where)]


async def test_read_chunks_gives_the_bytes_asked_for(any_shell: Shell, folder: str) -> None:
    data = secrets.token_bytes(CHUNK_BYTES * 2 + 1000)
    await any_shell.write_file(f"{folder}/data", data)
    chunks = await read_all(any_shell, f"{folder}/data")
    assert b"".join(chunks) == data
    assert all(len(chunk) <= CHUNK_BYTES for chunk in chunks)
    for offset, length in [(0, 1), (5, 100), (CHUNK_BYTES - 3, 10), (len(data) - 7, 7),
                           (1234, CHUNK_BYTES * 2)]:
        got = b"".join(await read_all(any_shell, f"{folder}/data", offset=offset,
                                      length=length))
        assert got == data[offset:offset + length]
    assert b"".join(await read_all(any_shell, f"{folder}/data", offset=len(data) - 2,
                                   length=100)) == data[-2:]
    assert await read_all(any_shell, f"{folder}/data", offset=len(data)) == []


async def test_reading_chunks_of_a_missing_file_is_a_shell_error(any_shell: Shell,
                                                                 folder: str) -> None:
    with pytest.raises(ShellError):
        await read_all(any_shell, f"{folder}/missing")


async def test_chunks_of_many_files_read_at_once_stay_apart(shell: Shell, folder: str) -> None:
    files = {f"{folder}/f{n}": secrets.token_bytes(CHUNK_BYTES * 3 + n) for n in range(6)}
    for path, data in files.items():
        await shell.write_file(path, data)
    got: dict[str, bytes] = {}

    async def read(path: str) -> None:
        got[path] = b"".join(await read_all(shell, path))

    async with anyio.create_task_group() as tasks:
        for path in files:
            tasks.start_soon(read, path)
    assert got == files


async def test_a_reader_that_stops_early_leaves_the_shell_usable(shell: Shell,
                                                                 folder: str) -> None:
    data = secrets.token_bytes(CHUNK_BYTES * 4)
    await shell.write_file(f"{folder}/data", data)
    async with contextlib.aclosing(shell.read_chunks(f"{folder}/data")) as chunks:
        assert await anext(chunks) == data[:CHUNK_BYTES]
    assert b"".join(await read_all(shell, f"{folder}/data")) == data


async def pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        await anyio.sleep(0)
        yield part


async def test_write_chunks_writes_a_private_file_whole(any_shell: Shell, folder: str) -> None:
    parts = [secrets.token_bytes(100_000) for _ in range(7)]
    written = await any_shell.write_chunks(f"{folder}/in/data", pieces(*parts))
    assert written == 700_000
    assert await any_shell.read_file(f"{folder}/in/data", max_bytes=10**6) == b"".join(parts)


async def test_write_chunks_gives_the_mode_and_leaves_nothing_else(shell: Shell,
                                                                   folder: str) -> None:
    await shell.write_chunks(f"{folder}/inputs/a", pieces(b"x" * 10, b"y"), mode=0o640)
    await shell.write_chunks(f"{folder}/inputs/empty", pieces())
    assert await modes(shell, folder, f"{folder}/inputs", f"{folder}/inputs/a") == [
        "700", "700", "640"]
    assert await listing(shell, f"{folder}/inputs") == ["a", "empty"]
    assert await cat(shell, f"{folder}/inputs/empty") == ""


async def test_a_failing_source_leaves_no_file(shell: Shell, folder: str) -> None:
    async def failing() -> AsyncIterator[bytes]:
        yield b"first part"
        raise RuntimeError("the client went away")

    await shell.write_file(f"{folder}/keep", b"")
    with pytest.raises(RuntimeError, match="went away"):
        await shell.write_chunks(f"{folder}/data", failing())
    assert await listing(shell, folder) == ["keep"]


async def test_file_hashes_survive_a_streamed_round_trip(shell: Shell, folder: str) -> None:
    data = secrets.token_bytes(3 * 1024 * 1024 + 17)
    parts = [data[n:n + 65536] for n in range(0, len(data), 65536)]
    await shell.write_chunks(f"{folder}/data", pieces(*parts))
    result = await shell.run(["sha256sum", f"{folder}/data"])
    assert result.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    back = hashlib.sha256()
    async for chunk in shell.read_chunks(f"{folder}/data"):
        back.update(chunk)
    assert back.hexdigest() == hashlib.sha256(data).hexdigest()


# Closing


async def test_a_closed_shell_refuses_every_call(any_shell: Shell, folder: str) -> None:
    await any_shell.realpath(".")  # in use
    await any_shell.close()
    await any_shell.close()  # closing again does nothing
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: any_shell.run(["true"]),
        lambda: any_shell.write_file(f"{folder}/file", b"x"),
        lambda: any_shell.remove_file(f"{folder}/file"),
        lambda: any_shell.read_file(f"{folder}/file", max_bytes=10),
        lambda: any_shell.realpath("."),
        lambda: any_shell.list_folder("."),
        lambda: any_shell.resolve(".", within="."),
        lambda: read_all(any_shell, f"{folder}/file"),
        lambda: any_shell.write_chunks(f"{folder}/file", pieces(b"x")),
    ]
    for call in calls:
        with pytest.raises(ShellError, match="closed"):
            await call()
