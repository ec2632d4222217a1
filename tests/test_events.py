"""Unit tests of metis_stream.events: validation, size limits, wire."""

from __future__ import annotations

import base64
import re
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.errors import EventTooLarge, InvalidEvent, MalformedEvent
from metis_stream.events import (
    CHUNK_OVERHEAD,
    MAX_EVENT_BYTES,
    SERVER_ONLY_TYPES,
    TERMINAL_TYPES,
    Chunk,
    Event,
    NewEvent,
    chunk_capacity,
    decode_event,
    encode_event,
    parse_chunk,
    parse_event_json,
    parse_new_event,
    validate_type,
)

REFERENCE_TYPE = re.compile(r"[a-z][a-z0-9_.\-]{0,63}")
REFERENCE_KEY = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")

BUILT_IN_JOB_TYPES = ["queued", "running", "step", "progress", "token", "chunk", "log",
                      "result", "completed", "fatal"]

text_no_surrogates = st.text(st.characters(codec="utf-8"), max_size=20)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False) | text_no_surrogates,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(text_no_surrogates, inner, max_size=4),
    max_leaves=12,
)


def body(**fields: Any) -> bytes:
    return orjson.dumps(fields)


# validate_type and the type pattern


@pytest.mark.parametrize("name", ["a", "token", "step", "x9", "a.b-c_d", "a" * 64,
                                  "my.custom-type_2"])
def test_valid_types_are_accepted(name):
    assert validate_type(name) == name


@pytest.mark.parametrize("name", ["", "A", "Token", "1abc", "_a", ".a", "-a", "a b", "a/b",
                                  "a" * 65, "token\n", "\ntoken", "tok\u00e9n", "a:b"])
def test_invalid_types_are_refused(name):
    with pytest.raises(InvalidEvent, match="'type' must be a string"):
        validate_type(name)


@pytest.mark.parametrize("value", [None, 1, 1.5, True, ["token"], {"type": "token"}, b"token"])
def test_non_string_types_are_refused(value):
    with pytest.raises(InvalidEvent):
        validate_type(value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("abcXYZ019_.-: \n\t/\u00e9"), max_size=70))
def test_type_validation_agrees_with_the_documented_pattern(name):
    expected = REFERENCE_TYPE.fullmatch(name) is not None
    try:
        validate_type(name)
    except InvalidEvent:
        accepted = False
    else:
        accepted = True
    assert accepted == expected


# parse_new_event


def test_parse_new_event_minimal_and_full():
    assert parse_new_event({"type": "step"}) == NewEvent("step", None, None)
    assert parse_new_event({"type": "token", "data": " hi", "id": "k-1"}) == NewEvent(
        "token", " hi", "k-1")


@pytest.mark.parametrize("data", [None, 0, "", [], {}, {"nested": [1, {"a": None}]}, 3.25])
def test_data_is_kept_exactly(data):
    assert parse_new_event({"type": "result", "data": data}).data == data


@pytest.mark.parametrize("server_type", sorted(SERVER_ONLY_TYPES))
def test_server_only_types_are_refused_from_jobs(server_type):
    with pytest.raises(InvalidEvent, match="only the server"):
        parse_new_event({"type": server_type})
    # ... but the server itself may append them
    assert parse_new_event({"type": server_type}, from_job=False).type == server_type


def test_server_only_types_are_exactly_the_documented_ones():
    assert {"starting", "submitted", "cancelled", "stale", "recovered",
            "elements"} == SERVER_ONLY_TYPES
    assert {"completed", "fatal", "cancelled"} == TERMINAL_TYPES


@pytest.mark.parametrize("job_type", [t for t in [*BUILT_IN_JOB_TYPES, "my-custom.event"]
                                      if t != "chunk"])
def test_jobs_may_post_their_own_types(job_type):
    assert parse_new_event({"type": job_type}).type == job_type


@pytest.mark.parametrize("raw", [None, [], "token", 7, [{"type": "token"}]])
def test_an_event_must_be_an_object(raw):
    with pytest.raises(InvalidEvent, match="JSON object"):
        parse_new_event(raw)


def test_type_is_required():
    with pytest.raises(InvalidEvent, match="needs a 'type'"):
        parse_new_event({"data": 1})


def test_unknown_fields_are_refused_and_named():
    with pytest.raises(InvalidEvent, match="unknown field") as caught:
        parse_new_event({"type": "token", "seq": 3, "job": "j_x"})
    assert "job" in str(caught.value)
    assert "seq" in str(caught.value)


@pytest.mark.parametrize("key", ["a", "A-z_0.9:x", "x" * 128,
                                 "01HX3ZJ5K1:retry-2", "step.1"])
def test_valid_idempotency_keys(key):
    assert parse_new_event({"type": "step", "id": key}).id == key


@pytest.mark.parametrize("key", ["", "x" * 129, "a b", "a/b", "a\n", "k\u00e9", 5, 1.0, True,
                                 ["a"], {"a": 1}])
def test_invalid_idempotency_keys(key):
    with pytest.raises(InvalidEvent, match="'id'"):
        parse_new_event({"type": "step", "id": key})


def test_null_id_means_no_key():
    assert parse_new_event({"type": "step", "id": None}).id is None


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("aZ09_.:-/ \u00e9"), max_size=130))
def test_idempotency_key_agrees_with_the_documented_pattern(key):
    expected = REFERENCE_KEY.fullmatch(key) is not None
    try:
        parse_new_event({"type": "step", "id": key})
    except InvalidEvent:
        accepted = False
    else:
        accepted = True
    assert accepted == expected


def test_terminal_property_of_new_events():
    assert NewEvent("completed").terminal
    assert NewEvent("fatal").terminal
    assert NewEvent("cancelled").terminal
    assert not NewEvent("result").terminal
    assert not NewEvent("running").terminal


# parse_event_json: JSON and size limits


def test_parse_event_json_accepts_a_valid_body():
    event = parse_event_json(body(type="progress", data={"current": 1, "total": 3}, id="p1"))
    assert event == NewEvent("progress", {"current": 1, "total": 3}, "p1")


@pytest.mark.parametrize("raw", [b"", b"not json", b"{", b'{"type": "step",}', b"\xff\xfe",
                                 b"{'type': 'step'}", b'{"type": "step"} trailing'])
def test_non_json_is_malformed(raw):
    with pytest.raises(MalformedEvent, match="not valid JSON"):
        parse_event_json(raw)


def test_valid_json_but_invalid_event_is_not_malformed():
    with pytest.raises(InvalidEvent) as caught:
        parse_event_json(body(type="Bad"))
    assert not isinstance(caught.value, MalformedEvent)
    assert not isinstance(caught.value, EventTooLarge)


def _body_of_size(size: int) -> bytes:
    prefix = b'{"type":"log","data":"'
    suffix = b'"}'
    raw = prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix
    assert len(raw) == size
    return raw


def test_an_event_of_exactly_the_limit_is_accepted():
    event = parse_event_json(_body_of_size(MAX_EVENT_BYTES))
    assert event.type == "log"
    assert len(event.data) == MAX_EVENT_BYTES - 24


def test_an_event_over_the_limit_is_too_large():
    with pytest.raises(EventTooLarge, match=str(MAX_EVENT_BYTES)):
        parse_event_json(_body_of_size(MAX_EVENT_BYTES + 1))


def test_the_size_limit_counts_bytes_not_characters():
    # 3 bytes per character in UTF-8: 30 characters make a 90+ byte body.
    raw = orjson.dumps({"type": "log", "data": "\u20ac" * 30})
    assert len(raw) > 90
    with pytest.raises(EventTooLarge):
        parse_event_json(raw, max_bytes=80)
    assert parse_event_json(raw, max_bytes=len(raw)).data == "\u20ac" * 30


def test_size_is_checked_before_parsing():
    # Too large and not JSON: the size is what the client hears about (413, not 400).
    with pytest.raises(EventTooLarge):
        parse_event_json(b"{" * 200, max_bytes=100)


def test_parse_event_json_refuses_server_only_types():
    with pytest.raises(InvalidEvent, match="only the server"):
        parse_event_json(body(type="submitted", data="123.pbs"))


# chunk events: binary media (docs/media.md)


def chunk_data(payload: bytes = b"RIFF\x00\xff", **fields: Any) -> dict[str, Any]:
    return {"stream": "audio", "index": 0, "media_type": "audio/wav",
            "base64": base64.b64encode(payload).decode(), **fields}


@pytest.mark.parametrize("media_type", [
    "audio/wav", "audio/ogg", "audio/pcm;rate=16000;channels=1", "audio/pcm; rate=16000",
    "image/png", "application/octet-stream", "video/mp4;codecs=avc1.42E01E", "Audio/WAV"])
def test_a_chunk_with_its_media_type_is_taken_as_sent(media_type):
    data = chunk_data(media_type=media_type, stream="cam-1.left_0", index=41)
    assert parse_new_event({"type": "chunk", "data": data}).data == data
    assert parse_chunk(data).media_type == media_type


@pytest.mark.parametrize("payload", [b"", b"a", b"ab", b"abc", bytes(range(256)) * 3])
def test_a_chunks_size_and_payload_come_from_its_base64(payload):
    chunk = parse_chunk(chunk_data(payload))
    assert (chunk.size, chunk.payload()) == (len(payload), payload)


def test_a_media_types_essence_and_parameters():
    chunk = parse_chunk(chunk_data(media_type="Audio/PCM; Rate=16000;channels=1"))
    assert chunk.essence == "audio/pcm"
    assert chunk.params == {"rate": "16000", "channels": "1"}
    assert parse_chunk(chunk_data()).params == {}


@pytest.mark.parametrize(("change", "message"), [
    ({"media_type": "audio"}, "media_type"),
    ({"media_type": "audio/wav;rate"}, "media_type"),
    ({"media_type": "audio/wav\n"}, "media_type"),
    ({"media_type": "audio/w a v"}, "media_type"),
    ({"media_type": "audio/" + "x" * 250}, "media_type"),
    ({"media_type": 7}, "media_type"),
    ({"base64": "not base64!"}, "base64"),
    ({"base64": "QUJD\nREVG"}, "base64"),
    ({"base64": "QUJ"}, "base64"),
    ({"base64": "Q==="}, "base64"),
    ({"base64": "QUJD-_"}, "base64"),
    ({"base64": None}, "base64"),
    ({"stream": ""}, "stream"),
    ({"stream": "Audio"}, "stream"),
    ({"stream": "../etc"}, "stream"),
    ({"stream": "a" * 65}, "stream"),
    ({"index": -1}, "index"),
    ({"index": 1.5}, "index"),
    ({"index": True}, "index"),
    ({"index": "3"}, "index"),
    ({"extra": 1}, "unknown extra"),
])
def test_a_malformed_chunk_is_refused_with_what_is_wrong(change, message):
    with pytest.raises(InvalidEvent, match=message) as caught:
        parse_new_event({"type": "chunk", "data": {**chunk_data(), **change}})
    assert type(caught.value) is InvalidEvent  # 422, not 400 (malformed JSON) or 413


@pytest.mark.parametrize("data", [None, "text", [1], {"rows": 3}, {"stream": "audio"}])
def test_a_chunk_needs_the_media_shape(data):
    with pytest.raises(InvalidEvent, match="chunk"):
        parse_new_event({"type": "chunk", "data": data})


def test_a_chunk_of_the_capacity_fits_an_event_and_the_message_names_it():
    payload = bytes(chunk_capacity(MAX_EVENT_BYTES))
    longest_type = "audio/pcm;rate=48000;channels=2;x=" + "y" * 221
    data = chunk_data(payload, media_type=longest_type, stream="s" * 64, index=2**53 - 1)
    raw = orjson.dumps({"type": "chunk", "data": data, "id": "i" * 128})
    assert len(longest_type) == 255
    assert MAX_EVENT_BYTES - CHUNK_OVERHEAD < len(raw) <= MAX_EVENT_BYTES
    assert parse_event_json(raw).data == data
    with pytest.raises(EventTooLarge, match=f"a chunk may carry {chunk_capacity(len(raw) - 1)} "):
        parse_event_json(raw, max_bytes=len(raw) - 1)


def test_chunk_records_compare_by_value():
    assert parse_chunk(chunk_data()) == Chunk("audio", 0, "audio/wav", "UklGRgD/")


# Event, wire encoding, decode_event


def test_event_wire_is_its_json():
    event = Event(job="j_1", seq=7, type="token", data=" world", time=1764012345.123)
    assert orjson.loads(event.wire) == {"job": "j_1", "seq": 7, "type": "token",
                                        "data": " world", "time": 1764012345.123}
    assert event.wire == encode_event(event)
    assert event.as_dict() == orjson.loads(event.wire)


def test_event_wire_is_not_part_of_equality():
    a = Event(job="j", seq=1, type="log", data=None, time=1.0)
    b = Event(job="j", seq=1, type="log", data=None, time=1.0, wire='{"other":1}')
    assert a == b
    assert b.wire == '{"other":1}'  # a given wire is kept, not re-encoded


def test_event_terminal():
    assert Event("j", 1, "fatal", None, 0.0).terminal
    assert not Event("j", 1, "token", None, 0.0).terminal


@settings(max_examples=150, deadline=None)
@given(job=st.from_regex(r"j_[0-9A-Z]{26}", fullmatch=True),
       seq=st.integers(1, 2**40), type_=st.from_regex(REFERENCE_TYPE, fullmatch=True),
       data=json_values, time=st.floats(0, 4e9, allow_nan=False))
def test_decode_event_round_trip(job, seq, type_, data, time):
    event = Event(job=job, seq=seq, type=type_, data=data, time=time)
    for text in (event.wire, event.wire.encode()):
        decoded = decode_event(text)
        assert decoded == event
        assert decoded.wire == event.wire
        assert isinstance(decoded.wire, str)


def test_decode_event_needs_every_field():
    with pytest.raises(KeyError):
        decode_event(b'{"job":"j","seq":1,"type":"x","time":1.0}')
