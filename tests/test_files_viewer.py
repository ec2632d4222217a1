"""The viewer's Files panel in a real headless Chromium against a real server: sizes,
outputs first, download links that download the file, an image shown inline, a text
file shown on request, and the panel filled in when a running job ends."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect as _expect

from tests.support.server import LOCAL_CLUSTER, ServerProcess, running, script_templates
from tests.test_files_cluster import PNG
from tests.test_viewer import WAIT_MS, browser, viewer_on  # noqa: F401

pytestmark = pytest.mark.browser

MAKER = f"""\
sleep 1
head -c 200000 /dev/urandom > data.bin
printf %s '{base64.b64encode(PNG).decode()}' | base64 -d > plot.png
mkdir -p results && printf 'hello from the job\\n' > results/note.txt
"$METIS_EMIT" completed
"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    config = LOCAL_CLUSTER + script_templates(tmp_path / "scripts", {"maker": MAKER}, {
        "maker": 'outputs = ["*.png", "*.bin"]\n'})
    with running(ServerProcess(state_dir=tmp_path / "server", extra_config=config)) as process:
        yield process


def test_the_files_panel_lists_previews_and_downloads(browser, server: ServerProcess,  # noqa: F811
                                                      tmp_path: Path) -> None:
    job = httpx.post(f"{server.url}/api/jobs", json={"template": "maker"}, timeout=10).json()
    with viewer_on(browser, server) as view:
        view.open(f"#/jobs/{job['id']}")
        page = view.page
        view.expect_state("completed")
        rows = page.locator("#files tr")
        _expect(rows.filter(has_text="plot.png")).to_have_count(1, timeout=WAIT_MS)
        paths = [row.get_attribute("data-path") for row in rows.all()]
        # The template's outputs first.
        assert paths[:2] == ["data.bin", "plot.png"], paths
        assert {"results/note.txt", "stdout", "stderr"} <= set(paths)
        data_row = rows.filter(has_text="data.bin")
        _expect(data_row).to_contain_text("195.3 KiB")
        _expect(data_row.locator(".output-badge")).to_have_text("output")
        image = rows.filter(has_text="plot.png").locator("img.file-thumb")
        _expect(image).to_be_visible()
        page.wait_for_function("img => img.complete && img.naturalWidth === 1",
                               arg=image.element_handle(), timeout=WAIT_MS)
        rows.filter(has_text="results/note.txt").get_by_role("button", name="Show").click()
        _expect(page.locator("#file-preview pre")).to_have_text("hello from the job\n")
        with page.expect_download() as download_info:
            data_row.locator("a.file-link").click()
        saved = tmp_path / "downloaded.bin"
        download_info.value.save_as(saved)
        folder = server.state_dir / "jobs" / "local" / job["id"]
        assert saved.read_bytes() == (folder / "data.bin").read_bytes()
        assert download_info.value.suggested_filename == "data.bin"
        view.screenshot("files-panel")


def test_the_panel_fills_in_when_the_job_ends(browser, server: ServerProcess) -> None:  # noqa: F811
    job = httpx.post(f"{server.url}/api/jobs", json={"template": "maker"}, timeout=10).json()
    with viewer_on(browser, server) as view:
        started = time.monotonic()
        view.open(f"#/jobs/{job['id']}")
        view.expect_state("completed")
        assert time.monotonic() - started < WAIT_MS / 1000
        _expect(view.page.locator("#files tr").filter(has_text="plot.png")).to_have_count(1)
        _expect(view.page.locator("#files-status")).to_contain_text("files")
