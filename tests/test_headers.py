"""The security headers of every response (metis_stream/web/headers.py), against a real
server: no response may be framed or sniffed into another type, and the viewer loads
nothing but its own files and sockets. In Chromium: a page of another origin cannot frame
the viewer, and the viewer works under its policy without a single violation.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.support.server import ServerProcess
from tests.test_viewer import (
    TWELVE_WORDS,
    WAIT_MS,
    Viewer,
    browser,  # noqa: F401 - the module-scoped Chromium fixture
    submit_with_api,
    viewer,  # noqa: F401 - a page of the viewer on live_server
)

if TYPE_CHECKING:
    from playwright.sync_api import Browser


def policy(response: httpx.Response) -> dict[str, str]:
    """The Content-Security-Policy, directive by directive."""
    directives = (part.strip().split(" ", 1)
                  for part in response.headers["content-security-policy"].split(";"))
    return {name: value for name, value in directives}


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/", 200), ("GET", "/viewer.css", 200), ("GET", "/js/main.js", 200),
    ("GET", "/api/jobs", 200), ("GET", "/api/meta", 200), ("GET", "/healthz", 200),
    ("GET", "/api/nope", 404), ("POST", "/api/jobs", 415), ("GET", "/nope.html", 404),
])
def test_every_response_carries_the_security_headers(live_server: ServerProcess, method: str,
                                                     path: str, status: int):
    response = httpx.request(method, live_server.url + path)
    assert response.status_code == status
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    directives = policy(response)
    assert directives["frame-ancestors"] == "'none'"
    assert directives["default-src"] == "'self'"
    assert directives["img-src"] == "'self' blob:"
    host = f"127.0.0.1:{live_server.port}"
    assert directives["connect-src"] == f"'self' ws://{host} wss://{host}"


def test_a_refused_host_gets_them_too_without_its_name_in_the_policy(
        live_server: ServerProcess):
    response = httpx.get(f"{live_server.url}/", headers={"Host": "rebind.test"})
    assert response.status_code == 403
    assert response.headers["x-frame-options"] == "DENY"
    assert "rebind.test" not in response.headers["content-security-policy"]


@contextlib.contextmanager
def page_server(html: str) -> Iterator[str]:
    """Another origin on this machine (another port) serving one page."""

    class OnePage(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OnePage)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


@pytest.mark.browser
def test_a_page_of_another_origin_cannot_frame_the_viewer(
        browser: Browser, live_server: ServerProcess):  # noqa: F811
    framer = f'<!doctype html><iframe id="viewer" src="{live_server.url}/"></iframe>'
    with page_server(framer) as url:
        context = browser.new_context()
        try:
            page = context.new_page()
            page.set_default_timeout(WAIT_MS)
            refused: list[str] = []
            page.on("console", lambda message: refused.append(message.text)
                    if "frame-ancestors" in message.text else None)
            with page.expect_event("framenavigated",
                                   lambda frame: frame.parent_frame is not None):
                page.goto(url)
            page.wait_for_load_state("load")
            framed = page.frames[1]
            assert framed.evaluate("1") == 1  # the frame exists, with a document...
            assert framed.locator("#submit-form").count() == 0  # ...that is not the viewer
        finally:
            context.close()
    assert refused, "Chromium says why it refused the frame"


@pytest.mark.browser
def test_the_viewer_streams_a_job_under_its_policy_without_a_violation(
        viewer: Viewer):  # noqa: F811
    from playwright.sync_api import expect as _expect

    page = viewer.page
    page.add_init_script("""window.__violations = [];
        document.addEventListener("securitypolicyviolation", event =>
            window.__violations.push(`${event.violatedDirective} ${event.blockedURI}`));""")
    viewer.open()
    _expect(page.locator("#submit-form")).to_be_visible()
    job = submit_with_api(viewer.server, "tokens", text=TWELVE_WORDS, delay=0.02)
    viewer.open(f"#/jobs/{job['id']}")
    viewer.expect_state("completed")
    assert viewer.output() == TWELVE_WORDS
    assert any(url.startswith("ws://") for url in viewer.socket_urls)
    assert page.evaluate("window.__violations") == []
