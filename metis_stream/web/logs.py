"""Access logs without secrets: watch URLs carry tokens (``?token=...``)."""

from __future__ import annotations

import logging
import re

TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s]*")


class RedactTokens(logging.Filter):
    """Replace token values in uvicorn's log lines before they are written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(TOKEN_IN_QUERY.sub(r"\1REDACTED", arg) if isinstance(arg, str)
                                else arg for arg in record.args)
        return True


def redact_access_log() -> None:
    """uvicorn logs HTTP requests on ``uvicorn.access`` and websocket handshakes, with
    their query strings, on ``uvicorn.error``."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
