"""Security headers on every response: no page of another site may frame the viewer, no
response is sniffed into another type than it says, and the viewer's pages load nothing
but the server's own files and talk to nothing but its API and websockets.

The viewer has no inline script or style, so the policy needs no ``'unsafe-inline'``.
"""

from __future__ import annotations

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from metis_stream.web.hosts import ServerNames, host_name

RESPONSE_STARTS = frozenset({"http.response.start", "websocket.http.response.start"})
POLICY = ("default-src 'self'; connect-src {connect}; img-src 'self' blob:; object-src 'none'; "
          "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
"""``img-src blob:``: the viewer shows a job's image chunks from blobs that it made of their
bytes itself (docs/media.md); no other origin's image ever loads."""


def content_security_policy(host: str | None, names: ServerNames) -> str:
    """The policy for a response to a request for ``host``.

    ``'self'`` covers the page's own websockets in CSP Level 3 (Chromium, current Firefox
    and Safari), not in older browsers: the websocket URLs of the host are named too, when
    it is one of the server's own names (never a name the caller chose).
    """
    connect = "'self'"
    if host is not None and names.own(host_name(host)):
        connect += f" ws://{host} wss://{host}"
    return POLICY.format(connect=connect)


class SecurityHeaders:
    """ASGI middleware: adds the headers to every response, refusals included."""

    def __init__(self, app: ASGIApp, names: ServerNames) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        policy = content_security_policy(Headers(scope=scope).get("host"), self.names)

        async def send_with_headers(message: Message) -> None:
            if message["type"] in RESPONSE_STARTS:
                headers = MutableHeaders(scope=message)
                headers["Content-Security-Policy"] = policy
                headers["X-Frame-Options"] = "DENY"  # frame-ancestors for older browsers
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_headers)
