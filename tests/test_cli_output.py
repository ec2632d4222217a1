"""Unit tests of the command line's parameter parsing (metis_stream.cli)."""

from __future__ import annotations

import pytest

from metis_stream.cli import _parse_bool, _parse_params
from metis_stream.errors import ClientError

TEMPLATE = {"name": "t", "params": [
    {"name": "text", "type": "str"}, {"name": "delay", "type": "float"},
    {"name": "count", "type": "int"}, {"name": "flag", "type": "bool"},
    {"name": "url", "type": "url"}, {"name": "size", "type": "choice"},
]}


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
