"""The files API (docs/files.md) on a real server with the local scheduler: listings,
streamed downloads with Range and validators, every refused path, who may read, and
input files uploaded with a submission. The same on the real cluster over SFTP:
tests/test_files_cluster.py. The pure parts (paths, ranges, multipart) are tested alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pty
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream import tokens
from metis_stream.client import Client
from metis_stream.errors import BadInput, ClientError, RangeNotSatisfiable, UnsafePath
from metis_stream.job_folder import input_name, relative_path
from metis_stream.multipart import Data, MultipartReader, PartEnd, PartStart, boundary_of
from metis_stream.web.files import byte_range
from tests.support.server import LOCAL_CLUSTER, ServerProcess, script_templates

KEY = "files-test-key"
OTHER_KEY = "files-other-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}

MAKER = """\
head -c 3000000 /dev/urandom > data.bin
mkdir -p results/deep
printf 'hello\\n' > results/note.txt
printf '\\211PNG\\r\\n\\032\\n' > results/deep/plot.png
ln -s /etc/passwd escape
ln -s ../../.. up
ln -s token tok
ln -s results/note.txt inner
ln -s results results-link
"$METIS_EMIT" completed
"""
SUMS = """\
cd "$METIS_INPUTS_DIR" && sha256sum -- * > "$METIS_JOB_DIR/sums.txt"
"$METIS_EMIT" completed
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("files")
    config = LOCAL_CLUSTER + script_templates(folder / "scripts", {"maker": MAKER, "sums": SUMS,
                                                                    "closed": SUMS}, {
        "maker": 'outputs = ["*.bin", "results/**/*.png"]\n',
        "closed": "accepts_inputs = false\n",
    })
    process = ServerProcess(state_dir=folder / "server", extra_config=config, server_settings={
        "keys": {"mine": {"key": tokens.hash_api_key(KEY), "role": "client"},
                 "theirs": {"key": tokens.hash_api_key(OTHER_KEY), "role": "client"}},
        "max_download_bytes": 2_000_000_000, "max_upload_file_bytes": 1_000_000,
        "max_upload_bytes": 1_500_000, "submissions_per_minute": 10_000})
    process.start()
    try:
        yield process
    finally:
        process.stop()


def finished(server: ServerProcess, job: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record: dict[str, Any] = httpx.get(f"{server.url}/api/jobs/{job['id']}",
                                           headers=HEADERS, timeout=10).json()
        if record["state"] in ("completed", "failed", "cancelled"):
            assert record["state"] == "completed", record
            return record
        time.sleep(0.1)
    raise AssertionError(f"job {job['id']} did not end: {server.log()[-2000:]}")


@pytest.fixture(scope="module")
def made(server: ServerProcess) -> dict[str, Any]:
    """A job that wrote files, links among them, and ended."""
    created = httpx.post(f"{server.url}/api/jobs", json={"template": "maker"}, headers=HEADERS,
                         timeout=10)
    assert created.status_code == 201, created.text
    return finished(server, created.json())


def files_url(server: ServerProcess, job: dict[str, Any], path: str = "") -> str:
    return f"{server.url}/api/jobs/{job['id']}/files" + (f"/{path}" if path else "")


def job_dir(server: ServerProcess, job: dict[str, Any]) -> Path:
    return server.state_dir / "jobs" / "local" / str(job["id"])


# Listing


def test_the_listing_gives_every_file_with_its_size_and_outputs_marked(
        server: ServerProcess, made: dict[str, Any]) -> None:
    answer = httpx.get(files_url(server, made), headers=HEADERS, timeout=10)
    assert answer.status_code == 200, answer.text
    listing = answer.json()
    files = {entry["path"]: entry for entry in listing["files"]}
    assert listing["outputs"] == ["*.bin", "results/**/*.png"]
    assert listing["truncated"] is False
    assert files["data.bin"]["size"] == 3_000_000
    assert files["data.bin"]["output"] is True
    assert files["results/deep/plot.png"]["output"] is True
    assert files["results/note.txt"] == {
        "path": "results/note.txt", "size": 6, "output": False,
        "modified": files["results/note.txt"]["modified"],
        "url": f"/api/jobs/{made['id']}/files/results/note.txt"}
    assert abs(files["results/note.txt"]["modified"] - time.time()) < 120
    # A link inside is listed as its file; links out, to the token, to folders are not.
    assert files["inner"]["size"] == 6
    assert {"escape", "up", "tok", "token", "spec.json", "results-link"}.isdisjoint(files)
    assert {"stdout", "stderr", "exit"} <= set(files)


# Downloads


def test_a_download_is_the_file_byte_for_byte(server: ServerProcess,
                                              made: dict[str, Any]) -> None:
    data = (job_dir(server, made) / "data.bin").read_bytes()
    answer = httpx.get(files_url(server, made, "data.bin"), headers=HEADERS, timeout=30)
    assert answer.status_code == 200
    assert hashlib.sha256(answer.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert answer.headers["content-length"] == "3000000"
    assert answer.headers["content-type"] == "application/octet-stream"
    assert answer.headers["content-disposition"] == (
        "attachment; filename=\"data.bin\"; filename*=UTF-8''data.bin")
    assert answer.headers["accept-ranges"] == "bytes"
    assert answer.headers["x-content-type-options"] == "nosniff"
    png = httpx.get(files_url(server, made, "results/deep/plot.png"), headers=HEADERS,
                    timeout=10)
    assert png.headers["content-type"] == "image/png"
    assert png.content == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("header", "start", "end"), [
    ("bytes=0-0", 0, 0), ("bytes=100-199", 100, 199), ("bytes=2999990-", 2999990, 2999999),
    ("bytes=-10", 2999990, 2999999), ("bytes=2999990-5000000", 2999990, 2999999),
    ("bytes=262140-524300", 262140, 524300),
])
def test_a_range_gives_exactly_the_bytes_asked_for(server: ServerProcess, made: dict[str, Any],
                                                   header: str, start: int, end: int) -> None:
    data = (job_dir(server, made) / "data.bin").read_bytes()
    answer = httpx.get(files_url(server, made, "data.bin"), timeout=10,
                       headers={**HEADERS, "Range": header})
    assert answer.status_code == 206
    assert answer.content == data[start:end + 1]
    assert answer.headers["content-range"] == f"bytes {start}-{end}/3000000"


def test_a_range_past_the_end_is_416(server: ServerProcess, made: dict[str, Any]) -> None:
    answer = httpx.get(files_url(server, made, "data.bin"), timeout=10,
                       headers={**HEADERS, "Range": "bytes=3000000-"})
    assert answer.status_code == 416
    assert answer.headers["content-range"] == "bytes */3000000"
    assert "error" in answer.json()


def test_validators_spare_a_second_download(server: ServerProcess,
                                            made: dict[str, Any]) -> None:
    first = httpx.get(files_url(server, made, "results/note.txt"), headers=HEADERS, timeout=10)
    etag, modified = first.headers["etag"], first.headers["last-modified"]
    again = httpx.get(files_url(server, made, "results/note.txt"), timeout=10,
                      headers={**HEADERS, "If-None-Match": etag})
    assert (again.status_code, again.content) == (304, b"")
    stale = httpx.get(files_url(server, made, "results/note.txt"), timeout=10,
                      headers={**HEADERS, "Range": "bytes=0-1", "If-Range": '"other"'})
    assert (stale.status_code, stale.content) == (200, b"hello\n")
    fresh = httpx.get(files_url(server, made, "results/note.txt"), timeout=10,
                      headers={**HEADERS, "Range": "bytes=0-1", "If-Range": modified})
    assert (fresh.status_code, fresh.content) == (206, b"he")


@pytest.mark.parametrize(("path", "status"), [
    ("..%2F..%2Fserver%2Fconfig.toml", 400),
    ("%2E%2E/%2E%2E/server/config.toml", 400),
    ("results/%2E%2E/%2E%2E/x", 400),
    ("/etc/passwd", 400),
    ("%2Fetc%2Fpasswd", 400),
    ("a%01b", 400),
    ("a%0Ab", 404),  # Starlette's path convertor does not take a newline
    ("a%7Fb", 400),
    ("escape", 403),
    ("up/config.toml", 403),
    ("up", 403),
    ("token", 404),
    ("tok", 404),
    ("spec.json", 404),
    ("missing", 404),
    ("results", 404),
    ("results-link/note.txt", 200),
])
def test_paths_that_leave_the_folder_are_refused(server: ServerProcess, made: dict[str, Any],
                                                 path: str, status: int) -> None:
    answer = httpx.get(files_url(server, made, path), headers=HEADERS, timeout=10)
    assert answer.status_code == status, answer.text
    if status != 200:
        assert "error" in answer.json()
        assert b"root:" not in answer.content and b"secret" not in answer.content


def test_a_file_over_the_cap_is_413(tmp_path: Path) -> None:
    config = LOCAL_CLUSTER + script_templates(tmp_path / "scripts", {"maker": MAKER})
    process = ServerProcess(state_dir=tmp_path / "server", extra_config=config,
                            server_settings={"max_download_bytes": 1_000_000})
    process.start()
    try:
        job = httpx.post(f"{process.url}/api/jobs", json={"template": "maker"}, timeout=10)
        record = job.json()
        deadline = time.monotonic() + 30
        while httpx.get(f"{process.url}/api/jobs/{record['id']}", timeout=10).json()[
                "state"] != "completed":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        url = f"{process.url}/api/jobs/{record['id']}/files"
        assert httpx.get(f"{url}/data.bin", timeout=10).status_code == 413
        assert httpx.get(f"{url}/results/note.txt", timeout=10).status_code == 200
    finally:
        process.stop()


# Who may read


def test_the_watch_token_reads_the_files_of_its_job_only(server: ServerProcess,
                                                         made: dict[str, Any]) -> None:
    token = made["watch_token"]
    url = files_url(server, made, "results/note.txt")
    assert httpx.get(url, params={"token": token}, timeout=10).content == b"hello\n"
    assert httpx.get(url, headers={"Authorization": f"Bearer {token}"},
                     timeout=10).status_code == 200
    assert httpx.get(files_url(server, made), params={"token": token},
                     timeout=10).status_code == 200
    assert httpx.get(url, timeout=10).status_code == 401
    assert httpx.get(url, params={"token": "x" + token[1:]}, timeout=10).status_code == 401
    other = httpx.post(f"{server.url}/api/jobs", json={"template": "sums"}, headers=HEADERS,
                       timeout=10).json()
    assert httpx.get(files_url(server, other), params={"token": token},
                     timeout=10).status_code == 401


def test_another_clients_key_finds_no_such_job(server: ServerProcess,
                                               made: dict[str, Any]) -> None:
    headers = {"Authorization": f"Bearer {OTHER_KEY}"}
    for url in (files_url(server, made), files_url(server, made, "data.bin")):
        answer = httpx.get(url, headers=headers, timeout=10)
        assert answer.status_code == 404
        assert answer.json()["error"] == "unknown job"


# Uploads


def upload(server: ServerProcess, template: str, files: list[tuple[str, bytes]],
           request: dict[str, Any] | None = None) -> httpx.Response:
    parts: list[tuple[str, tuple[str | None, bytes, str]]] = [
        ("job", (None, json.dumps(request or {"template": template}).encode(),
                 "application/json"))]
    parts += [("file", (name, data, "application/octet-stream")) for name, data in files]
    return httpx.post(f"{server.url}/api/jobs", files=parts, headers=HEADERS, timeout=30)


def test_uploaded_inputs_reach_the_job_intact(server: ServerProcess) -> None:
    inputs = {"a.bin": secrets.token_bytes(700_000), "b c.txt": b"text\n",
              "empty": b""}
    answer = upload(server, "sums", list(inputs.items()))
    assert answer.status_code == 201, answer.text
    job = finished(server, answer.json())
    sums = httpx.get(files_url(server, job, "sums.txt"), headers=HEADERS, timeout=10).text
    reported = {line[66:]: line[:64] for line in sums.splitlines()}
    assert reported == {name: hashlib.sha256(data).hexdigest() for name, data in inputs.items()}
    listed = {entry["path"] for entry in httpx.get(files_url(server, job), headers=HEADERS,
                                                   timeout=10).json()["files"]}
    assert {"inputs/a.bin", "inputs/b c.txt", "inputs/empty"} <= listed


@pytest.mark.parametrize(("files", "status"), [
    ([("big", b"x" * 1_000_001)], 413),
    ([("one", b"x" * 900_000), ("two", b"y" * 700_000)], 413),
    ([("../escape", b"x")], 400),
    ([(".hidden", b"x")], 400),
    ([("a/b", b"x")], 400),
    ([("same", b"x"), ("same", b"y")], 400),
])
def test_a_refused_upload_leaves_no_job_and_no_file(server: ServerProcess,
                                                   files: list[tuple[str, bytes]],
                                                   status: int) -> None:
    before = set((server.state_dir / "jobs" / "local").iterdir())
    jobs_before = httpx.get(f"{server.url}/api/jobs", headers=HEADERS, timeout=10).json()["jobs"]
    answer = upload(server, "sums", files)
    assert answer.status_code == status, answer.text
    assert "error" in answer.json()
    after = set((server.state_dir / "jobs" / "local").iterdir())
    # Empty folders may stay (the shell removes files only), never a file.
    assert [path for folder in after - before for path in folder.rglob("*")
            if not path.is_dir()] == []
    jobs_after = httpx.get(f"{server.url}/api/jobs", headers=HEADERS, timeout=10).json()["jobs"]
    assert len(jobs_after) == len(jobs_before)


def test_malformed_submissions_are_refused(server: ServerProcess) -> None:
    assert upload(server, "closed", [("a", b"x")]).status_code == 422
    bad_first = httpx.post(f"{server.url}/api/jobs", headers=HEADERS, timeout=10,
                           files=[("file", ("a", b"x", "text/plain"))])
    assert bad_first.status_code == 400
    assert "first part" in bad_first.json()["error"]
    no_boundary = httpx.post(f"{server.url}/api/jobs", timeout=10, content=b"x",
                             headers={**HEADERS, "Content-Type": "multipart/form-data"})
    assert no_boundary.status_code == 400
    cut = httpx.post(f"{server.url}/api/jobs", timeout=10,
                     content=b'--b\r\nContent-Disposition: form-data; name="job"\r\n\r\n{}',
                     headers={**HEADERS, "Content-Type": "multipart/form-data; boundary=b"})
    assert cut.status_code == 400


# The pure parts


@pytest.mark.parametrize("raw", ["", "/a", "a/../b", "..", "a\\b", "a\x00b", "a\nb", "a\x7f",
                                 "./", "a" * 1025, "x/" + "y" * 256])
def test_unsafe_paths_are_refused(raw: str) -> None:
    with pytest.raises(UnsafePath):
        relative_path(raw)


def test_paths_are_normalised() -> None:
    assert relative_path("a//./b/") == "a/b"
    assert relative_path("résumé ☃.txt") == "résumé ☃.txt"
    assert input_name("data.csv") == "data.csv"
    for name in ("a/b", ".x", "..", "x/"):
        with pytest.raises(UnsafePath):
            input_name(name) if name != "x/" else input_name("x/y")


@pytest.mark.parametrize(("header", "expected"), [
    (None, None), ("bytes=0-9", (0, 10)), ("bytes=5-", (5, 95)), ("bytes=-5", (95, 5)),
    ("bytes=-500", (0, 100)), ("bytes=90-200", (90, 10)), ("bytes=0-1,5-6", None),
    ("items=0-1", None), ("bytes=5-1", None), ("bytes=-", None), ("bytes=x-1", None),
])
def test_byte_ranges(header: str | None, expected: tuple[int, int] | None) -> None:
    assert byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=-0", "bytes=200-300"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        byte_range(header, 100)


BODY = (b"preamble\r\n--XyZ\r\n"
        b'Content-Disposition: form-data; name="job"\r\nContent-Type: application/json\r\n'
        b'\r\n{"template": "t"}\r\n--XyZ\r\n'
        b'Content-Disposition: form-data; name="file"; filename="a \\"q\\".bin"\r\n\r\n'
        b"\r\n--XyX\r\n-\r\x00\xff\r\n--XyZ--\r\nepilogue")


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 64, len(BODY)])
def test_multipart_parts_come_out_whole_whatever_the_pieces(piece: int) -> None:
    reader = MultipartReader(boundary_of("multipart/form-data; boundary=XyZ"))
    events: list[Any] = []
    for start in range(0, len(BODY), piece):
        reader.feed(BODY[start:start + piece])
        events += reader.events_received()
    reader.feed_eof()
    starts = [event for event in events if isinstance(event, PartStart)]
    assert starts == [PartStart("job", None, "application/json"),
                      PartStart("file", 'a "q".bin', "text/plain")]
    bodies: list[bytes] = []
    for event in events:
        if isinstance(event, PartStart):
            bodies.append(b"")
        elif isinstance(event, Data):
            bodies[-1] += event.data
    assert bodies == [b'{"template": "t"}', b"\r\n--XyX\r\n-\r\x00\xff"]
    assert sum(isinstance(event, PartEnd) for event in events) == 2


def test_a_multipart_body_without_its_end_is_refused() -> None:
    reader = MultipartReader("b")
    reader.feed(b'--b\r\nContent-Disposition: form-data; name="job"\r\n\r\n{}')
    with pytest.raises(BadInput):
        reader.feed_eof()
    with pytest.raises(BadInput):
        boundary_of("multipart/form-data")


# The CLI and the Python client


def cli(server: ServerProcess, *args: str, **options: Any) -> subprocess.CompletedProcess[bytes]:
    options.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, "-m", "metis_stream.cli", *args, "--url", server.url,
                           "--key", KEY], stdout=subprocess.PIPE, timeout=60, check=False,
                          **options)


def test_the_cli_lists_and_gets_files(server: ServerProcess, made: dict[str, Any],
                                      tmp_path: Path) -> None:
    listed = cli(server, "files", made["id"])
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.decode().splitlines()
    assert any(line.endswith("* data.bin") and "2.9 MiB" in line for line in lines), lines
    assert any(line.endswith("  results/note.txt") for line in lines), lines
    as_json = [json.loads(line) for line in cli(server, "files", made["id"], "--json")
               .stdout.splitlines()]
    assert {entry["path"] for entry in as_json} >= {"data.bin", "results/note.txt"}
    data = (job_dir(server, made) / "data.bin").read_bytes()
    got = cli(server, "get", made["id"], "data.bin", "-o", str(tmp_path / "copy.bin"))
    assert got.returncode == 0, got.stderr
    assert got.stderr == b""  # not a terminal: no progress bar
    assert (tmp_path / "copy.bin").read_bytes() == data
    named = cli(server, "get", made["id"], "results/note.txt", cwd=tmp_path)
    assert (named.returncode, (tmp_path / "note.txt").read_bytes()) == (0, b"hello\n")
    to_stdout = cli(server, "get", made["id"], "results/note.txt", "-o", "-")
    assert to_stdout.stdout == b"hello\n"
    missing = cli(server, "get", made["id"], "nothing", "-o", str(tmp_path / "nothing"))
    assert missing.returncode == 1
    assert b"no such file (404)" in missing.stderr
    assert not (tmp_path / "nothing").exists()
    assert list(tmp_path.glob(".*.part")) == []


def test_the_cli_shows_a_progress_bar_on_a_terminal(server: ServerProcess,
                                                   made: dict[str, Any],
                                                   tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    try:
        got = cli(server, "get", made["id"], "data.bin", "-o", str(tmp_path / "x"),
                  stderr=follower)
        os.close(follower)
        follower = -1
        shown = b""
        while True:
            try:
                piece = os.read(leader, 65536)
            except OSError:  # EIO: the terminal's other side is closed
                break
            if not piece:
                break
            shown += piece
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
    assert got.returncode == 0
    assert b"100%" in shown and b"x  [" + b"#" * 30 + b"]" in shown, shown


def test_the_cli_uploads_input_files(server: ServerProcess, tmp_path: Path) -> None:
    upload_file = tmp_path / "in put.bin"
    upload_file.write_bytes(secrets.token_bytes(500_000))
    submitted = cli(server, "submit", "sums", "--input", str(upload_file),
                    "--input", "https://example.org/x")
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.decode().strip()
    finished(server, {"id": job_id})
    sums = cli(server, "get", job_id, "sums.txt", "-o", "-").stdout.decode()
    assert sums == f"{hashlib.sha256(upload_file.read_bytes()).hexdigest()}  in put.bin\n"
    absent = cli(server, "submit", "sums", "--input", str(tmp_path / "absent"))
    assert absent.returncode == 1
    assert b"no such file" in absent.stderr


async def test_the_python_client_lists_downloads_and_uploads(server: ServerProcess,
                                                             made: dict[str, Any],
                                                             tmp_path: Path) -> None:
    async with Client(server.url, key=KEY) as client:
        listing = await client.files(made["id"])
        assert {entry["path"] for entry in listing["files"]} >= {"data.bin", "inner"}
        seen: list[tuple[int, int | None]] = []
        buffer = io.BytesIO()
        size = await client.download(made["id"], "data.bin", buffer,
                                     progress=lambda done, total: seen.append((done, total)))
        assert size == 3_000_000 and seen[-1] == (3_000_000, 3_000_000)
        assert buffer.getvalue() == (job_dir(server, made) / "data.bin").read_bytes()
        with pytest.raises(ClientError) as refused:
            await client.download(made["id"], "/etc/passwd", io.BytesIO())
        assert refused.value.status == 400
        upload_file = tmp_path / "data.csv"
        content = b"a,b\n1,2\n"
        upload_file.write_bytes(content)
        job = await client.submit("sums", files=[upload_file])
        finished(server, job)
        sums = io.BytesIO()
        await client.download(job["id"], "sums.txt", sums)
        assert sums.getvalue().decode() == (
            f"{hashlib.sha256(content).hexdigest()}  data.csv\n")
