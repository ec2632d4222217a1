"""The files API on the real test cluster (Slurm behind sshd), over SSH and SFTP: a job
writes a 50 MB binary and a PNG; the downloads' SHA-256 match the files on the cluster,
the server's memory stays flat while one streams, a Range gives exactly its bytes, ten
downloads at once all complete; uploaded inputs arrive intact; links out of the folder
are refused on the cluster side.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream import tokens
from tests.support.cluster import TestCluster, test_cluster  # noqa: F401
from tests.support.server import ServerProcess, free_port, script_templates

pytestmark = pytest.mark.cluster

KEY = "files-cluster-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
BIG_BYTES = 50 * 1024 * 1024
# A 1x1 PNG.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAF"
                       "BQIAX8jx0gAAAABJRU5ErkJggg==")
MAKER = f"""\
cd "$METIS_JOB_DIR" || exit 1
head -c {BIG_BYTES} /dev/urandom > big.bin
printf %s '{base64.b64encode(PNG).decode()}' | base64 -d > plot.png
ln -s /etc/passwd escape
ln -s .. up
"$METIS_EMIT" completed
"""
SUMS = """\
cd "$METIS_INPUTS_DIR" && sha256sum -- * > "$METIS_JOB_DIR/sums.txt"
"$METIS_EMIT" completed
"""
RSS_GROWTH_KIB = 10 * 1024


@dataclass
class Made:
    server: ServerProcess
    cluster: TestCluster
    job_id: str
    job_dir: str

    def url(self, path: str = "") -> str:
        return f"{self.server.url}/api/jobs/{self.job_id}/files" + (f"/{path}" if path else "")

    def remote_sha256(self, name: str) -> str:
        result = self.cluster.run_as_user(["sha256sum", f"{self.job_dir}/{name}"], check=True)
        return str(result.stdout).split()[0]


def finished(server: ServerProcess, job_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = httpx.get(f"{server.url}/api/jobs/{job_id}", headers=HEADERS,
                          timeout=10).json()["state"]
        if state in ("completed", "failed", "cancelled"):
            assert state == "completed", server.log()[-3000:]
            return
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not end: {server.log()[-3000:]}")


@pytest.fixture(scope="module")
def made(test_cluster: TestCluster,  # noqa: F811
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Made]:
    cluster = test_cluster
    folder = tmp_path_factory.mktemp("files-cluster")
    workdir = f"files-{secrets.token_hex(4)}"
    port = free_port(cluster.server_address)
    config = (f'\n[clusters.slurm]\nscheduler = "slurm"\nhost = "{cluster.host}"\n'
              f'port = {cluster.port}\nuser = "{cluster.user}"\nkey_file = "{cluster.key_file}"\n'
              f'known_hosts = "{cluster.known_hosts}"\nuse_agent = false\n'
              f'workdir = "{workdir}"\npoll_interval = 1\n'
              + script_templates(folder / "scripts", {"maker": MAKER, "sums": SUMS},
                                 {"maker": 'outputs = ["*.bin", "*.png"]\n'}, cluster="slurm"))
    server = ServerProcess(
        state_dir=folder / "server", host=cluster.server_address, port=port,
        extra_config=config, server_settings={
            "api_keys": [tokens.hash_api_key(KEY)],
            "public_url": f"http://{cluster.server_address}:{port}"})
    server.start()
    try:
        created = httpx.post(f"{server.url}/api/jobs", json={"template": "maker"},
                             headers=HEADERS, timeout=30)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        finished(server, job_id)
        home = cluster.run_as_user(["sh", "-c", "cd && pwd"], check=True).stdout
        yield Made(server, cluster, job_id, f"{str(home).strip()}/{workdir}/jobs/{job_id}")
    finally:
        server.stop()
        cluster.run_as_user(["rm", "-rf", "--", workdir])


def download(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    with httpx.stream("GET", url, headers={**HEADERS, **(headers or {})},
                      timeout=60) as answer:
        return answer.status_code, b"".join(answer.iter_bytes(1 << 20))


def test_the_listing_shows_the_outputs(made: Made) -> None:
    listing = httpx.get(made.url(), headers=HEADERS, timeout=30).json()
    files = {entry["path"]: entry for entry in listing["files"]}
    assert files["big.bin"]["size"] == BIG_BYTES and files["big.bin"]["output"]
    assert files["plot.png"]["size"] == len(PNG) and files["plot.png"]["output"]
    assert {"escape", "up", "token", "spec.json"}.isdisjoint(files)


def test_downloads_match_the_files_on_the_cluster_and_memory_stays_flat(made: Made) -> None:
    status, png = download(made.url("plot.png"))
    assert (status, png) == (200, PNG)
    assert hashlib.sha256(png).hexdigest() == made.remote_sha256("plot.png")
    download(made.url("big.bin"), {"Range": "bytes=0-1048575"})  # warm every code path
    baseline = made.server.rss_kib()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, made.server.rss_kib())
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    digest = hashlib.sha256()
    try:
        # A slow reader: the server must wait for it, not buffer the file.
        with httpx.stream("GET", made.url("big.bin"), headers=HEADERS, timeout=60) as answer:
            assert answer.status_code == 200
            assert answer.headers["content-length"] == str(BIG_BYTES)
            for chunk in answer.iter_bytes(1 << 20):
                digest.update(chunk)
    finally:
        done.set()
        sampler.join()
    assert digest.hexdigest() == made.remote_sha256("big.bin")
    print(f"server RSS: {baseline} KiB before, {peak} KiB at most during a 50 MB download")
    assert peak - baseline < RSS_GROWTH_KIB


def test_a_range_is_exactly_the_bytes_asked_for(made: Made) -> None:
    start, end = 7_000_001, 9_500_000
    status, part = download(made.url("big.bin"), {"Range": f"bytes={start}-{end}"})
    assert status == 206 and len(part) == end - start + 1
    expected = made.cluster.run_as_user(
        ["sh", "-c", f'tail -c +{start + 1} "$1" | head -c {end - start + 1} | sha256sum',
         "sh", f"{made.job_dir}/big.bin"], check=True)
    assert hashlib.sha256(part).hexdigest() == str(expected.stdout).split()[0]
    status, _ = download(made.url("big.bin"), {"Range": f"bytes={BIG_BYTES}-"})
    assert status == 416


def test_ten_downloads_at_once_all_complete(made: Made) -> None:
    expected = made.remote_sha256("big.bin")

    def fetch(_: int) -> str:
        digest = hashlib.sha256()
        with httpx.stream("GET", made.url("big.bin"), headers=HEADERS, timeout=60) as answer:
            assert answer.status_code == 200
            for chunk in answer.iter_bytes(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        digests = list(pool.map(fetch, range(10)))
    print(f"10 downloads of 50 MB at once: {time.monotonic() - started:.1f} s")
    assert digests == [expected] * 10


@pytest.mark.parametrize(("path", "status"), [
    ("escape", 403), ("up/x", 403), ("%2E%2E/%2E%2E/x", 400), ("token", 404),
    ("missing", 404),
    ("..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", 400), ("%2Fetc%2Fpasswd", 400),
    ("/etc/passwd", 400),
    ("a%0Ab", 404),  # Starlette's path convertor does not take a newline
])
def test_paths_out_of_the_folder_are_refused_on_the_cluster(made: Made, path: str,
                                                            status: int) -> None:
    answer = httpx.get(made.url(path), headers=HEADERS, timeout=30)
    assert answer.status_code == status, answer.text
    assert b"root:" not in answer.content


def test_uploaded_inputs_arrive_intact(made: Made, tmp_path: Path) -> None:
    inputs = {"data.bin": secrets.token_bytes(20 * 1024 * 1024 + 5), "notes.txt": b"hello\n"}
    parts: list[tuple[str, Any]] = [("job", (None, b'{"template": "sums"}', "application/json"))]
    parts += [("file", (name, data, "application/octet-stream"))
              for name, data in inputs.items()]
    created = httpx.post(f"{made.server.url}/api/jobs", files=parts, headers=HEADERS,
                         timeout=60)
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    finished(made.server, job_id)
    sums = httpx.get(f"{made.server.url}/api/jobs/{job_id}/files/sums.txt", headers=HEADERS,
                     timeout=30).text
    reported = {line[66:]: line[:64] for line in sums.splitlines()}
    assert reported == {name: hashlib.sha256(data).hexdigest() for name, data in inputs.items()}
