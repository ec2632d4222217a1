"""Unit tests of the pure parts of metis_stream.cli: parameter parsing and EventPrinter."""

from __future__ import annotations

import io
import time
from typing import Any

import orjson
import pytest

from metis_stream.cli import EventPrinter, _parse_bool, _parse_params
from metis_stream.errors import ClientError

TEMPLATE = {"name": "t", "params": [
    {"name": "text", "type": "str"}, {"name": "delay", "type": "float"},
    {"name": "count", "type": "int"}, {"name": "flag", "type": "bool"},
    {"name": "url", "type": "url"}, {"name": "size", "type": "choice"},
]}
T0 = 1764012345.0


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def ev(event_type: str, data: Any = None, seq: int = 1, at: float = T0) -> dict[str, Any]:
    return {"job": "j_1", "seq": seq, "type": event_type, "data": data, "time": at}


def stamp(at: float = T0) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


# _parse_params


def test_params_are_typed_by_the_template():
    params = _parse_params(TEMPLATE, ["text=hello world", "delay=0.1", "count=3", "flag=yes",
                                      "url=https://e.org/a?b=c", "size=large"])
    assert params == {"text": "hello world", "delay": 0.1, "count": 3, "flag": True,
                      "url": "https://e.org/a?b=c", "size": "large"}
    assert type(params["count"]) is int
    assert type(params["delay"]) is float


def test_value_may_contain_equals_and_be_empty():
    assert _parse_params(TEMPLATE, ["text=a=b=c"]) == {"text": "a=b=c"}
    assert _parse_params(TEMPLATE, ["text="]) == {"text": ""}


def test_a_number_for_a_str_param_stays_text():
    assert _parse_params(TEMPLATE, ["text=42"]) == {"text": "42"}


def test_unknown_param_is_passed_as_text_for_the_server_to_judge():
    assert _parse_params(TEMPLATE, ["other=1"]) == {"other": "1"}


def test_later_value_wins():
    assert _parse_params(TEMPLATE, ["count=1", "count=2"]) == {"count": 2}


def test_no_pairs_no_params():
    assert _parse_params(TEMPLATE, []) == {}


def test_missing_equals_is_a_usage_error():
    with pytest.raises(ClientError) as caught:
        _parse_params(TEMPLATE, ["count"])
    assert caught.value.status == 400
    assert "NAME=VALUE" in caught.value.message


@pytest.mark.parametrize(("pair", "kind"), [("count=three", "int"), ("count=1.5", "int"),
                                            ("delay=fast", "float"), ("flag=maybe", "bool")])
def test_bad_typed_values_say_what_was_expected(pair, kind):
    with pytest.raises(ClientError) as caught:
        _parse_params(TEMPLATE, [pair])
    assert caught.value.status == 400
    assert f"is not a {kind}" in caught.value.message
    assert repr(pair.split("=")[0]) in caught.value.message


@pytest.mark.parametrize("text", ["true", "TRUE", "Yes", "1", "on", "ON"])
def test_parse_bool_true(text):
    assert _parse_bool(text) is True


@pytest.mark.parametrize("text", ["false", "False", "NO", "0", "off", "Off"])
def test_parse_bool_false(text):
    assert _parse_bool(text) is False


@pytest.mark.parametrize("text", ["", "y", "n", "2", "truthy", " true", "none"])
def test_parse_bool_refuses_others(text):
    with pytest.raises(ValueError):
        _parse_bool(text)


# EventPrinter


def test_tokens_print_inline_and_other_events_on_their_own_line():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("step", "Generating", seq=1))
    printer.show(ev("token", "Hello", seq=2))
    printer.show(ev("token", " world", seq=3))
    printer.show(ev("completed", {"words": 2}, seq=4))
    printer.finish()
    assert out.getvalue() == (
        f"{stamp()} step       Generating\n"
        "Hello world\n"
        f'{stamp()} completed  {{"words":2}}\n'
    )


def test_finish_ends_a_line_of_tokens():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("token", "abc"))
    assert out.getvalue() == "abc"
    printer.finish()
    assert out.getvalue() == "abc\n"
    printer.finish()
    assert out.getvalue() == "abc\n"  # only once


def test_token_data_that_is_not_text_is_printed_as_text():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("token", 42))
    printer.finish()
    assert out.getvalue() == "42\n"


@pytest.mark.parametrize(("data", "shown"), [(None, ""), ("text", "text"), (3, "3"),
                                             ({"a": [1, None]}, '{"a":[1,null]}'),
                                             (True, "true")])
def test_timestamped_lines_describe_data(data, shown):
    out = io.StringIO()
    EventPrinter(out, as_json=False).show(ev("log", data, at=T0 + 3600.7))
    assert out.getvalue() == f"{stamp(T0 + 3600.7)} {'log':<10} {shown}\n"


def test_long_type_names_are_not_truncated():
    out = io.StringIO()
    EventPrinter(out, as_json=False).show(ev("a-very-long-event-type", "x"))
    assert out.getvalue() == f"{stamp()} a-very-long-event-type x\n"


def test_json_mode_prints_each_event_as_one_json_line():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=True)
    events = [ev("token", "Hel", seq=1), ev("token", "lo\n", seq=2),
              ev("progress", {"current": 1, "total": 2}, seq=3), ev("completed", None, seq=4)]
    for event in events:
        printer.show(event)
    printer.finish()
    lines = out.getvalue().splitlines()
    assert [orjson.loads(line) for line in lines] == events
    assert out.getvalue().endswith("\n")


def test_json_mode_on_a_tty_draws_no_bar():
    out = TTY()
    printer = EventPrinter(out, as_json=True)
    printer.show(ev("progress", {"current": 1, "total": 2}))
    assert "\r" not in out.getvalue()
    assert orjson.loads(out.getvalue()) == ev("progress", {"current": 1, "total": 2})


def test_progress_without_a_tty_prints_nothing():
    # A pipe or file gets no bar (it cannot be redrawn) and no line per progress event;
    # --json keeps every event for those who need them.
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("progress", {"current": 3, "total": 10}))
    assert out.getvalue() == ""
    printer.show(ev("step", "after"))
    printer.finish()
    assert out.getvalue() == f"{stamp()} step       after\n"


def test_progress_on_a_tty_is_a_bar_redrawn_in_place():
    out = TTY()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("progress", {"current": 3, "total": 10, "label": "words"}))
    assert out.getvalue() == "\r[" + "#" * 9 + "." * 21 + "] 3/10 words"
    printer.show(ev("progress", {"current": 10, "total": 10}))
    assert out.getvalue().endswith("\r[" + "#" * 30 + "] 10/10")
    assert "\n" not in out.getvalue()


def test_the_bar_is_cleared_before_other_output():
    out = TTY()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("progress", {"current": 1, "total": 2}))
    printer.show(ev("step", "next"))
    text = out.getvalue()
    bar = "\r[" + "#" * 15 + "." * 15 + "] 1/2"
    assert text == bar + "\r\x1b[K" + f"{stamp()} step       next\n"


def test_a_bar_never_cuts_a_line_of_tokens():
    out = TTY()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("token", "Hi"))
    printer.show(ev("progress", {"current": 1, "total": 4}))
    printer.show(ev("token", " there"))
    printer.finish()
    assert out.getvalue() == "Hi there\n"


def test_a_token_clears_the_bar():
    out = TTY()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("progress", {"current": 0, "total": 4}))
    printer.show(ev("token", "there"))
    printer.finish()
    assert out.getvalue() == "\r[" + "." * 30 + "] 0/4" + "\r\x1b[K" + "there\n"


def test_finish_clears_a_bar():
    out = TTY()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("progress", {"current": 1, "total": 1}))
    printer.finish()
    assert out.getvalue().endswith("\r\x1b[K")


@pytest.mark.parametrize(("data", "expected"), [
    ({"current": 20, "total": 10}, "\r[" + "#" * 30 + "] 20/10"),
    ({"current": -5, "total": 10}, "\r[" + "." * 30 + "] -5/10"),
    ({"current": 1, "total": 0}, '\rprogress {"current":1,"total":0}'),
    ({"current": "1", "total": 2}, '\rprogress {"current":"1","total":2}'),
    ("half", "\rprogress half"),
    (0.5, "\rprogress 0.5"),
])
def test_progress_bar_with_odd_data_never_fails(data, expected):
    out = TTY()
    EventPrinter(out, as_json=False).show(ev("progress", data))
    assert out.getvalue() == expected


# Control characters in a job's text: shown, never obeyed by the terminal

# OSC 52 (write the clipboard), OSC 0 (set the title), CSI 2J (clear), a CSI as the one
# C1 character U+009B, and other C0 controls, DEL among them.
HOSTILE = "\x1b]52;c;cHduZWQ=\x07\x1b]0;pwned\x07\x1b[2J\x9b2J\r\b\x7f\x00"
SHOWN = r"\x1b]52;c;cHduZWQ=\x07\x1b]0;pwned\x07\x1b[2J\x9b2J\x0d\x08\x7f\x00"


def test_control_characters_in_token_text_are_shown_not_obeyed():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("token", f"a{HOSTILE}\tb\n"))
    printer.show(ev("token", "c"))
    printer.finish()
    assert out.getvalue() == f"a{SHOWN}\tb\nc\n"


def test_control_characters_in_event_lines_are_shown_not_obeyed():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("log", HOSTILE))
    printer.show(ev("completed", {"text": HOSTILE}))
    # JSON escapes C0 itself; it leaves DEL and U+009B raw, and they are shown here.
    in_json = r"\u001b]52;c;cHduZWQ=\u0007\u001b]0;pwned\u0007\u001b[2J\x9b2J\r\b\x7f\u0000"
    assert out.getvalue() == (f"{stamp()} log        {SHOWN}\n"
                              f'{stamp()} completed  {{"text":"{in_json}"}}\n')


def test_a_progress_label_cannot_act_but_the_bar_still_redraws():
    out = TTY()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("progress", {"current": 1, "total": 2, "label": HOSTILE}))
    printer.show(ev("step", "next"))
    bar = "\r[" + "#" * 15 + "." * 15 + "] 1/2 " + SHOWN
    assert out.getvalue() == bar + "\r\x1b[K" + f"{stamp()} step       next\n"


def test_json_mode_escapes_del_and_c1_controls_and_keeps_the_value():
    # JSON itself escapes only U+0000..U+001F: DEL and the C1 controls (U+009B is a
    # CSI) would otherwise reach the terminal raw.
    out = io.StringIO()
    event = ev("token", HOSTILE, seq=1)
    EventPrinter(out, as_json=True).show(event)
    line = out.getvalue()
    assert orjson.loads(line) == event
    assert line.isascii() and all(" " <= char < "\x7f" for char in line[:-1]), line
    assert r"\u009b2J" in line and r"\u007f" in line
