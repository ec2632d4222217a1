"""Which names the server answers to: the defence against DNS rebinding.

A page on a name that its owner makes resolve to 127.0.0.1 (or to any address of the
server) is, to the browser, the server's own origin: it may read every answer. Its
requests still name the page's host in ``Host``, so the server answers only requests
for its own names: the loopback names, the host of ``public_url`` (or of ``host`` and
``port`` without one) and ``[server] allowed_hosts``. ``"*"`` among them turns the
check off, for a reverse proxy that rewrites ``Host``; the proxy must then refuse
foreign names itself.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from metis_stream.config import ServerConfig
from metis_stream.errors import ConfigError, NotAllowed
from metis_stream.web.errors import deny, handle_error

ANY_HOST = "*"
AUTHORITY = re.compile(
    r"(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9_.-]+))(?::[0-9]{1,5})?")


def host_name(authority: str) -> str | None:
    """The name in a ``Host`` header or an origin's ``host[:port]``, in lower case and
    without a final dot; None if it is not a host name or an address."""
    match = AUTHORITY.fullmatch(authority)
    if match is None:
        return None
    return (match["ip6"] or match["name"]).lower().rstrip(".") or None


@dataclass(frozen=True, slots=True)
class ServerNames:
    """The names of one server, from its configuration."""

    names: frozenset[str]
    any_host: bool

    @classmethod
    def of(cls, server: ServerConfig) -> ServerNames:
        names = {host_name(urlsplit(server.events_base_url).netloc)}
        for entry in server.allowed_hosts:
            if entry != ANY_HOST:
                name = host_name(entry)
                if name is None:
                    raise ConfigError(f"[server] allowed_hosts: {entry!r} is not a host name "
                                      "or an address")
                names.add(name)
        return cls(frozenset(name for name in names if name is not None),
                   ANY_HOST in server.allowed_hosts)

    def own(self, name: str | None) -> bool:
        """Whether ``name`` is loopback or configured; the ``"*"`` does not make it so."""
        if name is None:
            return False
        return name == "localhost" or _is_loopback_address(name) or name in self.names

    def take(self, host: str | None) -> bool:
        """Whether to answer a request whose ``Host`` header is ``host``."""
        return self.any_host or (host is not None and self.own(host_name(host)))


def _is_loopback_address(name: str) -> bool:
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostCheck:
    """ASGI middleware: HTTP requests and websocket handshakes for a name that is not the
    server's get 403 before any route sees them."""

    def __init__(self, app: ASGIApp, names: ServerNames) -> None:
        self.app = app
        self.names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope, receive)
            if not self.names.take(request.headers.get("host")):
                response = await handle_error(request, _refusal(request.headers.get("host")))
                await response(scope, receive, send)
                return
        elif scope["type"] == "websocket":
            websocket = WebSocket(scope, receive, send)
            if not self.names.take(websocket.headers.get("host")):
                await deny(websocket, _refusal(websocket.headers.get("host")))
                return
        await self.app(scope, receive, send)


def _refusal(host: str | None) -> NotAllowed:
    if host is None:
        return NotAllowed("a Host header is required")
    return NotAllowed(f"this server does not answer to the name {host[:100]!r}; its operator "
                      "can add the name to [server] allowed_hosts")
