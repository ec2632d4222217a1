"""bench/launcher_latency.py, small and on the local scheduler only, so that the benchmark
cannot rot: a real redis-server, a real server, real jobs under the launcher."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import launcher_latency
from tests.support import service_unavailable

pytestmark = pytest.mark.redis


def test_the_launcher_latency_bench_runs_and_finds_every_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server is not installed")
    status = launcher_latency.main([
        "-t", "local", "--lines", "20", "--every", "0.01", "--runs", "1",
        "--flood", "2000", "--flood-runs", "1", "--settle", "0.1", "--idle", "0.2",
        "--workdir", str(tmp_path / "bench")])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "PROBLEM" not in out
    rows = {cells[1]: cells for line in out.splitlines() if line.startswith("local ")
            for cells in [[cell.strip() for cell in line.split("|")]]}
    # printed, received, lost/dup
    assert rows["1 x 20 lines / 10 ms"][2:5] == ["20", "20", "0/0"], out
    # printed, reached the server
    assert rows["empty job (x1)"][2:4] == ["0", "0"], out
    assert rows["flood of 2,000 (x1)"][2:4] == ["2,000", "2,000"], out
    assert rows["flood of 2,000, default budget (x1)"][2:4] == ["2,000", "2,000"], out
