"""Fixtures shared by the test suite. Each service fixture lives in tests/support/."""

pytest_plugins = [
    "tests.support.server",
]
