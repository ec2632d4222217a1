"""Unit tests of metis_stream.ndjson: the sans-I/O reader of NDJSON event bodies."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.errors import EventTooLarge, InvalidEvent, MalformedEvent, TooLarge
from metis_stream.events import NewEvent
from metis_stream.ndjson import NdjsonReader, parse_ndjson
from tests.test_events import _body_of_size, body, json_values, text_no_surrogates

# parse_ndjson


def test_ndjson_parses_every_line_in_order():
    raw = b"\n".join(body(type="token", data=w) for w in ["a", "b", "c"]) + b"\n"
    assert [e.data for e in parse_ndjson(raw)] == ["a", "b", "c"]


def test_ndjson_skips_blank_lines_and_accepts_crlf():
    raw = b'\n{"type":"step"}\r\n   \n\t\n{"type":"log","data":1}\r\n'
    assert parse_ndjson(raw) == [NewEvent("step"), NewEvent("log", 1)]


def test_ndjson_empty_body_is_no_events():
    assert parse_ndjson(b"") == []
    assert parse_ndjson(b"\n\n  \n") == []


def test_ndjson_without_a_final_newline():
    assert parse_ndjson(b'{"type":"a"}\n{"type":"b"}') == [NewEvent("a"), NewEvent("b")]


@pytest.mark.parametrize(("bad_line", "error"), [
    (b"nope", MalformedEvent),
    (b'{"type":"Bad"}', InvalidEvent),
    (b'{"type":"starting"}', InvalidEvent),
    (b'{"type":"ok","extra":1}', InvalidEvent),
])
def test_ndjson_is_all_or_nothing_and_names_the_line(bad_line, error):
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad, line 5 good
    raw = b'{"type":"a"}\n\n{"type":"b"}\n' + bad_line + b'\n{"type":"c"}\n'
    with pytest.raises(error) as caught:
        parse_ndjson(raw)
    assert type(caught.value) is error
    assert str(caught.value).startswith("line 4: ")


def test_ndjson_line_too_large_keeps_its_class_and_line_number():
    raw = b'{"type":"a"}\n' + _body_of_size(200) + b"\n"
    with pytest.raises(EventTooLarge) as caught:
        parse_ndjson(raw, max_event_bytes=100)
    assert str(caught.value).startswith("line 2: ")


def test_ndjson_limit_is_per_line_not_per_body():
    lines = [_body_of_size(90) for _ in range(5)]
    assert len(parse_ndjson(b"\n".join(lines), max_event_bytes=100)) == 5


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["token", "step", "log", "x.y-z"]), json_values),
                max_size=8))
def test_ndjson_round_trip(items):
    raw = b"".join(orjson.dumps({"type": t, "data": d}) + b"\n" for t, d in items)
    assert parse_ndjson(raw) == [NewEvent(t, d) for t, d in items]


def test_ndjson_refuses_more_events_than_the_limit_but_not_blank_lines():
    raw = b'{"type":"a"}\n\n\n{"type":"b"}\n'
    assert len(parse_ndjson(raw, max_lines=2)) == 2
    with pytest.raises(TooLarge, match="at most 1 events"):
        parse_ndjson(raw, max_lines=1)


# NdjsonReader: a body fed in chunks


def _read_all(reader: NdjsonReader, chunks: list[bytes]) -> list[NewEvent]:
    events: list[NewEvent] = []
    for chunk in chunks:
        reader.feed(chunk)
        events += reader.events_received()
    reader.feed_eof()
    return events + reader.events_received()


def test_reader_hands_out_each_event_once_its_line_is_complete():
    reader = NdjsonReader()
    reader.feed(b'{"type":"a"}\n{"type"')
    assert reader.events_received() == [NewEvent("a")]
    assert reader.events_received() == []  # taken once
    reader.feed(b':"b"}\n')
    assert reader.events_received() == [NewEvent("b")]
    reader.feed_eof()
    assert reader.events_received() == []
    assert reader.error is None


def test_reader_takes_the_unterminated_last_line_at_eof():
    reader = NdjsonReader()
    reader.feed(b'{"type":"a"}\n{"type":"b"}')
    assert reader.events_received() == [NewEvent("a")]
    reader.feed_eof()
    assert reader.events_received() == [NewEvent("b")]


def test_reader_drops_a_blank_tail():
    assert _read_all(NdjsonReader(), [b'{"type":"a"}\n  \t']) == [NewEvent("a")]


def test_reader_bounds_a_line_that_never_ends():
    reader = NdjsonReader(max_event_bytes=20)
    reader.feed(b'{"type":"a"}\n' + b"x" * 20)
    errors = [reader.error]  # exactly the bound: still fine
    reader.feed(b"x")
    errors.append(reader.error)
    assert errors[0] is None
    assert isinstance(errors[1], EventTooLarge)
    assert str(errors[1]).startswith("line 2: ")
    assert reader.events_received() == [NewEvent("a")]


def test_reader_bound_applies_to_the_pending_line_only():
    line = b'{"type":"a"}'
    reader = NdjsonReader(max_event_bytes=len(line))
    events = _read_all(reader, [(line + b"\n") * 100])
    assert events == [NewEvent("a")] * 100
    assert reader.error is None


def test_reader_stops_at_a_bad_line_and_keeps_the_events_before_it():
    reader = NdjsonReader()
    reader.feed(b'{"type":"a"}\nnope\n{"type":"b"}\n')
    assert reader.events_received() == [NewEvent("a")]
    assert isinstance(reader.error, MalformedEvent)
    assert str(reader.error).startswith("line 2: ")
    reader.feed(b'{"type":"c"}\n')  # nothing more is read after an error
    reader.feed_eof()
    assert reader.events_received() == []


@st.composite
def events_and_cuts(draw: st.DrawFn) -> tuple[list[tuple[str, object]], list[bytes]]:
    items = draw(st.lists(st.tuples(st.sampled_from(["token", "step"]), json_values),
                          max_size=8))
    raw = b"".join(orjson.dumps({"type": t, "data": d}) + draw(st.sampled_from(
        [b"\n", b"\r\n", b"\n\n"])) for t, d in items)
    cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    chunks = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
    return items, chunks


@settings(max_examples=300, deadline=None)
@given(events_and_cuts())
def test_reader_is_independent_of_chunk_boundaries(case):
    items, chunks = case
    expected = [NewEvent(t, d) for t, d in items]
    assert _read_all(NdjsonReader(), chunks) == expected == parse_ndjson(b"".join(chunks))


@settings(max_examples=50, deadline=None)
@given(st.lists(text_no_surrogates, max_size=4))
def test_reader_of_plain_text_lines_names_the_first_bad_one(lines):
    raw = b"".join(body(type="log", data=line) + b"\n" for line in lines) + b"oops\n"
    reader = NdjsonReader()
    reader.feed(raw)
    assert len(reader.events_received()) == len(lines)
    assert isinstance(reader.error, InvalidEvent)
    assert str(reader.error).startswith(f"line {len(lines) + 1}: ")
