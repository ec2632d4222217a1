"""Who may do what: API keys for clients, watch tokens for one job's watchers, job tokens
for a job's own events. Every check runs before the job is looked up, so a refusal
never tells whether a job exists."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from metis_stream import tokens
from metis_stream.config import ServerConfig
from metis_stream.errors import NotAllowed, NotAuthenticated
from metis_stream.web.hosts import ServerNames, host_name


def bearer(conn: HTTPConnection) -> str | None:
    scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def is_client(conn: HTTPConnection, server: ServerConfig) -> bool:
    """A holder of an API key; anyone only on a server told ``insecure_no_auth``."""
    if not server.api_keys:
        return server.insecure_no_auth
    key = bearer(conn)
    return key is not None and tokens.api_key_matches(server.api_keys, key)


def client_identity(conn: HTTPConnection, server: ServerConfig) -> str:
    """Who a client is, for per-client limits: the hash of its API key or watch token (as
    Bearer or ``?token=``), or its address on a keyless server. Call it once the
    credentials have been checked."""
    credentials = bearer(conn) or conn.query_params.get("token")
    if server.api_keys and credentials:
        return tokens.hash_api_key(credentials)
    return conn.client.host if conn.client else "unknown"


def require_client(conn: HTTPConnection, server: ServerConfig) -> None:
    if not is_client(conn, server):
        raise NotAuthenticated("a valid API key is required (Authorization: Bearer <key>)")


def require_watcher(conn: HTTPConnection, server: ServerConfig, job_id: str) -> None:
    """A client, or the holder of this job's watch token (as Bearer or ``?token=``)."""
    if is_client(conn, server):
        return
    given = bearer(conn) or conn.query_params.get("token") or ""
    if not tokens.same_secret(tokens.watch_token(server.secret, job_id), given):
        raise NotAuthenticated("a valid API key or this job's watch token is required")


def require_job_token(conn: HTTPConnection, server: ServerConfig, job_id: str) -> None:
    given = bearer(conn) or ""
    if not tokens.same_secret(tokens.job_token(server.secret, job_id), given):
        raise NotAuthenticated("a valid job token is required (Authorization: Bearer <token>)")


def check_origin(conn: HTTPConnection, server: ServerConfig) -> None:
    """Browsers send Origin on websocket handshakes; a CLI sends none and is judged by its key.

    Browsers let any page open a websocket anywhere: a server without keys (told
    insecure_no_auth, on loopback) would take jobs from every site the user visits, so
    without an allowlist it takes them only from its own pages: an Origin of the Host the
    handshake was sent to, under a name of the server's own. A page whose name rebinds to
    the server's address has an Origin equal to its Host, so that alone would let it in.
    """
    origin = conn.headers.get("origin")
    if origin is None:
        return
    if server.allowed_origins:
        if origin not in server.allowed_origins:
            raise NotAllowed(f"origin {origin[:100]} is not allowed")
    elif not server.api_keys and not _own_page(origin, conn, server):
        raise NotAllowed(f"origin {origin[:100]} is not this server's; list it in "
                         "allowed_origins")


def _own_page(origin: str, conn: HTTPConnection, server: ServerConfig) -> bool:
    authority = origin.partition("://")[2]
    return (authority == conn.headers.get("host")
            and ServerNames.of(server).own(host_name(authority)))
