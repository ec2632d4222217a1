"""The viewer (metis_stream/web/static/) in a real headless Chromium against a real server.

Each test drives the page the way a user does (the form, links, reloads) and
checks what the user sees. Screenshots go to ``test-artifacts/`` (git-ignored).
``docs/viewer.png`` is rewritten only when ``METIS_UPDATE_DOCS_SCREENSHOT=1``, so
that an ordinary run leaves the committed picture alone.

Chromium: ``METIS_CHROMIUM`` or ``chromium`` / ``chromium-browser`` on PATH. Missing,
the tests skip locally and FAIL when ``CI=true`` (a CI that cannot run them must
not look green).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from metis_stream.config import JOBSCRIPTS_DIR
from metis_stream.tokens import job_token
from metis_stream.web.app import STATIC_DIR
from tests.support import service_unavailable
from tests.support.processes import end_group
from tests.support.server import (
    IDLE_SCRIPT,
    LOCAL_CLUSTER,
    RunningJob,
    ServerProcess,
    free_port,
    local_job_script,
    running,
    script_templates,
)
from tests.test_cli_e2e import Demo
from tests.test_spool_local import SCRIPTS as SPOOL_SCRIPTS
from tests.test_spool_local import SPOOL_CLUSTER

pytestmark = pytest.mark.browser

REPO_ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO_ROOT / "test-artifacts"
DOCS_SCREENSHOT = REPO_ROOT / "docs" / "viewer.png"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TWELVE_WORDS = "The quick brown fox jumps over the lazy dog near the river"
WAIT_MS = 30_000

try:
    from playwright.sync_api import Browser, Page, sync_playwright
    from playwright.sync_api import expect as _expect

    PLAYWRIGHT_MISSING = ""
except ImportError as exc:  # pragma: no cover - the test extra is not installed
    PLAYWRIGHT_MISSING = f"the playwright package is not installed: {exc}"


def _chromium_path() -> str | None:
    explicit = os.environ.get("METIS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def chromium(*extra_args: str) -> Iterator[Browser]:
    """Headless Chromium, with ``extra_args`` on its command line; one at a time per
    process (Playwright's sync API cannot run twice at once)."""
    if PLAYWRIGHT_MISSING:
        service_unavailable(PLAYWRIGHT_MISSING)
    executable = _chromium_path()
    if executable is None:
        service_unavailable("no Chromium found (set METIS_CHROMIUM or put chromium on PATH)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable,
                                              args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


class Viewer:
    """One page of the viewer, with what a test needs to watch it."""

    def __init__(self, page: Page, server: ServerProcess) -> None:
        self.page = page
        self.server = server
        self.socket_urls: list[str] = []
        self.errors: list[str] = []
        page.on("websocket", lambda ws: self.socket_urls.append(ws.url))
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        # A refused websocket handshake or a dropped server logs a network error in the
        # console; that is expected in these tests. Script errors are not.
        if message.type == "error" and "WebSocket" not in message.text \
                and "Failed to load resource" not in message.text:
            self.errors.append(f"console: {message.text}")

    def open(self, fragment: str = "#/") -> None:
        self.page.goto(f"{self.server.url}/{fragment}")

    def output(self) -> str:
        text: str = self.page.locator("#output").text_content() or ""
        return text

    def expect_state(self, state: str, timeout: float = WAIT_MS) -> None:
        _expect(self.page.locator("#job-state")).to_have_text(state, timeout=timeout)

    def job_id(self) -> str:
        self.page.wait_for_url("**/#/jobs/*", timeout=WAIT_MS)
        return self.page.url.rsplit("/", 1)[1]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


@contextlib.contextmanager
def viewer_on(browser: Browser, server: ServerProcess) -> Iterator[Viewer]:
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    view = Viewer(page, server)
    try:
        yield view
        assert view.errors == [], view.errors  # the page never crashed
    finally:
        context.close()


@pytest.fixture
def viewer(browser: Browser, live_server: ServerProcess) -> Iterator[Viewer]:
    with viewer_on(browser, live_server) as view:
        yield view


def submit_with_api(server: ServerProcess, template: str, **params: Any) -> dict[str, Any]:
    response = httpx.post(f"{server.url}/api/jobs",
                          json={"template": template, "params": params}, timeout=10)
    assert response.status_code == 201, response.text
    record: dict[str, Any] = response.json()
    return record


def wait_for_end(server: ServerProcess, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{server.url}/api/jobs/{job_id}", timeout=5).json()
        if job["state"] in ("completed", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end in {timeout}s")


def word_count(text: str) -> int:
    return len(text.split())


def wait_for_words(view: Viewer, at_least: int) -> str:
    view.page.wait_for_function(
        "n => document.getElementById('output').textContent.split(' ')"
        ".filter(Boolean).length >= n", arg=at_least, timeout=WAIT_MS)
    return view.output()


# The tests


def test_submit_tokens_from_the_form_streams_growing_text(viewer: Viewer) -> None:
    page = viewer.page
    viewer.open()
    page.get_by_label("tokens").check()
    page.get_by_label("text").fill(TWELVE_WORDS)
    page.get_by_label("delay").fill("0.15")
    page.get_by_role("button", name="Submit").click()
    viewer.job_id()

    # Mid-stream: some words, not all, and the one text node that will keep growing.
    partial = wait_for_words(viewer, 2)
    assert 2 <= word_count(partial) < 12, partial
    assert TWELVE_WORDS.startswith(partial)
    page.evaluate("window.__firstTextNode = document.getElementById('output').firstChild")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "live")

    viewer.expect_state("completed")
    assert viewer.output() == TWELVE_WORDS
    # Appended in place: the same single Text node from the middle of the stream to the end.
    assert page.evaluate("""() => {
        const out = document.getElementById('output');
        return out.childNodes.length === 1 && out.firstChild === window.__firstTextNode;
    }""")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "ended")
    steps = page.locator("#steps li")
    _expect(steps).to_have_count(2)
    _expect(steps.nth(0)).to_contain_text("Loading model")
    _expect(steps.nth(1)).to_contain_text("Generating")
    for index in range(2):
        duration = steps.nth(index).locator(".duration").text_content() or ""
        assert duration.endswith(" s") and "so far" not in duration, duration
    _expect(page.locator("#progress-text")).to_have_text("12 / 12 (100%)")
    _expect(page.locator("#result")).to_contain_text('"tokens": 12')
    _expect(page.locator("#announcer")).to_have_text("Job completed.")

    viewer.screenshot("tokens-completed")
    if os.environ.get("METIS_UPDATE_DOCS_SCREENSHOT") == "1":
        page.screenshot(path=str(DOCS_SCREENSHOT), full_page=True)
        assert DOCS_SCREENSHOT.stat().st_size < 200_000


def test_dropped_socket_resumes_after_last_seq_exactly_once(viewer: Viewer) -> None:
    job = submit_with_api(viewer.server, "tokens", text=TWELVE_WORDS, delay=0.2)
    viewer.open(f"#/jobs/{job['id']}")
    wait_for_words(viewer, 3)
    seen = viewer.page.evaluate("window.__metisViewer.state().lastSeq")
    assert seen > 0

    viewer.page.evaluate("window.__metisViewer.dropConnection()")
    viewer.expect_state("completed")

    assert viewer.output() == TWELVE_WORDS  # nothing lost, nothing doubled
    resumed = [url for url in viewer.socket_urls if "after=0" not in url]
    assert len(viewer.socket_urls) >= 2 and resumed, viewer.socket_urls
    after = int(resumed[0].split("after=")[1].split("&")[0])
    assert after >= seen
    # Every event exactly once in the page's own list.
    last_seq = wait_for_end(viewer.server, job["id"])["last_seq"]
    _expect(viewer.page.locator("#events li")).to_have_count(last_seq)
    viewer.screenshot("tokens-after-dropped-socket")


def test_finished_job_opened_by_url_replays_its_history(viewer: Viewer) -> None:
    # Markup in the text must come out as text: job data never becomes HTML.
    text = ("<b>bold</b> <img/src=x/onerror=window.__xss=1> <script>window.__xss=2</script> "
            "and nine more words to make it twelve overall")
    job = submit_with_api(viewer.server, "tokens", text=text, delay=0)
    wait_for_end(viewer.server, job["id"])

    viewer.open(f"#/jobs/{job['id']}")
    viewer.expect_state("completed")
    assert viewer.output() == text
    assert viewer.page.evaluate(
        "document.querySelector('#output *, #result img, #result script') === null"
        " && window.__xss === undefined")
    _expect(viewer.page.locator("#connection")).to_have_attribute("data-conn", "ended")
    _expect(viewer.page.locator("#steps li")).to_have_count(2)
    _expect(viewer.page.locator("#progress-text")).to_have_text("12 / 12 (100%)")

    # The page survives a reload: the hash names the job.
    viewer.page.reload()
    viewer.expect_state("completed")
    assert viewer.output() == text
    viewer.screenshot("finished-job-replayed")


def test_fatal_job_shows_its_error(viewer: Viewer) -> None:
    page = viewer.page
    closed_port = free_port()  # nothing listens there: the download fails at once
    viewer.open()
    page.get_by_label("download").check()
    page.get_by_label("url").fill(f"http://127.0.0.1:{closed_port}/missing.bin")
    page.get_by_role("button", name="Submit").click()
    viewer.job_id()

    viewer.expect_state("failed")
    error = page.locator("#job-error")
    _expect(error).to_be_visible()
    _expect(error).to_contain_text("failed")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "ended")
    viewer.screenshot("download-fatal")


def post_as_the_job(server: ServerProcess, job_id: str, *events: dict[str, Any]) -> None:
    """Post events with the job's own token, as its batch script would."""
    token = job_token((server.state_dir / "secret").read_text().strip(), job_id)
    for event in events:
        response = httpx.post(f"{server.url}/api/jobs/{job_id}/events", json=event,
                              headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 200, response.text


def test_logs_result_links_and_exit_status(viewer: Viewer) -> None:
    page = viewer.page
    job = submit_with_api(viewer.server, "tokens", text=TWELVE_WORDS, delay=2)
    viewer.open(f"#/jobs/{job['id']}")
    wait_for_words(viewer, 1)
    # The job posts its own progress right after its first word: wait for it, so that it
    # cannot land after the progress event below.
    _expect(page.locator("#progress-text")).to_have_text("1 / 12 (8%)")
    post_as_the_job(
        viewer.server, job["id"],
        {"type": "log", "data": "loaded 3 rows"},
        {"type": "progress", "data": {"current": 1, "total": 4, "label": "Tables"}},
        {"type": "result", "data": {"report": "https://example.org/report?id=7",
                                    "bad": "javascript:alert(1)"}},
        {"type": "fatal", "data": {"error": "out of memory", "exit_status": 137}},
    )
    viewer.expect_state("failed")
    log_line = page.locator("#logs .log-line")
    _expect(log_line).to_have_text(["loaded 3 rows"])
    _expect(log_line).to_have_attribute("data-stream", "message")
    _expect(page.locator("#progress-text")).to_have_text("Tables: 1 / 4 (25%)")
    links = page.locator("#result a")
    _expect(links).to_have_count(1)  # the javascript: string stays text
    _expect(links).to_have_attribute("href", "https://example.org/report?id=7")
    _expect(page.locator("#job-error")).to_contain_text("out of memory")
    _expect(page.locator("#job-exit-status")).to_have_text("(exit status 137)")
    assert page.evaluate("document.querySelector('#output *') === null")
    viewer.screenshot("logs-result-fatal")


# The log pane: a job's output, as the launcher streams it (docs/launcher.md)

PRINTER_SCRIPT = r"""echo 'compiling 3 files'
printf '\033[1;31merror:\033[0m missing ; at line 3\n' >&2
printf '\033[32mok\033[0m 2 of 3 passed\n'
sleep 1
i=1; while [ $i -le 100 ]; do echo "filler line $i"; i=$((i + 1)); done
"""
"""A batch script as a lab writes it: plain and coloured lines on stdout and stderr, then
more than its template's output budget allows (``log_max_bytes = 300``). The pause lets
the first lines go out before the flood: the launcher sends the two streams in the
order it reads them, and a late stderr line would find the budget spent."""

AT_BOTTOM = """() => {
    const pane = document.getElementById('logs');
    return pane.scrollHeight > pane.clientHeight
        && pane.scrollHeight - pane.clientHeight - pane.scrollTop <= 1;
}"""

SETTLED_SCROLL_TOP = """() => new Promise(done => {
    // A wheel scrolls smoothly, over frames: the position once it has held for 5 of them.
    const pane = document.getElementById('logs');
    let last = -1, same = 0;
    const look = () => {
        same = pane.scrollTop === last ? same + 1 : 0;
        last = pane.scrollTop;
        if (same >= 5) done(last); else requestAnimationFrame(look);
    };
    requestAnimationFrame(look);
})"""


@pytest.fixture
def log_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with ``idle`` (its jobs wait for the test's events) and ``printer``."""
    scripts = script_templates(tmp_path / "scripts",
                               {"idle": IDLE_SCRIPT, "printer": PRINTER_SCRIPT},
                               {"printer": "log_max_bytes = 300\n"})
    with running(ServerProcess(state_dir=tmp_path / "server",
                               extra_config=LOCAL_CLUSTER + scripts)) as server:
        yield server


@pytest.fixture
def log_viewer(browser: Browser, log_server: ServerProcess) -> Iterator[Viewer]:
    with viewer_on(browser, log_server) as view:
        yield view


@pytest.fixture
def idle_job(log_server: ServerProcess) -> Iterator[RunningJob]:
    job = RunningJob(log_server, "idle")
    try:
        yield job
    finally:
        job.end()


def post_log(job: RunningJob, data: Any) -> None:
    response = job.post_event({"type": "log", "data": data})
    assert response.status_code == 200, response.text


def shown_lines(view: Viewer) -> list[tuple[str, str]]:
    """The pane's lines as the reader sees them: (stream, text)."""
    lines: list[list[str]] = view.page.evaluate(
        "[...document.querySelectorAll('#logs .log-line')]"
        ".map(line => [line.dataset.stream, line.textContent])")
    return [(stream, text) for stream, text in lines]


def test_log_pane_tells_stdout_from_stderr_and_renders_ansi_colours(log_viewer: Viewer) -> None:
    """A script run unchanged under the launcher: its stdout and stderr lines in one pane,
    told apart; its colours rendered and no escape left as text; the budget's notice."""
    page = log_viewer.page
    job = submit_with_api(log_viewer.server, "printer")
    log_viewer.open(f"#/jobs/{job['id']}")
    log_viewer.expect_state("completed")
    lines = page.locator("#logs .log-line")
    _expect(lines.filter(has_text="compiling 3 files")).to_have_attribute("data-stream", "stdout")
    error = lines.filter(has_text="missing ; at line 3")
    _expect(error).to_have_attribute("data-stream", "stderr")
    _expect(error).to_have_text("error: missing ; at line 3")
    _expect(error.locator("span.ansi-fg-1.ansi-bold")).to_have_text("error:")
    _expect(lines.filter(has_text="2 of 3 passed").locator("span.ansi-fg-2")).to_have_text("ok")
    notice = page.locator('#logs .log-line[data-stream="notice"]')
    _expect(notice).to_have_text(
        re.compile(r"^output truncated after \d+ lines; the files hold all of it$"))
    _expect(lines.last).to_have_attribute("data-stream", "notice")

    text = page.locator("#logs").text_content() or ""
    assert "\x1b" not in text and "[0m" not in text and "[32m" not in text, text
    # Told apart by more than a colour: stderr and the notice carry a label (generated
    # content, which a copy of the log leaves out).
    looks = page.evaluate("""() => Object.fromEntries(['stdout', 'stderr', 'notice'].map(
        stream => {
            const line = document.querySelector(`#logs .log-line[data-stream="${stream}"]`);
            return [stream, {color: getComputedStyle(line).color,
                             label: getComputedStyle(line, '::before').content}];
        }))""")
    assert looks["stderr"]["color"] != looks["stdout"]["color"], looks
    assert "err" in looks["stderr"]["label"] and "note" in looks["notice"]["label"], looks
    assert looks["stdout"]["label"] in ("none", "normal"), looks
    log_viewer.screenshot("log-pane-streams")


def test_log_pane_shows_hostile_lines_inertly(log_viewer: Viewer, idle_job: RunningJob) -> None:
    """Escapes that would act on a terminal, markup and control characters: shown as
    text or dropped, never interpreted. Data of other shapes (a string, as from
    ``metis-emit log TEXT``, or any JSON value) is shown as text too."""
    page = log_viewer.page
    log_viewer.open(f"#/jobs/{idle_job.id}")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "live")
    title = page.title()
    post_log(idle_job, {"stream": "stdout", "lines": [
        "\x1b]0;pwned\x07after a window title",
        "<script>window.__xss = 3</script><img src=x onerror='window.__xss = 4'>",
        "nul\x00 and bell\x07",
        "\x1b[2J\x1b[Hthe screen was not cleared",
        "\x1b]8;;javascript:alert(1)\x1b\\not a link\x1b]8;;\x1b\\",
        "\u202eright-to-left override",
        "cut off \x1b[31",
    ]})
    post_log(idle_job, "a message \x1b[33min yellow\x1b[0m\nand its second line\n")
    post_log(idle_job, {"stream": "stdout", "lines": "not a list"})
    post_log(idle_job, 42)
    _expect(page.locator("#logs .log-line")).to_have_count(11)

    assert shown_lines(log_viewer) == [
        ("stdout", "after a window title"),
        ("stdout", "<script>window.__xss = 3</script><img src=x onerror='window.__xss = 4'>"),
        ("stdout", "nul^@ and bell^G"),
        ("stdout", "the screen was not cleared"),
        ("stdout", "not a link"),
        ("stdout", "U+202Eright-to-left override"),
        ("stdout", "cut off ^[[31"),
        ("message", "a message in yellow"),
        ("message", "and its second line"),
        ("message", '{"stream":"stdout","lines":"not a list"}'),
        ("message", "42"),
    ]
    assert page.evaluate("document.querySelector('#logs script, #logs img, #logs a') === null"
                         " && window.__xss === undefined")
    assert page.title() == title
    placeholders = page.locator("#logs .ansi-ctrl")
    _expect(placeholders).to_have_count(4)
    _expect(placeholders.first).to_have_attribute("title", "control character U+0000")
    _expect(page.locator("#logs .ansi-fg-3")).to_have_text("in yellow")
    log_viewer.screenshot("log-pane-hostile")


def test_log_pane_follows_the_latest_line_until_the_reader_scrolls_up(
        log_viewer: Viewer, idle_job: RunningJob) -> None:
    """At the bottom, the pane shows each new line as it comes. Scrolled up (by the wheel
    or the keyboard), it leaves the reader where they are and offers a way back; back
    at the bottom, or with that button, it follows again."""
    page = log_viewer.page
    log_viewer.open(f"#/jobs/{idle_job.id}")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "live")
    pane = page.locator("#logs")
    lines = page.locator("#logs .log-line")
    latest = page.get_by_role("button", name="jump to latest")

    def post_lines(first: int, last: int) -> None:
        post_log(idle_job, {"stream": "stdout",
                            "lines": [f"line {i}" for i in range(first, last + 1)]})
        _expect(lines).to_have_count(last)

    post_lines(1, 200)
    page.wait_for_function(AT_BOTTOM)
    _expect(latest).to_be_hidden()

    # The reader scrolls up: the pane stays where they are, and offers the way back.
    pane.hover()
    page.mouse.wheel(0, -600)
    _expect(latest).to_be_visible()
    reading = page.evaluate(SETTLED_SCROLL_TOP)
    post_lines(201, 300)
    assert page.evaluate(SETTLED_SCROLL_TOP) == reading
    _expect(latest).to_be_visible()

    # Back at the bottom, it follows again.
    page.mouse.wheel(0, 100_000)
    _expect(latest).to_be_hidden()
    post_lines(301, 400)
    page.wait_for_function(AT_BOTTOM)

    # Up with the keyboard, then down with the button.
    pane.focus()
    page.keyboard.press("PageUp")
    _expect(latest).to_be_visible()
    post_lines(401, 500)
    assert not page.evaluate(AT_BOTTOM)
    log_viewer.screenshot("log-pane-paused")
    latest.click()
    _expect(latest).to_be_hidden()
    page.wait_for_function(AT_BOTTOM)
    _expect(pane).to_be_focused()
    post_lines(501, 600)
    page.wait_for_function(AT_BOTTOM)


def test_log_pane_keeps_the_last_lines_of_a_long_log(log_viewer: Viewer,
                                                     idle_job: RunningJob) -> None:
    """More lines than the pane keeps: the oldest go, and the pane says how many."""
    page = log_viewer.page
    log_viewer.open(f"#/jobs/{idle_job.id}")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "live")
    kept = page.evaluate("async () => (await import('./js/log-pane.js')).MAX_LINES")
    total = kept + 1500
    for first in range(1, total + 1, 1000):
        post_log(idle_job, {"stream": "stdout", "lines": [
            f"line {i}" for i in range(first, min(first + 999, total) + 1)]})
    lines = page.locator("#logs .log-line")
    _expect(lines.last).to_have_text(f"line {total}")
    _expect(lines).to_have_count(kept)
    _expect(lines.first).to_have_text("line 1501")
    _expect(page.locator("#logs-dropped")).to_have_text(
        f"1,500 earlier lines are not shown here: the pane keeps the last {kept:,}.")
    page.wait_for_function(AT_BOTTOM)


ANSI_CASES: list[tuple[str, list[list[str]]]] = [
    ("plain\ttab", [["plain\ttab", ""]]),
    ("\x1b[31mred\x1b[0m then plain", [["red", "ansi-fg-1"], [" then plain", ""]]),
    ("\x1b[1;92;44mbright\x1b[39;49mbold only\x1b[22m",
     [["bright", "ansi-bold ansi-fg-10 ansi-bg-4"], ["bold only", "ansi-bold"]]),
    ("\x1b[1mA\x1b[22mB\x1b[mC", [["A", "ansi-bold"], ["BC", ""]]),
    ("\x1b[38;5;3m256: 3\x1b[38;5;200m 256: 200", [["256: 3", "ansi-fg-3"], [" 256: 200", ""]]),
    ("\x1b[38;2;255;0;0;1mtrue colour, then bold", [["true colour, then bold", "ansi-bold"]]),
    ("\x1b[38:5:1mcolons skipped", [["colons skipped", ""]]),
    ("\x1b[?25l\x1b[2K\x1b[1Gcursor and erase", [["cursor and erase", ""]]),
    ("\x1b]0;title\x07\x1b]8;;https://example.org\x1b\\link\x1b]8;;\x1b\\", [["link", ""]]),
    ("\x1bc\x1b(Breset and charset", [["reset and charset", ""]]),
    ("\x1b]0;no end", [["^[", "ansi-ctrl"], ["]0;no end", ""]]),
    ("\x1b[31mred \x00 still red",
     [["red ", "ansi-fg-1"], ["^@", "ansi-ctrl"], [" still red", "ansi-fg-1"]]),
    ("a\x7fb\x9bc\x1b", [["a", ""], ["^?", "ansi-ctrl"], ["b", ""], ["U+009B", "ansi-ctrl"],
                          ["c", ""], ["^[", "ansi-ctrl"]]),
]


def test_ansi_parser_renders_colours_and_drops_every_other_escape(viewer: Viewer) -> None:
    """js/ansi.js alone, in the page: line -> [text, classes] segments."""
    viewer.open()
    _expect(viewer.page.locator("#submit-form")).to_be_visible()
    parsed = viewer.page.evaluate("""async lines => {
        const { parseAnsi } = await import('./js/ansi.js');
        return lines.map(line => parseAnsi(line).map(s => [s.text, s.classes.join(' ')]));
    }""", [line for line, _ in ANSI_CASES])
    for (line, expected), segments in zip(ANSI_CASES, parsed, strict=True):
        assert segments == expected, repr(line)


def test_an_event_that_came_by_the_spool_is_marked_in_the_event_list(
        browser: Browser, tmp_path: Path) -> None:
    server = ServerProcess(state_dir=tmp_path / "server", extra_config=SPOOL_CLUSTER
                           + script_templates(tmp_path / "scripts", SPOOL_SCRIPTS))
    with running(server), viewer_on(browser, server) as view:
        job = submit_with_api(server, "steps")
        view.open(f"#/jobs/{job['id']}")
        view.expect_state("completed")
        view.page.locator("#events-panel summary").click()
        step = view.page.locator("#events li", has_text="step 1").first
        _expect(step.locator(".via")).to_have_text("spool")
        _expect(step.locator(".via")).to_have_attribute(
            "title", "read from the job's spool on the shared filesystem")
        starting = view.page.locator("#events li", has_text="starting")
        _expect(starting.locator(".via")).to_have_count(0)


# A host-less Slurm cluster whose commands are these scripts: squeue fails while the
# file "down" exists (slurmctld away), and says the job runs otherwise.
FAKE_SLURM = {
    "sbatch": "#!/bin/sh\necho 4242\n",
    "squeue": '#!/bin/sh\nif [ -e "$HOME/down" ]; then\n'
              '    echo "slurm_load_jobs error: Unable to contact slurm controller" >&2\n'
              '    exit 1\nfi\necho "4242|RUNNING|None"\n',
    "scancel": "#!/bin/sh\nexit 0\n",
}


def test_a_stale_cluster_is_shown_until_it_recovers(browser: Browser, tmp_path: Path) -> None:
    bin_dir, home = tmp_path / "bin", tmp_path / "home"
    bin_dir.mkdir()
    home.mkdir()
    for name, body in FAKE_SLURM.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    config = ('[clusters.hpc]\nscheduler = "slurm"\npoll_interval = 0.2\n'
              'delivery = "http"\nworkdir = "ms"\n'
              + script_templates(tmp_path / "scripts", {"remote": "sleep 1\n"},
                                 cluster="hpc"))
    server = ServerProcess(state_dir=tmp_path / "server", extra_config=config,
                           env={"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    with running(server), viewer_on(browser, server) as view:
        job = submit_with_api(server, "remote")
        view.open(f"#/jobs/{job['id']}")
        view.expect_state("running")
        banner = view.page.locator("#cluster-stale")
        _expect(banner).to_be_hidden()
        (home / "down").touch()
        _expect(banner).to_be_visible()
        _expect(banner).to_contain_text("hpc has not answered since")
        _expect(banner).to_contain_text("the cluster's scheduler does not answer")
        _expect(banner).to_contain_text("The job runs on")
        view.expect_state("running")
        view.screenshot("cluster-stale")
        (home / "down").unlink()
        _expect(banner).to_be_hidden()
        view.expect_state("running")
        [cluster] = httpx.get(f"{server.url}/api/clusters", timeout=10).json()["clusters"]
        httpx.delete(f"{server.url}/api/jobs/{job['id']}", timeout=10)
        log = server.log()
    assert cluster["state"] == "ok"
    # The change of health is logged once each way, the recovery too (at INFO).
    assert log.count("cluster hpc: degraded") == 1, log
    assert log.count("cluster hpc: ok (polls work again)") == 1, log


def test_server_restart_with_memory_backend_marks_the_job_lost(viewer: Viewer) -> None:
    """The memory backend forgets every job on restart: the page must say so, not crash.

    (Resuming exactly once across a restart needs the Redis backend; that is a
    separate test.)"""
    job = submit_with_api(viewer.server, "tokens", text=TWELVE_WORDS, delay=0.3)
    viewer.open(f"#/jobs/{job['id']}")
    partial = wait_for_words(viewer, 2)
    script = local_job_script(viewer.server.url, job["id"])

    viewer.server.restart()
    # The job runs on, unknown to the new process: no cancel can reach it.
    try:
        _expect(viewer.page.locator("#connection")).to_have_attribute("data-conn", "lost",
                                                                      timeout=WAIT_MS)
        _expect(viewer.page.locator("#notice")).to_contain_text("Unknown job")
        _expect(viewer.page.locator("#job-state")).to_have_text("unknown")
        # What arrived before the restart stays on the page.
        assert viewer.output().startswith(partial)
        viewer.screenshot("memory-restart-lost-job")
    finally:
        end_group(script)


def test_every_module_loads(viewer: Viewer) -> None:
    """index.html loads js/main.js, which imports the rest: every module on disk is fetched
    once, as JavaScript (a module with another Content-Type does not run), and no request
    of the page fails."""
    page = viewer.page
    failed: list[str] = []
    modules: dict[str, str] = {}

    def on_response(response: Any) -> None:
        if response.status >= 400:
            failed.append(f"{response.status} {response.url}")
        if response.url.endswith(".js"):
            modules[response.url.rsplit("/", 1)[1]] = response.headers.get("content-type", "")

    page.on("response", on_response)
    page.on("requestfailed", lambda request: failed.append(f"failed {request.url}"))
    viewer.open()
    _expect(page.locator("#submit-form")).to_be_visible()
    page.wait_for_load_state("networkidle")

    assert failed == [], failed
    on_disk = sorted(path.name for path in (STATIC_DIR / "js").glob("*.js"))
    assert sorted(modules) == on_disk, (sorted(modules), on_disk)
    for name, content_type in modules.items():
        assert content_type.split(";")[0] in ("text/javascript", "application/javascript"), (
            name, content_type)
    assert page.evaluate("typeof window.__metisViewer.state") == "function"


def test_job_state_follows_the_servers_state_machine(viewer: Viewer) -> None:
    """The viewer has no state machine of its own: served a changed GET /api/meta, it
    follows the change. A viewer with a built-in copy would show "running" and stay live."""
    page = viewer.page
    served: list[dict[str, Any]] = []

    def changed_meta(route: Any) -> None:
        meta = route.fetch().json()  # the server's own table, then two changes:
        meta["rank"]["running"] = meta["rank"]["queued"]  # running is no step up from queued
        meta["terminal_types"].append("halfway")  # a new type ends the job, cancelled
        meta["state_after_event"]["halfway"] = "cancelled"
        served.append(meta)
        route.fulfill(json=meta)

    page.route("**/api/meta", changed_meta)
    job = submit_with_api(viewer.server, "tokens", text=TWELVE_WORDS, delay=2)
    viewer.open(f"#/jobs/{job['id']}")
    wait_for_words(viewer, 1)
    assert len(served) == 1  # loaded once, at start-up
    # Tokens would make the job "running"; with that rank they leave it "queued".
    viewer.expect_state("queued")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "live")
    _expect(page.locator("#cancel-job")).to_be_visible()

    post_as_the_job(viewer.server, job["id"], {"type": "halfway", "data": None})
    viewer.expect_state("cancelled")
    _expect(page.locator("#connection")).to_have_attribute("data-conn", "ended")
    _expect(page.locator("#cancel-job")).to_be_hidden()
    _expect(page.locator("#announcer")).to_have_text("Job cancelled.")
    # The server's own record is unchanged: for it, the job is still running.
    record = httpx.get(f"{viewer.server.url}/api/jobs/{job['id']}", timeout=10).json()
    assert record["state"] == "running", record
    viewer.screenshot("state-machine-from-meta")
    httpx.delete(f"{viewer.server.url}/api/jobs/{job['id']}", timeout=10)


def test_failed_meta_request_shows_a_notice_then_recovers(viewer: Viewer) -> None:
    """Without GET /api/meta the viewer cannot work: it says so and shows no page; the next
    navigation tries again."""
    page = viewer.page
    page.route("**/api/meta", lambda route: route.fulfill(
        status=503, json={"error": "the backend is not available"}))
    viewer.open("#/jobs/01NOSUCHJOB")
    notice = page.locator("#notice")
    _expect(notice).to_be_visible()
    _expect(notice).to_contain_text("Could not load the job states")
    _expect(notice).to_contain_text("the backend is not available")
    _expect(page.locator("#job-view")).to_be_hidden()
    _expect(page.locator("#home-view")).to_be_hidden()
    assert viewer.socket_urls == []
    viewer.screenshot("meta-failed")

    page.unroute("**/api/meta")
    page.evaluate("location.hash = '#/'")
    _expect(page.locator("#submit-form")).to_be_visible()
    _expect(notice).to_be_hidden()


def test_phone_width_has_no_horizontal_scroll(browser: Browser,
                                              live_server: ServerProcess) -> None:
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True,
                                  has_touch=True, device_scale_factor=2)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    view = Viewer(page, live_server)
    try:
        long_word = "averyveryverylongwordwithoutanyspacesthatwouldoverflowanarrowscreen" * 2
        job = submit_with_api(live_server, "tokens", text=f"{TWELVE_WORDS} {long_word}",
                              delay=0)
        wait_for_end(live_server, job["id"])

        view.open()
        _expect(page.locator("#jobs-list li")).to_have_count(1)
        _expect(page.locator("#submit-form")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        view.screenshot("phone-home")

        view.open(f"#/jobs/{job['id']}")
        view.expect_state("completed")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        view.screenshot("phone-job")
        assert view.errors == [], view.errors
    finally:
        context.close()


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(state_dir=tmp_path / "keyed",
                           server_settings={"api_keys": ["test-key-123"]})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_api_key_is_asked_for_then_used(browser: Browser, keyed_server: ServerProcess) -> None:
    """With api_keys, a 401 asks for the key; with it, fetches send Bearer and the
    websocket watches with the job's watch token."""
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    view = Viewer(page, keyed_server)
    try:
        view.open()
        _expect(page.locator("#notice")).to_contain_text("needs an API key")
        _expect(page.locator("#api-key")).to_be_focused()

        page.locator("#api-key").fill("test-key-123")
        page.get_by_role("button", name="Save").click()
        page.locator("#template-tokens").check()
        page.get_by_label("text").fill("one two three")
        page.get_by_label("delay").fill("0")
        page.get_by_role("button", name="Submit").click()
        view.job_id()
        view.expect_state("completed")
        assert view.output() == "one two three"
        assert all("token=" in url for url in view.socket_urls), view.socket_urls
        assert view.errors == [], view.errors
    finally:
        context.close()


def test_the_demos_address_gives_the_viewer_its_key_then_leaves_the_address_bar(
        browser: Browser, tmp_path: Path) -> None:
    """The demo prints ``/#key=<its API key>``: the page stores the key, takes it out of the
    address (a bookmark, a shared link or the screen would show it), and works with it."""
    demo = Demo(tmp_path / "state")
    context = browser.new_context(viewport={"width": 1000, "height": 900})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    requested: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda request: requested.append(request.url))
    try:
        assert len(demo.key) >= 32, demo.viewer_url
        page.goto(demo.viewer_url)
        # The templates loaded: the key worked (the demo also has tokens-spool).
        _expect(page.locator("#template-tokens")).to_be_visible()
        assert page.url == f"{demo.url}/#/"
        assert demo.key not in page.evaluate("location.href")
        assert page.evaluate("localStorage.getItem('metis-stream.api-key')") == demo.key
        _expect(page.locator("#api-key")).to_have_value(demo.key)
        _expect(page.locator("#notice")).to_be_hidden()

        page.locator("#template-tokens").check()
        page.get_by_label("text").fill("from the demo address")
        page.get_by_label("delay").fill("0")
        page.get_by_role("button", name="Submit").click()
        page.wait_for_url("**/#/jobs/*")
        _expect(page.locator("#job-state")).to_have_text("completed")
        _expect(page.locator("#output")).to_have_text("from the demo address")
        page.reload()  # the key stays in this browser, not in the address
        _expect(page.locator("#job-state")).to_have_text("completed")
        assert demo.key not in page.evaluate("location.href")
        # A fragment is never sent: no request carried the key in its URL.
        assert not [url for url in requested if demo.key in url], requested
        assert errors == [], errors
        demo.interrupt()
    finally:
        context.close()
        demo.stop()


# Media: a job's chunk events played and shown (docs/media.md)

AUDIO_NOTES = 12
AUDIO_BOX = "#media .media-stream[data-stream='audio']"


def png(width: int, height: int, shade: int) -> bytes:
    """A real PNG of one grey, for the browser to decode."""
    def part(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    rows = b"".join(b"\x00" + bytes([shade]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + part(b"IHDR", header) + part(b"IDAT", zlib.compress(rows))
            + part(b"IEND", b""))


@pytest.fixture
def media_server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server with the embedded defaults' ``audio`` template, and ``idle``."""
    audio = (f'\n[templates.audio]\ncluster = "local"\nscript = "{JOBSCRIPTS_DIR / "audio.pbs"}"\n'
             'params.notes = { type = "int", min = 1, max = 120, default = 8 }\n'
             'params.delay = { type = "float", min = 0, max = 5, default = 0.5 }\n')
    scripts = script_templates(tmp_path / "scripts", {"idle": IDLE_SCRIPT})
    with running(ServerProcess(state_dir=tmp_path / "server",
                               extra_config=LOCAL_CLUSTER + scripts + audio)) as server:
        yield server


def wait_for_decoded(page: Page, seconds: float) -> None:
    """Until the audio box has decoded at least ``seconds`` of audio."""
    page.wait_for_function(
        "([s, n]) => Number(document.querySelector(s).dataset.decodedSeconds) >= n",
        arg=[AUDIO_BOX, seconds])


def wait_for_width(page: Page, selector: str, width: int) -> None:
    page.wait_for_function("([s, w]) => document.querySelector(s).naturalWidth === w",
                           arg=[selector, width])


def box_counts(view: Viewer, selector: str) -> dict[str, str]:
    counts: dict[str, str] = view.page.eval_on_selector(selector, "node => ({...node.dataset})")
    return counts


def test_audio_plays_while_it_arrives_and_a_reload_resumes_without_a_gap(
        browser: Browser, media_server: ServerProcess) -> None:
    job = submit_with_api(media_server, "audio", notes=AUDIO_NOTES, delay=0.4)
    with viewer_on(browser, media_server) as viewer:
        page = viewer.page
        viewer.open(f"#/jobs/{job['id']}")
        box = page.locator(AUDIO_BOX)
        _expect(box).to_have_attribute("data-kind", "audio")
        # Headless Chromium lets a page play at once (a browser that wants a gesture first
        # leaves it suspended, and the button says Play); the button pauses and plays.
        button = page.locator(f"{AUDIO_BOX} button.play")
        _expect(box).to_have_attribute("data-state", "running")
        button.click()
        _expect(box).to_have_attribute("data-state", "suspended")
        _expect(button).to_have_text("Play")
        button.click()
        _expect(box).to_have_attribute("data-state", "running")
        _expect(button).to_have_text("Pause")
        # Decoded while the job runs, and heard: the level meter moves.
        wait_for_decoded(page, 1)
        assert page.locator("#job-state").text_content() == "running"
        page.wait_for_function("s => document.querySelector(s).value > 0.01",
                               arg=f"{AUDIO_BOX} meter")
        # A dropped socket and then a reload in the middle: every chunk once, no gap.
        viewer.page.evaluate("window.__metisViewer.dropConnection()")
        wait_for_decoded(page, 2)
        page.reload()
        viewer.expect_state("completed")
        result = wait_for_end(media_server, job["id"])
        events = httpx.get(f"{media_server.url}/api/jobs/{job['id']}/events", timeout=10).json()
        chunks = sum(e["type"] == "chunk" for e in events["events"])
        assert result["state"] == "completed" and chunks == 1 + AUDIO_NOTES
        _expect(box).to_have_attribute("data-chunks", str(chunks))
        counts = box_counts(viewer, AUDIO_BOX)
        assert (counts["nextIndex"], counts["gaps"]) == (str(chunks), "0")
        assert float(counts["decodedSeconds"]) == pytest.approx(AUDIO_NOTES / 2, abs=1e-3)
        _expect(page.locator(f"{AUDIO_BOX} .media-status")).to_contain_text("received")
        viewer.screenshot("media-audio")


def test_image_chunks_show_the_latest_frame_and_a_gallery(browser: Browser,
                                                          media_server: ServerProcess) -> None:
    job = RunningJob(media_server, "idle")
    try:
        with viewer_on(browser, media_server) as viewer:
            page = viewer.page
            viewer.open(f"#/jobs/{job.id}")
            for index, (width, shade) in enumerate([(24, 40), (48, 200)]):
                response = job.post_event({"type": "chunk", "data": {
                    "stream": "frames", "index": index, "media_type": "image/png",
                    "base64": base64.b64encode(png(width, 16, shade)).decode()}})
                assert response.status_code == 200, response.text
            box = "#media .media-stream[data-stream='frames']"
            _expect(page.locator(f"{box} .media-gallery img")).to_have_count(2)
            # The browser decoded the PNGs (a blob: image that the policy refused has none).
            wait_for_width(page, f"{box} .media-latest", 48)
            assert page.eval_on_selector_all(f"{box} .media-gallery img",
                                             "imgs => imgs.map(i => i.naturalWidth)") == [24, 48]
            page.locator(f"{box} .media-gallery button").first.click()
            wait_for_width(page, f"{box} .media-latest", 24)
            _expect(page.locator("#events li").last).to_contain_text("frames #1 image/png")
            viewer.screenshot("media-images")
    finally:
        job.end()
