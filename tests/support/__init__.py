"""Real services for the tests: a server process, redis-server, the test cluster."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

IN_CI = os.environ.get("CI") == "true"


def service_unavailable(reason: str) -> NoReturn:
    """A service a test needs is missing: a failure in CI, where every service must be
    there, and a skip with the reason on a developer's machine."""
    if IN_CI:
        pytest.fail(f"needed in CI: {reason}", pytrace=False)
    pytest.skip(reason)
