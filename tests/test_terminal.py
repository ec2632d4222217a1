"""Unit tests of metis_stream.terminal: what of a job's text reaches a terminal, and how
EventPrinter shows a job's events."""

from __future__ import annotations

import io
import time
from typing import Any

import orjson
import pytest

from metis_stream.terminal import EventPrinter, describe_end, output_line

T0 = 1764012345.0


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def ev(event_type: str, data: Any = None, seq: int = 1, at: float = T0) -> dict[str, Any]:
    return {"job": "j_1", "seq": seq, "type": event_type, "data": data, "time": at}


def stamp(at: float = T0) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


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


# A job's output lines (the launcher's log events)


def log(stream: str, *lines: str, seq: int = 1) -> dict[str, Any]:
    return ev("log", {"stream": stream, "lines": list(lines)}, seq=seq)


def test_output_lines_print_as_they_are_after_a_line_of_tokens():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show(ev("token", "thinking", seq=1))
    printer.show(log("stdout", "epoch 1: loss 0.41", "epoch 2: loss 0.37", seq=2))
    printer.show(log("stderr", "warning: slow disk", seq=3))
    printer.show(ev("completed", None, seq=4))
    printer.finish()
    assert out.getvalue() == ("thinking\n"
                              "epoch 1: loss 0.41\nepoch 2: loss 0.37\n"
                              "warning: slow disk\n"
                              f"{stamp()} completed  \n")


def test_on_a_terminal_stderr_is_red_and_reset_at_the_end_of_each_line():
    out = TTY()
    EventPrinter(out, as_json=False).show(log("stderr", "oops", "again"))
    assert out.getvalue() == "\x1b[31moops\x1b[0m\n\x1b[31magain\x1b[0m\n"


def test_the_budget_notice_is_a_timestamped_line():
    out = io.StringIO()
    EventPrinter(out, as_json=False).show(
        log("notice", "output truncated after 9 lines; the files hold all of it"))
    assert out.getvalue() == (f"{stamp()} notice     output truncated after 9 lines; "
                              "the files hold all of it\n")


@pytest.mark.parametrize("data", ["a line of metis-emit log", {"stream": "stdout"},
                                  {"stream": 3, "lines": ["x"]}, {"stream": "stdout",
                                                                  "lines": ["x", 4]}])
def test_log_data_of_another_shape_is_a_timestamped_line(data):
    out = io.StringIO()
    EventPrinter(out, as_json=False).show(ev("log", data))
    shown = data if isinstance(data, str) else orjson.dumps(data).decode()
    assert out.getvalue() == f"{stamp()} log        {shown}\n"


def test_with_a_stream_only_its_lines_are_printed():
    out = TTY()
    printer = EventPrinter(out, as_json=False, stream="stdout")
    for event in (ev("step", "Loading"), ev("token", "t"), ev("progress", {"current": 1,
                                                                           "total": 2}),
                  log("stdout", "one", "two"), log("stderr", "err"),
                  log("notice", "output truncated"), ev("log", "plain"),
                  log("stdout", "three"), ev("fatal", {"error": "x"})):
        printer.show(event)
    printer.finish()
    assert out.getvalue() == "one\ntwo\nthree\n"


def test_with_a_stream_and_json_only_its_log_events_are_printed():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=True, stream="stderr")
    wanted = log("stderr", "err", seq=2)
    for event in (log("stdout", "one", seq=1), wanted, ev("completed", None, seq=3)):
        printer.show(event)
    assert [orjson.loads(line) for line in out.getvalue().splitlines()] == [wanted]


def test_hostile_output_lines_cannot_act_on_the_terminal():
    # Off a terminal every escape sequence goes; the other controls are shown.
    out = io.StringIO()
    EventPrinter(out, as_json=False).show(log("stdout", f"a{HOSTILE}b"))
    assert out.getvalue() == r"a\x0d\x08\x7f\x00b" + "\n"


@pytest.mark.parametrize("line, plain, on_a_terminal", [
    ("plain", "plain", "plain"),
    ("\x1b[1;32mok\x1b[0m done", "ok done", "\x1b[1;32mok\x1b[0m done\x1b[0m"),
    # a colour left on is reset at the end of the line, so that it cannot bleed
    ("\x1b[31mred", "red", "\x1b[31mred\x1b[0m"),
    # a progress bar's erase-line and cursor moves go whole
    ("\x1b[2K\x1b[1G 50%", " 50%", " 50%"),
    # OSC strings (a title, the clipboard) go whole, ended by BEL, by ST or by the line
    ("\x1b]0;title\x07x\x1b]52;c;Zm9v\x1b\\y\x1b]8;;http://a", "xy", "xy"),
    # the C1 forms of CSI and OSC
    ("\x9b2Ja\x9d0;t\x9cb", "ab", "ab"),
    # an escape that starts no sequence is shown, as is every other control
    ("end\x1b", r"end\x1b", r"end\x1b"),
    ("tab\tnul\x00del\x7f", r"tab	nul\x00del\x7f", r"tab	nul\x00del\x7f"),
    # a colour whose parameters are not numbers is no colour
    ("\x1b[?25lx", "x", "x"),
])
def test_output_line(line, plain, on_a_terminal):
    assert output_line(line, colours=False) == plain
    assert output_line(line, colours=True) == on_a_terminal


def test_a_stderr_lines_own_reset_goes_back_to_red():
    assert output_line("a\x1b[1mb\x1b[mc", colours=True, stderr=True) == (
        "\x1b[31ma\x1b[1mb\x1b[m\x1b[31mc\x1b[0m")


@pytest.mark.parametrize("event, line", [
    (ev("completed", None), "job completed"),
    (ev("cancelled", "cancelled"), "job cancelled: cancelled"),
    (ev("fatal", {"error": "boom", "exit_status": 3}),
     'job fatal: {"error":"boom","exit_status":3}'),
])
def test_describe_end(event, line):
    assert describe_end(event) == line


def test_an_array_elements_events_say_which_element_and_the_tally_reads_as_words():
    out = io.StringIO()
    printer = EventPrinter(out, as_json=False)
    printer.show({**ev("step", "loading", seq=1), "element": 3})
    printer.show({**ev("log", {"stream": "stdout", "lines": ["epoch 1"]}, seq=2), "element": 3})
    printer.show(ev("elements", {"queued": 1, "running": 1, "done": 2, "failed": 1}, seq=3))
    printer.show(ev("elements", {"queued": 0, "running": 0, "done": 0, "failed": 0}, seq=4))
    printer.show(ev("elements", {"queued": "?"}, seq=5))
    assert out.getvalue() == (
        f"{stamp()} [3] step       loading\n"
        "[3] epoch 1\n"
        f"{stamp()} elements   2 done, 1 failed, 1 running, 1 queued of 5\n"
        f"{stamp()} elements   none of 0\n"
        f'{stamp()} elements   {{"queued":"?"}}\n'
    )
