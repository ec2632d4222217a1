"""The README's plain-curl example works as written, and keeps the token off every
command line."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import EXAMPLE_TEMPLATES, LOCAL_CLUSTER, RunningJob, ServerProcess
from tests.test_web import custom_templates

README = Path(__file__).parent.parent / "README.md"


def readme_curl_example() -> str:
    text = README.read_text()
    start = text.index("With nothing but `curl`:")
    return re.search(r"```sh\n(.*?)```", text[start:], re.S).group(1)  # type: ignore[union-attr]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    process = ServerProcess(
        state_dir=tmp_path / "server",
        extra_config=LOCAL_CLUSTER + EXAMPLE_TEMPLATES + custom_templates(tmp_path / "scripts"))
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_the_plain_curl_example_posts_its_event_without_the_token_on_a_command_line(
        server: ServerProcess, tmp_path: Path):
    job = RunningJob(server, "sleepy")
    try:
        token_file = tmp_path / "token"
        token_file.write_text(job.token)
        token_file.chmod(0o600)
        # A curl that records its command line, then runs the real one.
        spy = tmp_path / "bin"
        spy.mkdir()
        argv_log = tmp_path / "curl-argv"
        real_curl = shutil.which("curl")
        assert real_curl is not None
        (spy / "curl").write_text(
            f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv_log}\nexec {real_curl} "$@"\n')
        (spy / "curl").chmod(stat.S_IRWXU)
        env = {"PATH": f"{spy}:{os.environ['PATH']}", "METIS_EVENTS_URL": job.url,
               "METIS_TOKEN_FILE": str(token_file)}
        done = subprocess.run(["sh", "-c", readme_curl_example()], env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        posted = [e for e in job.events() if e["type"] == "step"]
        assert posted[-1]["data"] == "Downloading input"
        assert argv_log.read_text(), "the example did not run curl"
        assert job.token not in argv_log.read_text()
    finally:
        job.end()
