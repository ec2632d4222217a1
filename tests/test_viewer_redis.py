"""The viewer in a real headless Chromium against a server on the Redis backend that restarts
in the middle of a job: the page resumes with ``after=<lastSeq>`` and shows the whole text
exactly once; a new page replays the finished job.

Uses the Chromium launch and the helpers of tests/test_viewer.py. Screenshots go to
``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.redis_server import RedisServer
from tests.support.server import ServerProcess
from tests.test_viewer import (
    WAIT_MS,
    Viewer,
    browser,  # noqa: F401 - the module-scoped Chromium fixture
    wait_for_end,
    wait_for_words,
    word_count,
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.browser, pytest.mark.redis]

TEXT = " ".join(f"word{n}" for n in range(24))


@pytest.fixture
def redis_backed_server(redis_server: RedisServer, tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(state_dir=tmp_path / "server",
                           server_settings={"redis_url": redis_server.url})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_server_restart_on_redis_resumes_the_page_exactly_once(
        browser: Browser, redis_backed_server: ServerProcess) -> None:  # noqa: F811
    from playwright.sync_api import expect as _expect

    server = redis_backed_server
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        viewer = Viewer(page, server)
        viewer.open()
        page.get_by_label("tokens").check()
        page.get_by_label("text").fill(TEXT)
        page.get_by_label("delay").fill("0.12")
        page.get_by_role("button", name="Submit").click()
        job_id = viewer.job_id()

        partial = wait_for_words(viewer, 3)
        seq_before = page.evaluate("window.__metisViewer.state().lastSeq")
        server.restart()  # SIGTERM, then the same port, config and Redis data
        assert server.log().count("Started server process") == 2

        viewer.expect_state("completed")
        assert word_count(partial) < word_count(TEXT), "the restart must come mid-stream"
        assert viewer.output() == TEXT  # nothing lost, nothing doubled
        job = wait_for_end(server, job_id)
        assert job["state"] == "completed"
        _expect(page.locator("#events li")).to_have_count(job["last_seq"])
        _expect(page.locator("#connection")).to_have_attribute("data-conn", "ended")
        _expect(page.locator("#progress-text")).to_have_text("24 / 24 (100%)")
        resumed = [int(url.split("after=")[1].split("&")[0]) for url in viewer.socket_urls
                   if "after=" in url]
        assert len(resumed) >= 2 and resumed[0] == 0, viewer.socket_urls
        assert max(resumed) >= seq_before, "the page resumed after what it had"
        assert f"/ws/jobs/{job_id}?after={max(resumed)}" in server.log()
        viewer.screenshot("redis-restart-resumed")
        assert viewer.errors == [], viewer.errors

        # A new page replays the finished job from the Redis log.
        replay = Viewer(context.new_page(), server)
        replay.page.set_default_timeout(WAIT_MS)
        replay.open(f"#/jobs/{job_id}")
        replay.expect_state("completed")
        assert replay.output() == TEXT
        _expect(replay.page.locator("#events li")).to_have_count(job["last_seq"])
        _expect(replay.page.locator("#connection")).to_have_attribute("data-conn", "ended")
        assert replay.socket_urls and all("after=0" in url for url in replay.socket_urls)
        replay.screenshot("redis-restart-replayed")
        assert replay.errors == [], replay.errors
    finally:
        context.close()
