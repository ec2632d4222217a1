"""Unit tests of metis_stream.templates: parameter types, URLs, inputs, operator config."""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metis_stream.errors import BadInput, InvalidParams, TemplateError
from metis_stream.templates import (
    DEFAULT_STR_MAX_LENGTH,
    MAX_INPUTS,
    MAX_URL_LENGTH,
    RESERVED_ENV_NAMES,
    Param,
    Template,
    check_url,
    coerce_param,
    param_from_config,
    param_text,
    validate_inputs,
    validate_params,
)


def template(*params: Param, accepts_inputs: bool = True) -> Template:
    return Template(name="t", cluster="local", params={p.name: p for p in params},
                    accepts_inputs=accepts_inputs)


def problems_of(tmpl: Template, raw: object) -> dict[str, str]:
    with pytest.raises(InvalidParams) as caught:
        validate_params(tmpl, raw)
    return caught.value.problems


# int


INT = Param("n", type="int", min=1, max=10)


@pytest.mark.parametrize("value", [1, 5, 10])
def test_int_within_bounds(value):
    assert coerce_param(INT, value) == value
    assert type(coerce_param(INT, value)) is int


@pytest.mark.parametrize(("value", "message"), [
    (0, "at least 1"), (11, "at most 10"), (-(10**30), "at least"), (10**30, "at most"),
])
def test_int_out_of_bounds(value, message):
    with pytest.raises(ValueError, match=message):
        coerce_param(INT, value)


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, [1], {"n": 1}])
def test_int_refuses_non_integers_including_booleans(value):
    with pytest.raises(ValueError, match="must be an integer"):
        coerce_param(INT, value)


def test_int_without_bounds_takes_any_integer():
    assert coerce_param(Param("n", type="int"), -(10**20)) == -(10**20)


# float


FLOAT = Param("x", type="float", min=0, max=5)


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (5, 5.0), (2.5, 2.5), (1e-9, 1e-9)])
def test_float_within_bounds_is_a_float(value, expected):
    result = coerce_param(FLOAT, value)
    assert result == expected
    assert type(result) is float


@pytest.mark.parametrize("value", [-0.001, 5.0001, -1, 6])
def test_float_out_of_bounds(value):
    with pytest.raises(ValueError, match="must be at"):
        coerce_param(FLOAT, value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_float_refuses_nan_and_infinity(value):
    with pytest.raises(ValueError, match="finite"):
        coerce_param(Param("x", type="float"), value)


@pytest.mark.parametrize("value", [True, False, "1.5", None, [1.0]])
def test_float_refuses_non_numbers_including_booleans(value):
    with pytest.raises(ValueError, match="must be a number"):
        coerce_param(FLOAT, value)


def test_float_refuses_a_huge_integer_with_a_value_error():
    with pytest.raises(ValueError):
        coerce_param(Param("x", type="float"), 10**400)


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6))
def test_float_property(value):
    try:
        result = coerce_param(FLOAT, value)
    except ValueError:
        assert not (math.isfinite(value) and 0 <= value <= 5)
    else:
        assert math.isfinite(value)
        assert isinstance(result, float)
        assert 0 <= result <= 5
        assert result == value


# bool


@pytest.mark.parametrize("value", [True, False])
def test_bool_accepts_booleans(value):
    assert coerce_param(Param("b", type="bool"), value) is value


@pytest.mark.parametrize("value", [0, 1, "true", "false", None, 1.0])
def test_bool_refuses_anything_else(value):
    with pytest.raises(ValueError, match="true or false"):
        coerce_param(Param("b", type="bool"), value)


# choice


CHOICE = Param("size", type="choice", choices=("small", "large"))


def test_choice_accepts_listed_values():
    assert coerce_param(CHOICE, "small") == "small"
    assert coerce_param(CHOICE, "large") == "large"


@pytest.mark.parametrize("value", ["Small", "medium", "", " small", None, 1, ["small"]])
def test_choice_refuses_others(value):
    with pytest.raises(ValueError, match="must be one of small, large"):
        coerce_param(CHOICE, value)


# str


def test_str_accepts_text_within_its_length():
    param = Param("s", max_length=5)
    assert coerce_param(param, "") == ""
    assert coerce_param(param, "12345") == "12345"
    with pytest.raises(ValueError, match="at most 5 characters"):
        coerce_param(param, "123456")


def test_str_length_counts_characters():
    assert coerce_param(Param("s", max_length=3), "\u00e9\u00e9\u00e9") == "\u00e9\u00e9\u00e9"


def test_str_has_a_default_length_limit():
    param = Param("s")
    assert coerce_param(param, "x" * DEFAULT_STR_MAX_LENGTH)
    with pytest.raises(ValueError, match=f"at most {DEFAULT_STR_MAX_LENGTH}"):
        coerce_param(param, "x" * (DEFAULT_STR_MAX_LENGTH + 1))


@pytest.mark.parametrize("value", [1, 1.5, True, None, ["a"], {"a": "b"}, b"bytes"])
def test_str_refuses_non_strings(value):
    with pytest.raises(ValueError, match="must be a string"):
        coerce_param(Param("s"), value)


@pytest.mark.parametrize("value", ["$(rm -rf ~)", "`id`", "a; b", "a && b", "a | b", "'\"",
                                   "$HOME", "a\nb", "${IFS}", "*?[]", "<>&", "\\", "!#~%"])
def test_shell_metacharacters_are_plain_data_in_str(value):
    # They are only dangerous if misused downstream (quoting is tested where it happens).
    assert coerce_param(Param("s"), value) == value


@pytest.mark.parametrize("value", ["\x00", "a\x00b", "abc\x00"])
def test_str_refuses_nul(value):
    with pytest.raises(ValueError, match="NUL"):
        coerce_param(Param("s"), value)


def test_str_pattern_must_match_whole_value():
    param = Param("s", pattern=r"[a-z]+")
    assert coerce_param(param, "abc") == "abc"
    for bad in ["abc1", "1abc", "", "ab c", "abc\n"]:
        with pytest.raises(ValueError, match="must match"):
            coerce_param(param, bad)


# url


@pytest.mark.parametrize("url", [
    "http://example.com", "https://example.com/", "https://example.com:8443/a/b?c=d&e=f#g",
    "http://10.0.0.5:8000/file.bin", "http://[::1]:8080/x", "HTTPS://Example.COM/Path",
    "https://example.com/a%20b",
])
def test_url_accepts_http_and_https_with_a_host(url):
    assert check_url(url) == url
    assert coerce_param(Param("u", type="url"), url) == url


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "javascript:alert(1)", "ftp://example.com/f", "gopher://example.com/",
    "data:text/plain,hi", "ssh://host/x", "//example.com/x", "example.com/x", "/etc/passwd",
    "", "http", "httpx://example.com",
])
def test_url_refuses_other_schemes(url):
    with pytest.raises(ValueError, match="http or https"):
        check_url(url)


@pytest.mark.parametrize("url", ["http://", "http:///path", "https:?q", "http:example.com",
                                 "http://:80/"])
def test_url_requires_a_host(url):
    with pytest.raises(ValueError, match="host"):
        check_url(url)


@pytest.mark.parametrize("url", ["http://user:pass@example.com/", "http://user@example.com/",
                                 "https://:pw@example.com", "http://@example.com/",
                                 "http://evil.com\\@good.com/"])
def test_url_refuses_credentials(url):
    with pytest.raises(ValueError, match="credentials"):
        check_url(url)


@pytest.mark.parametrize("url", ["http://exa mple.com/", "http://example.com/a b",
                                 " http://example.com", "http://example.com/\n",
                                 "http://example.com/\r\nX: y", "http://example.com/\t",
                                 "http://example.com/\x00", "http://example.com/\x7f",
                                 "http://example.com/\x1b[0m"])
def test_url_refuses_spaces_and_control_characters(url):
    with pytest.raises(ValueError, match="spaces or control"):
        check_url(url)


@pytest.mark.parametrize("char", ["\x85", "\u00a0", "\u2028", "\u3000"])
def test_url_refuses_non_ascii_spaces_and_controls(char):
    with pytest.raises(ValueError):
        check_url(f"http://example.com/a{char}b")


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 0x20) | st.just(0x7F), st.integers(0, 25))
def test_url_refuses_any_ascii_control_anywhere(code, where):
    url = "https://example.com/some/path"
    position = min(where, len(url))
    with pytest.raises(ValueError):
        check_url(url[:position] + chr(code) + url[position:])


@pytest.mark.parametrize("url", ["http://example.com:99999/", "http://example.com:abc/",
                                 "http://[::1/", "http://example.com:-1/"])
def test_url_refuses_malformed_urls(url):
    with pytest.raises(ValueError, match="valid URL"):
        check_url(url)


def test_url_length_limit():
    base = "https://example.com/"
    assert check_url(base + "a" * (MAX_URL_LENGTH - len(base)))
    with pytest.raises(ValueError, match=f"at most {MAX_URL_LENGTH}"):
        check_url(base + "a" * (MAX_URL_LENGTH - len(base) + 1))


@pytest.mark.parametrize("value", [None, 1, b"http://example.com", ["http://example.com"]])
def test_url_must_be_a_string(value):
    with pytest.raises(ValueError, match="URL string"):
        check_url(value)


# validate_params


def test_validate_params_fills_defaults_and_checks_values():
    tmpl = template(Param("text", default="hi", max_length=10),
                    Param("delay", type="float", min=0, max=5, default=0.5),
                    Param("count", type="int", required=True))
    assert validate_params(tmpl, {"count": 3}) == {"text": "hi", "delay": 0.5, "count": 3}
    assert validate_params(tmpl, {"count": 3, "text": "yo", "delay": 2}) == {
        "text": "yo", "delay": 2.0, "count": 3}


def test_null_means_default():
    tmpl = template(Param("text", default="hi"))
    assert validate_params(tmpl, {"text": None}) == {"text": "hi"}
    assert validate_params(tmpl, None) == {"text": "hi"}


def test_optional_without_default_is_left_out():
    assert validate_params(template(Param("opt")), {}) == {}


def test_required_without_value_is_a_problem():
    tmpl = template(Param("count", type="int", required=True))
    assert problems_of(tmpl, {}) == {"count": "required"}
    assert problems_of(tmpl, {"count": None}) == {"count": "required"}


def test_unknown_params_are_refused():
    tmpl = template(Param("text"))
    problems = problems_of(tmpl, {"text": "ok", "script": "rm -rf /", "x" * 200: 1})
    assert problems["script"] == "unknown parameter"
    assert problems["x" * 64] == "unknown parameter"  # truncated name
    assert "text" not in problems


def test_every_problem_is_reported_at_once():
    tmpl = template(Param("n", type="int", max=3), Param("b", type="bool"),
                    Param("r", required=True))
    problems = problems_of(tmpl, {"n": 4, "b": 1, "zz": 0})
    assert set(problems) == {"n", "b", "r", "zz"}
    with pytest.raises(InvalidParams) as caught:
        validate_params(tmpl, {"n": 4})
    assert "n: must be at most 3" in str(caught.value)
    assert isinstance(caught.value, BadInput)


@pytest.mark.parametrize("raw", [[], "text=hi", 3, ["text", "hi"]])
def test_params_must_be_an_object(raw):
    assert problems_of(template(Param("text")), raw) == {"params": "must be a JSON object"}


def test_float_default_has_the_same_type_as_a_given_value():
    tmpl = template(param_from_config("delay", {"type": "float", "default": 1}))
    assert type(validate_params(tmpl, {})["delay"]) is float


# validate_inputs


def test_inputs():
    tmpl = template()
    assert validate_inputs(tmpl, None) == []
    assert validate_inputs(tmpl, []) == []
    urls = ["https://example.org/a.csv", "http://10.0.0.1/b"]
    assert validate_inputs(tmpl, urls) == urls


@pytest.mark.parametrize("raw", ["https://example.org/a", {"url": "x"}, 5])
def test_inputs_must_be_a_list(raw):
    with pytest.raises(InvalidParams) as caught:
        validate_inputs(template(), raw)
    assert caught.value.problems == {"inputs": "must be a list of URLs"}


def test_inputs_refused_when_the_template_takes_none():
    tmpl = template(accepts_inputs=False)
    assert validate_inputs(tmpl, []) == []
    with pytest.raises(InvalidParams, match="takes no inputs"):
        validate_inputs(tmpl, ["https://example.org/a"])


def test_inputs_count_limit():
    tmpl = template()
    assert len(validate_inputs(tmpl, [f"https://e.org/{i}" for i in range(MAX_INPUTS)])) == 20
    with pytest.raises(InvalidParams, match=f"at most {MAX_INPUTS}"):
        validate_inputs(tmpl, [f"https://e.org/{i}" for i in range(MAX_INPUTS + 1)])


def test_each_bad_input_is_named_by_index():
    with pytest.raises(InvalidParams) as caught:
        validate_inputs(template(), ["https://ok.org/", "file:///etc/passwd", 3,
                                     "http://u:p@h/"])
    assert set(caught.value.problems) == {"inputs[1]", "inputs[2]", "inputs[3]"}
    assert "credentials" in caught.value.problems["inputs[3]"]


# param_from_config


def test_param_from_config_builds_each_type():
    assert param_from_config("text", {}) == Param("text")
    param = param_from_config("delay", {"type": "float", "min": 0, "max": 5, "default": 0.05,
                                        "description": "d", "env": "MY_DELAY"})
    assert (param.type, param.min, param.max, param.default) == ("float", 0, 5, 0.05)
    assert param.env_name() == "MY_DELAY"
    choice = param_from_config("size", {"type": "choice", "choices": ["s", "m"]})
    assert choice.choices == ("s", "m")
    assert param_from_config("url", {"type": "url", "required": True}).required


def test_env_name_defaults_to_upper_case_name():
    assert param_from_config("input_file", {}).env_name() == "INPUT_FILE"


@pytest.mark.parametrize("name", ["", "Text", "1text", "_text", "te-xt", "te xt", "t" * 65,
                                  "text\n", "caf\u00e9"])
def test_bad_param_names(name):
    with pytest.raises(TemplateError, match="must match"):
        param_from_config(name, {})


@pytest.mark.parametrize("name", sorted(n.lower() for n in RESERVED_ENV_NAMES))
def test_reserved_env_names_cannot_carry_a_parameter(name):
    with pytest.raises(TemplateError, match="cannot carry"):
        param_from_config(name, {})


@pytest.mark.parametrize("env", ["PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "HOME", "IFS",
                                 "BASH_ENV", "METIS_TOKEN_FILE", "METIS_X", "PBS_O_WORKDIR",
                                 "SLURM_JOB_ID", "lower", "1ABC", "A-B", "A B"])
def test_bad_explicit_env_names(env):
    with pytest.raises(TemplateError, match="cannot carry"):
        param_from_config("ok", {"env": env})


# What the dynamic loader, a shell or an interpreter reads before the script runs a line,
# and what metis-emit's curl reads: a client's value there would run code or take the token.
STARTUP_ENV_NAMES = [
    "LD_AUDIT", "LD_DEBUG_OUTPUT", "LD_ANYTHING", "GCONV_PATH", "GLIBC_TUNABLES",
    "MALLOC_CHECK_", "LOCPATH", "HOSTALIASES", "RES_OPTIONS", "BASHOPTS", "SHELLOPTS",
    "BASH_FUNC_LS__", "BASH_XTRACEFD", "PS4", "PROMPT_COMMAND", "PYTHONSTARTUP",
    "PYTHONHOME", "PYTHONWARNINGS", "PYTHONBREAKPOINT", "PERL5LIB", "PERL5OPT", "PERLLIB",
    "RUBYOPT", "RUBYLIB", "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS", "_JAVA_OPTIONS",
    "JDK_JAVA_OPTIONS", "CLASSPATH", "LUA_INIT", "LUA_PATH", "R_PROFILE_USER", "R_ENVIRON",
    "JULIA_LOAD_PATH", "OPENSSL_CONF", "TCLLIBPATH", "HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY",
    "NO_PROXY", "CURL_HOME", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR",
]


@pytest.mark.parametrize("env", STARTUP_ENV_NAMES)
def test_startup_env_names_cannot_carry_a_parameter(env):
    with pytest.raises(TemplateError, match="cannot carry"):
        param_from_config("ok", {"env": env})


@pytest.mark.parametrize("env", ["TEXT", "DELAY", "URL", "INPUT_FILE", "LDAP_HOST", "NODES",
                                 "PYTORCH_DEVICE", "NODES_PER_TASK"])
def test_ordinary_env_names_still_carry_a_parameter(env):
    assert param_from_config("ok", {"env": env}).env_name() == env


@pytest.mark.parametrize("name", ["metis_job_id", "pbs_queue", "slurm_nodes", "metis_"])
def test_reserved_prefixes_through_the_default_env_name(name):
    with pytest.raises(TemplateError, match="cannot carry"):
        param_from_config(name, {})


def test_unknown_keys_and_types():
    with pytest.raises(TemplateError, match="unknown key"):
        param_from_config("p", {"type": "str", "maxlength": 3})
    with pytest.raises(TemplateError, match="type must be one of"):
        param_from_config("p", {"type": "path"})


def test_choice_without_choices():
    with pytest.raises(TemplateError, match="needs 'choices'"):
        param_from_config("size", {"type": "choice"})
    with pytest.raises(TemplateError, match="needs 'choices'"):
        param_from_config("size", {"type": "choice", "choices": []})


@pytest.mark.parametrize("raw", [
    {"type": "int", "default": "3"},
    {"type": "int", "default": True},
    {"type": "int", "min": 1, "default": 0},
    {"type": "float", "max": 1, "default": 2.0},
    {"type": "bool", "default": "true"},
    {"type": "choice", "choices": ["a"], "default": "b"},
    {"type": "url", "default": "file:///etc/passwd"},
    {"type": "str", "max_length": 2, "default": "abc"},
    {"type": "str", "pattern": "[0-9]+", "default": "abc"},
])
def test_bad_defaults(raw):
    with pytest.raises(TemplateError, match="bad default"):
        param_from_config("p", raw)


def test_bad_pattern_is_a_template_error():
    with pytest.raises(TemplateError):
        param_from_config("p", {"pattern": "("})


def test_non_numeric_bounds_are_a_template_error():
    with pytest.raises(TemplateError):
        param_from_config("n", {"type": "int", "min": "0"})


def test_choices_must_be_a_list():
    with pytest.raises(TemplateError):
        param_from_config("size", {"type": "choice", "choices": "small"})


# public views


def test_param_public_shape():
    param = param_from_config("delay", {"type": "float", "min": 0, "max": 5, "default": 0.05,
                                        "description": "Seconds", "env": "DELAY_S"})
    assert param.public() == {"name": "delay", "type": "float", "required": False,
                              "default": 0.05, "description": "Seconds", "min": 0, "max": 5}


def test_param_public_keeps_falsy_defaults_and_bounds_and_hides_env():
    public = Param("flag", type="bool", default=False).public()
    assert public["default"] is False
    assert Param("n", type="int", min=0, default=0).public()["min"] == 0
    assert "env" not in Param("x", env="SECRET_ENV").public()


def test_param_public_required_only_without_default():
    assert Param("u", type="url", required=True).public()["required"] is True
    assert Param("u", type="url", required=True, default="http://a.b/").public()[
        "required"] is False
    assert Param("u").public() == {"name": "u", "type": "str", "required": False}


def test_param_public_choice_and_pattern():
    public = Param("s", type="choice", choices=("a", "b")).public()
    assert public["choices"] == ["a", "b"]
    assert Param("s", pattern="[a-z]+", max_length=9).public() == {
        "name": "s", "type": "str", "required": False, "pattern": "[a-z]+", "max_length": 9}


def test_template_public_shape_hides_scripts_and_resources():
    tmpl = Template(name="tokens", cluster="metis", remote_script="/secret/run.pbs",
                    description="Stream", queue="short", account="acct",
                    resources={"walltime": "00:05:00"},
                    params={"text": Param("text", default="hi")}, accepts_inputs=False)
    assert tmpl.public() == {
        "name": "tokens", "description": "Stream", "cluster": "metis",
        "params": [{"name": "text", "type": "str", "required": False, "default": "hi"}],
        "accepts_inputs": False, "outputs": [],
    }


# param_text


@pytest.mark.parametrize(("value", "text"), [(True, "true"), (False, "false"), (3, "3"),
                                             (0.5, "0.5"), ("x y", "x y")])
def test_param_text(value, text):
    assert param_text(value) == text


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.from_regex(re.compile(r"[a-z]{1,6}"), fullmatch=True),
                       st.integers(-100, 100), max_size=5),
       st.integers(-50, 50), st.integers(0, 50))
def test_validate_params_int_property(raw: dict[str, Any], low, span):
    tmpl = template(Param("n", type="int", min=low, max=low + span))
    raw = {("n" if i == 0 else k): v for i, (k, v) in enumerate(raw.items())}
    unknown = set(raw) - {"n"}
    in_bounds = "n" not in raw or low <= raw["n"] <= low + span
    if not unknown and in_bounds:
        assert validate_params(tmpl, raw) == raw
    else:
        problems = problems_of(tmpl, raw)
        assert set(problems) == unknown | (set() if in_bounds else {"n"})
