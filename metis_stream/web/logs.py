"""Access logs without secrets: watch URLs carry tokens (``?token=...``)."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

QUERY_PAIR = re.compile(r"([?&])([^&=\s]*)=([^&\s]*)")


def redact_tokens(text: str) -> str:
    """``text`` with the value of every ``token`` query parameter replaced.

    A parameter is judged by its name as the server reads it, percent-decoded: the server
    takes a watch token from ``?%74oken=`` as from ``?token=``.
    """
    return QUERY_PAIR.sub(_redact_pair, text)


def _redact_pair(pair: re.Match[str]) -> str:
    separator, name, _ = pair.groups()
    if unquote_plus(name).lower() != "token":
        return pair.group(0)
    return f"{separator}{name}=REDACTED"


class RedactTokens(logging.Filter):
    """Replace token values in uvicorn's log lines before they are written."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


def redact_access_log() -> None:
    """uvicorn logs HTTP requests on ``uvicorn.access`` and websocket handshakes, with
    their query strings, on ``uvicorn.error``."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())
