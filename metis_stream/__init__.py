"""metis-stream: put an HPC cluster behind a web application.

The public surface, the names a user imports; the README's "Public API" section
lists them, and tests/test_exports.py keeps the two in step. Anything else is
internal and may change.
"""

from metis_stream.client import Client
from metis_stream.config import Config, load_config
from metis_stream.errors import ClientError, MetisError
from metis_stream.events import Event, NewEvent
from metis_stream.jobs import Job, JobState
from metis_stream.service import JobService
from metis_stream.web.app import Authorize, create_app, lifespan

__all__ = [
    "Authorize",
    "Client",
    "ClientError",
    "Config",
    "Event",
    "Job",
    "JobService",
    "JobState",
    "MetisError",
    "NewEvent",
    "create_app",
    "lifespan",
    "load_config",
]
