"""Where the app is served: the path prefix of its URLs, and the check that a host app's
``public_url`` names it.

ASGI gives an app the prefix it is reached under as ``root_path``: a Starlette or FastAPI
``Mount`` adds its path to it, a server's ``--root-path`` (a proxy's prefix) its own. The
URLs that the API gives clients (``watch_url``, ``events_url``) start with it; the viewer
uses relative URLs and needs nothing. A batch job is given ``public_url`` instead (where
the compute nodes reach the server), fixed when the job is submitted, by a request or by
the program's own code: a host's mount path must already be in it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection
from starlette.types import Scope

from metis_stream.config import ServerConfig
from metis_stream.errors import EmbeddingError


def root_path(conn: HTTPConnection) -> str:
    """The prefix of this app's URLs as the client reached it, without a final slash."""
    prefix: str = conn.scope.get("root_path", "")
    return prefix.rstrip("/")


def mount_path(scope: Scope) -> str:
    """The part of ``root_path`` that Mounts of a host app added (``/hpc``), without what
    the server itself was given (``app_root_path``, which Starlette's first Mount keeps);
    empty when the app is not mounted."""
    prefix: str = scope.get("root_path", "")
    top: str | None = scope.get("app_root_path")
    if top is None or not prefix.startswith(top):
        return ""
    return prefix[len(top):].rstrip("/")


def check_public_url(conn: HTTPConnection, server: ServerConfig) -> None:
    """Refuse to submit while ``public_url`` lies outside the path that the app is mounted
    under: each job would post its events to the host app's own routes, and fail."""
    mounted = mount_path(conn.scope)
    base = server.events_base_url
    if mounted and not urlsplit(base).path.rstrip("/").endswith(mounted):
        raise EmbeddingError(
            f"this app is mounted at {mounted}, but its jobs would post their events to "
            f"{base}/api/jobs/...: set [server] public_url (or METIS_PUBLIC_URL) to the "
            f"address at which the compute nodes reach this app, its mount path included "
            f"(http://HOST:PORT{mounted}); see docs/embedding.md")
