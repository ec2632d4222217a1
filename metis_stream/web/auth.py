"""Who may do what: API keys for clients, watch tokens for one job's watchers, job tokens
for a job's own events. Every check runs before the job is looked up, so a refusal
never tells whether a job exists. Which jobs a key sees is the service's business
(``JobService.get`` with the key this module found): a job it does not see is, to it, a
job that does not exist."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from metis_stream import keys, tokens
from metis_stream.config import ServerConfig
from metis_stream.errors import NotAllowed, NotAuthenticated
from metis_stream.keys import ApiKey
from metis_stream.web.hosts import ServerNames, host_name


def bearer(conn: HTTPConnection) -> str | None:
    scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return None
    return credentials.strip()


def api_key(conn: HTTPConnection, server: ServerConfig) -> ApiKey | None:
    """The API key the caller holds; on a server told ``insecure_no_auth``, anyone holds
    ``keys.KEYLESS`` (an admin's). None: no key, or not one of the server's."""
    ring = server.keyring
    if not ring:
        return keys.KEYLESS if server.insecure_no_auth else None
    given = bearer(conn)
    return None if given is None else keys.find(ring, given)


def client_identity(conn: HTTPConnection, server: ServerConfig) -> str:
    """Who a client is, for per-client limits: the hash of its API key or watch token (as
    Bearer or ``?token=``), or its address on a keyless server. Call it once the
    credentials have been checked."""
    credentials = bearer(conn) or conn.query_params.get("token")
    if server.keyring and credentials:
        return tokens.hash_api_key(credentials)
    return conn.client.host if conn.client else "unknown"


def require_client(conn: HTTPConnection, server: ServerConfig) -> ApiKey:
    key = api_key(conn, server)
    if key is None:
        raise NotAuthenticated("a valid API key is required (Authorization: Bearer <key>)")
    return key


def require_admin(conn: HTTPConnection, server: ServerConfig) -> ApiKey:
    """An admin key: for what tells of every key's jobs at once (the metrics, the webhooks'
    dead letters)."""
    key = require_client(conn, server)
    if not key.admin:
        raise NotAllowed("an admin key is required: this tells of every key's jobs")
    return key


def require_watcher(conn: HTTPConnection, server: ServerConfig, job_id: str) -> ApiKey | None:
    """An API key, or this job's watch token (as Bearer or ``?token=``): the key, or None
    for the watch token, which lets its holder read this one job whoever created it. A
    request with an API key is judged by its key."""
    key = api_key(conn, server)
    if key is not None:
        return key
    given = bearer(conn) or conn.query_params.get("token") or ""
    if not tokens.same_secret(tokens.watch_token(server.secret, job_id), given):
        raise NotAuthenticated("a valid API key or this job's watch token is required")
    return None


def require_job_token(conn: HTTPConnection, server: ServerConfig, job_id: str) -> int | None:
    """The job's token, or one of its array elements' (then that element's index)."""
    given = bearer(conn) or ""
    if tokens.same_secret(tokens.job_token(server.secret, job_id), given):
        return None
    element = tokens.element_of(server.secret, job_id, given)
    if element is None:
        raise NotAuthenticated("a valid job token is required (Authorization: Bearer <token>)")
    return element


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
    elif not server.keyring and not _own_page(origin, conn, server):
        raise NotAllowed(f"origin {origin[:100]} is not this server's; list it in "
                         "allowed_origins")


def _own_page(origin: str, conn: HTTPConnection, server: ServerConfig) -> bool:
    authority = origin.partition("://")[2]
    return (authority == conn.headers.get("host")
            and ServerNames.of(server).own(host_name(authority)))
