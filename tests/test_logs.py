"""The log filter of metis_stream/web/logs.py: token values never reach a log line."""

from __future__ import annotations

import logging

import pytest

from metis_stream.web.logs import RedactTokens, redact_tokens


@pytest.mark.parametrize(("text", "redacted"), [
    ("/ws/jobs/j_1?token=secret", "/ws/jobs/j_1?token=REDACTED"),
    ("/ws/jobs/j_1?after=3&token=secret", "/ws/jobs/j_1?after=3&token=REDACTED"),
    ("/x?%74oken=secret&after=1", "/x?%74oken=REDACTED&after=1"),
    ("/x?to%6Ben=secret", "/x?to%6Ben=REDACTED"),
    ("/x?TOKEN=secret", "/x?TOKEN=REDACTED"),
    ("/x?token=a&token=b", "/x?token=REDACTED&token=REDACTED"),
    ("/x?after=1&tokens=kept&notoken=kept", "/x?after=1&tokens=kept&notoken=kept"),
])
def test_token_values_are_redacted_by_their_decoded_name(text: str, redacted: str) -> None:
    assert redact_tokens(text) == redacted


def test_the_filter_rewrites_the_arguments_of_a_record() -> None:
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/api/jobs/j/events?%74oken=s", "1.1", 200),
                               None)
    assert RedactTokens().filter(record)
    assert record.getMessage() == ('127.0.0.1:1 - "GET /api/jobs/j/events?%74oken=REDACTED '
                                   'HTTP/1.1" 200')
