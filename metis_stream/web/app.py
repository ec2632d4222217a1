"""The Starlette application: routes, lifespan, static viewer.

The app runs on its own (``metis-stream serve``), or mounted in a host ASGI app under a
prefix; a Mount never runs the mounted app's lifespan, so the host enters
:func:`lifespan` in its own (docs/embedding.md).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send

from metis_stream.backends.contract import Backend
from metis_stream.config import Config, check_auth, load_config
from metis_stream.errors import MetisError
from metis_stream.factory import build_backend, build_schedulers
from metis_stream.schedulers.base import Scheduler
from metis_stream.service import JobService
from metis_stream.web import agent, api, files, sockets
from metis_stream.web.deadline import ABORT, find_abort
from metis_stream.web.errors import handle_error, handle_starlette_error
from metis_stream.web.guard import Authorize, Gate, HttpEndpoint
from metis_stream.web.headers import SecurityHeaders
from metis_stream.web.hosts import HostCheck, ServerNames
from metis_stream.web.logs import redact_access_log
from metis_stream.web.slots import HistoryReads, SocketSlots

__all__ = [
    "Authorize",
    "create_app",
    "from_environment",
    "lifespan",
]

STATIC_DIR = Path(__file__).parent / "static"
logger = logging.getLogger(__name__)


class _App(Starlette):
    """Starlette that keeps in each connection's scope how to abort the connection, taken
    from the server's own ``send`` before any middleware wraps it (see deadline.py)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope[ABORT] = find_abort(send)
        await super().__call__(scope, receive, send)


def from_environment() -> Starlette:
    """The app for ``uvicorn --factory metis_stream.web.app:from_environment``: its config
    from ``METIS_CONFIG`` (or the embedded defaults) and ``METIS_*`` variables."""
    path = os.environ.get("METIS_CONFIG")
    return create_app(load_config(Path(path) if path else None))


def create_app(config: Config, *, backend: Backend | None = None,
               schedulers: Mapping[str, Scheduler] | None = None,
               authorize: Authorize | None = None) -> Starlette:
    """The server's app. A config without keys (``[server.keys.NAME]`` or ``api_keys``), or
    with a key given twice, is refused (ConfigError), the first unless it says
    ``insecure_no_auth``: an embedder gets no keyless server by default either.

    ``backend`` and ``schedulers``: instead of those the config names. ``authorize``: a
    host app's own check of every client request, before metis-stream's (web/guard.py).
    """
    check_auth(config)
    if config.server.insecure_no_auth:
        logger.warning("metis-stream: INSECURE: insecure_no_auth = true: no API keys, so every "
                       "user of this machine can submit jobs as this server's account and read, "
                       "watch and cancel every job")
    backend = backend if backend is not None else build_backend(config)
    service = JobService(
        config, backend,
        schedulers if schedulers is not None else build_schedulers(config, backend),
    )

    names = ServerNames.of(config.server)
    gate = Gate(service, authorize)
    client, socket = gate.http, gate.socket

    def its_job(endpoint: HttpEndpoint) -> HttpEndpoint:
        """A route of the batch job's own, with its job token: never put to the host's
        hook (the job holds no session of the host's)."""
        return gate.http(endpoint, client=False)

    job = "/api/jobs/{job_id}"
    routes = [
        Route("/healthz", client(api.healthz)),
        Route("/metrics", client(api.metrics)),
        Route("/api/meta", client(api.meta)),
        # metis-agent's own: its key, never the host's hook (docs/agent.md).
        Route("/agent", gate.http(agent.get_agent, client=False), methods=["GET"]),
        Route("/agent.sha256", gate.http(agent.get_agent_hash, client=False),
              methods=["GET"]),
        Route("/api/agent/poll", gate.http(agent.agent_poll, client=False),
              methods=["POST"]),
        Route("/api/agent/reply", gate.http(agent.agent_reply, client=False),
              methods=["POST"]),
        Route("/api/templates", client(api.list_templates)),
        Route("/api/clusters", client(api.list_clusters)),
        Route("/api/clusters/{name}/login", client(api.login_cluster), methods=["POST"]),
        Route("/api/webhooks/failed", client(api.failed_webhooks), methods=["GET"]),
        Route("/api/webhooks/failed/{letter_id}/replay", client(api.replay_webhook),
              methods=["POST"]),
        Route("/api/jobs", client(api.create_job), methods=["POST"]),
        Route("/api/jobs", client(api.list_jobs), methods=["GET"]),
        Route(job, client(api.get_job), methods=["GET"]),
        Route(job, client(api.cancel_job), methods=["DELETE"]),
        Route(job + "/events", client(api.job_events), methods=["GET"]),
        Route(job + "/events", its_job(api.post_events), methods=["POST"]),
        Route(job + "/files", client(files.list_job_files), methods=["GET"]),
        Route(job + "/files/{path:path}", client(files.job_file), methods=["GET"]),
        Route(job + "/spec", its_job(api.job_spec)),
        Route(job + "/spec/inputs", its_job(api.job_spec_inputs)),
        Route(job + "/spec/params/{name}", its_job(api.job_spec_param)),
        WebSocketRoute("/ws/jobs", socket(sockets.submit_socket)),
        WebSocketRoute("/ws/jobs/{job_id}", socket(sockets.watch_socket)),
        # Anything else under /api and /ws is a JSON 404, never the viewer's files.
        Route("/api/{rest:path}", client(api.no_such_route),
              methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        WebSocketRoute("/ws/{rest:path}", socket(sockets.no_such_route)),
        Mount("/", gate.app(StaticFiles(directory=STATIC_DIR, html=True)), name="viewer"),
    ]
    app = _App(routes=routes, lifespan=_own_lifespan,
               middleware=[Middleware(SecurityHeaders, names=names),
                           Middleware(HostCheck, names=names)],
               exception_handlers={MetisError: handle_error,
                                   HTTPException: handle_starlette_error})
    app.state.service = service
    slots = app.state.socket_slots = SocketSlots(config.server.max_sockets_per_job,
                                                 config.server.max_sockets,
                                                 config.server.max_streams_per_client)
    service.metrics.gauge("metis_open_streams", lambda: slots.open)
    app.state.history_reads = HistoryReads(config.server.max_history_reads_per_client)
    return app


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[JobService]:
    """Run the job service of an app that :func:`create_app` built while the block lasts,
    and give it (for the program's own submissions: ``JobService.submit``).

    A host app that mounts the app enters this in its own lifespan: Starlette's and
    FastAPI's ``Mount`` never run a mounted app's lifespan. Entered while the service runs
    already (under a framework that does run them), it starts nothing a second time.
    """
    service = getattr(app.state, "service", None)
    if not isinstance(service, JobService):
        raise TypeError("metis_stream.lifespan() takes the app that create_app() returned, "
                        f"not {app!r}")
    # uvicorn's log lines carry the query strings of watch URLs: their tokens go.
    redact_access_log()
    if service.running:
        yield service
        return
    async with service:
        yield service


@asynccontextmanager
async def _own_lifespan(app: Starlette) -> AsyncIterator[None]:
    """The app's lifespan when it is the server's own app (``metis-stream serve``)."""
    async with lifespan(app):
        yield
