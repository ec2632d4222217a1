"""The Starlette application: routes, lifespan, static viewer."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
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
from metis_stream.web import api, sockets
from metis_stream.web.deadline import ABORT, find_abort
from metis_stream.web.errors import handle_error, handle_starlette_error
from metis_stream.web.headers import SecurityHeaders
from metis_stream.web.hosts import HostCheck, ServerNames
from metis_stream.web.logs import redact_access_log
from metis_stream.web.slots import HistoryReads, SocketSlots

__all__ = [
    "create_app",
    "from_environment",
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
               schedulers: Mapping[str, Scheduler] | None = None) -> Starlette:
    """The server's app. A config without keys (``[server.keys.NAME]`` or ``api_keys``), or
    with a key given twice, is refused (ConfigError), the first unless it says
    ``insecure_no_auth``: an embedder gets no keyless server by default either."""
    check_auth(config)
    if config.server.insecure_no_auth:
        logger.warning("metis-stream: INSECURE: insecure_no_auth = true: no API keys, so every "
                       "user of this machine can submit jobs as this server's account and read, "
                       "watch and cancel every job")
    service = JobService(
        config,
        backend if backend is not None else build_backend(config),
        schedulers if schedulers is not None else build_schedulers(config),
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        redact_access_log()
        async with anyio.create_task_group() as tasks:
            await service.run(tasks)
            try:
                yield
            finally:
                tasks.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await service.close()

    names = ServerNames.of(config.server)
    job = "/api/jobs/{job_id}"
    routes = [
        Route("/healthz", api.healthz),
        Route("/metrics", api.metrics),
        Route("/api/meta", api.meta),
        Route("/api/templates", api.list_templates),
        Route("/api/clusters", api.list_clusters),
        Route("/api/jobs", api.create_job, methods=["POST"]),
        Route("/api/jobs", api.list_jobs, methods=["GET"]),
        Route(job, api.get_job, methods=["GET"]),
        Route(job, api.cancel_job, methods=["DELETE"]),
        Route(job + "/events", api.job_events, methods=["GET"]),
        Route(job + "/events", api.post_events, methods=["POST"]),
        Route(job + "/spec", api.job_spec),
        Route(job + "/spec/inputs", api.job_spec_inputs),
        Route(job + "/spec/params/{name}", api.job_spec_param),
        WebSocketRoute("/ws/jobs", sockets.submit_socket),
        WebSocketRoute("/ws/jobs/{job_id}", sockets.watch_socket),
        # Anything else under /api and /ws is a JSON 404, never the viewer's files.
        Route("/api/{rest:path}", api.no_such_route,
              methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
        WebSocketRoute("/ws/{rest:path}", sockets.no_such_route),
        Mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="viewer"),
    ]
    app = _App(routes=routes, lifespan=lifespan,
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
