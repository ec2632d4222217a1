"""Templates: the server-side allowlist of batch scripts that clients may submit.

Pure code. A client names a template and gives values for its parameters; it
never sends a script or a command line. Every value is checked against the
parameter's type and bounds before anything reaches a scheduler.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from metis_stream.errors import InvalidParams, TemplateError

ParamType = Literal["str", "int", "float", "bool", "url", "choice"]
PARAM_TYPES: tuple[str, ...] = ("str", "int", "float", "bool", "url", "choice")
ParamValue = str | int | float | bool

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
ENV_NAME_PATTERN = re.compile(r"[A-Z_][A-Z0-9_]{0,63}\Z")
# A parameter's value is the client's: it must never land in a variable that a program
# reads before the script runs a line. The job's own (METIS_*) and the scheduler's; who
# the job is and where it runs; what the dynamic loader, a shell, an interpreter or a
# runtime reads at startup (each can run code from it); and what metis-emit's curl reads
# (a proxy or a trust store would hand the job's token to someone else).
RESERVED_ENV_NAMES = frozenset({
    "PATH", "HOME", "SHELL", "USER", "LOGNAME", "TMPDIR", "LANG", "TZ",
    "IFS", "ENV", "CDPATH", "SHELLOPTS", "PS4", "PROMPT_COMMAND", "GLOBIGNORE",
    "GCONV_PATH", "LOCPATH", "NLSPATH", "HOSTALIASES", "RES_OPTIONS", "LOCALDOMAIN",
    "CLASSPATH", "TCLLIBPATH",
    "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR",
})
RESERVED_ENV_PREFIXES = (
    "METIS_", "PBS_", "SLURM_", "LC_",
    "LD_", "GLIBC_", "MALLOC_", "BASH",
    "PYTHON", "PERL", "RUBY", "NODE_", "JAVA_", "_JAVA_", "JDK_", "LUA_", "R_", "JULIA_",
    "OPENSSL_", "CURL_",
)
DEFAULT_STR_MAX_LENGTH = 1000
MAX_URL_LENGTH = 2048
MAX_INPUTS = 20

# What the launcher streams of a job's output (docs/launcher.md); the files keep all of
# it. Half of the server's default max_events_per_job (10,000), so that a chatty job
# still has room for its own events; grouped, that is hours of occasional lines or
# minutes of continuous output.
DEFAULT_LOG_MAX_EVENTS = 5000
# 1 MiB of text (some 20,000 lines of 50 characters): more than anyone reads live, and
# what a browser replays from a job's history in a moment.
DEFAULT_LOG_MAX_BYTES = 1 << 20
# The last lines of stderr in a failed job's `fatal`: a Python traceback's end, a
# compiler's last errors.
DEFAULT_STDERR_TAIL_LINES = 20

MAX_ARRAY_ELEMENTS = 1000
"""The most elements an array may have: each has its token, and the monitor reads each
one's end (docs/arrays.md)."""
MAX_ARRAY_INDEX = 100_000
"""The highest index an array may use; a site's own limit may be lower (Slurm's default
MaxArraySize allows indices up to 1000)."""
_ARRAY_RANGE = re.compile(r"([0-9]{1,6})-([0-9]{1,6})(?::([0-9]{1,6}))?\Z")


@dataclass(frozen=True, slots=True)
class ArrayRange:
    """An array's element indices: ``first`` to ``last`` by ``step``, the one form that
    PBS Pro (``qsub -J``), Slurm (``--array``) and Slurm's qsub wrapper all take."""

    first: int
    last: int
    step: int = 1

    @property
    def indices(self) -> range:
        return range(self.first, self.last + 1, self.step)

    def __str__(self) -> str:
        text = f"{self.first}-{self.last}"
        return text if self.step == 1 else f"{text}:{self.step}"


def parse_array(text: object) -> ArrayRange:
    """``"1-10"`` or ``"1-10:2"`` as an ArrayRange; ValueError says what is wrong."""
    match = _ARRAY_RANGE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"{text!r:.40} is not FIRST-LAST or FIRST-LAST:STEP, such as "
                         "\"1-10\" or \"0-98:2\"")
    first, last, step = int(match.group(1)), int(match.group(2)), int(match.group(3) or 1)
    if first > last or step < 1:
        raise ValueError(f"{text}: FIRST must not exceed LAST, and STEP must be at least 1")
    if last > MAX_ARRAY_INDEX:
        raise ValueError(f"{text}: indices go up to {MAX_ARRAY_INDEX}")
    found = ArrayRange(first, last, step)
    if len(found.indices) > MAX_ARRAY_ELEMENTS:
        raise ValueError(f"{text}: at most {MAX_ARRAY_ELEMENTS} elements, "
                         f"got {len(found.indices)}")
    return found


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type: ParamType = "str"
    default: ParamValue | None = None
    required: bool = False
    description: str = ""
    min: float | None = None
    max: float | None = None
    max_length: int | None = None
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    env: str = ""
    """The environment variable that carries the value; default: the name in upper case."""

    def env_name(self) -> str:
        return self.env or self.name.upper()

    def public(self) -> dict[str, Any]:
        """What clients may see of the parameter (to build a form)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type,
                               "required": self.required and self.default is None}
        for key in ("default", "description", "min", "max", "max_length", "pattern"):
            value = getattr(self, key)
            if value not in (None, ""):
                out[key] = value
        if self.choices:
            out["choices"] = list(self.choices)
        return out


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    cluster: str
    script: Path | None = None
    """A local batch script, staged on the cluster by the scheduler."""
    remote_script: str | None = None
    """A batch script that already lives on the cluster."""
    description: str = ""
    queue: str | None = None
    account: str | None = None
    resources: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, Param] = field(default_factory=dict)
    accepts_inputs: bool = True
    capture: bool = True
    """Stream the script's output as ``log`` events (its files are written either way)."""
    log_max_events: int = DEFAULT_LOG_MAX_EVENTS
    log_max_bytes: int = DEFAULT_LOG_MAX_BYTES
    stderr_tail_lines: int = DEFAULT_STDERR_TAIL_LINES
    outputs: tuple[str, ...] = ()
    """Globs of the files the job makes for its users, relative to its folder
    (``output_pattern``): the files API marks them, the viewer shows them first."""
    array: ArrayRange | None = None
    """Run the script once per index, as one job (docs/arrays.md)."""
    array_param: str | None = None
    """The int parameter whose value N makes the array's indices 1 to N."""

    def public(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "cluster": self.cluster,
                "params": [p.public() for p in self.params.values()],
                "accepts_inputs": self.accepts_inputs, "outputs": list(self.outputs),
                **({"array": str(self.array)} if self.array else {}),
                **({"array_param": self.array_param} if self.array_param else {})}

    def array_for(self, values: Mapping[str, ParamValue]) -> ArrayRange | None:
        """The array a submission with these (validated) parameter values runs; None for
        a template that is not an array."""
        if self.array_param is not None:
            count = values.get(self.array_param)
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise InvalidParams({self.array_param: "must be a whole number from 1: the "
                                     "array's size"})
            return parse_array(f"1-{count}")
        return self.array

    def is_output(self, path: str) -> bool:
        """Whether ``path`` (relative to the job's folder) matches one of ``outputs``."""
        return any(output_pattern(glob).fullmatch(path) for glob in self.outputs)


def output_pattern(glob: str) -> re.Pattern[str]:
    """A template's output glob as a regular expression over paths relative to the job's
    folder: ``*`` and ``?`` stay within one folder, ``**/`` spans any number of them,
    ``[...]`` is a set of characters. TemplateError for a glob that would leave the folder
    (absolute, or with ``..``)."""
    if not glob or glob.startswith("/") or ".." in glob.split("/"):
        raise TemplateError(f"output {glob!r} must be a glob relative to the job's folder, "
                            "without '..'")
    regex, index = "", 0
    while index < len(glob):
        if glob.startswith("**/", index):
            regex, index = regex + "(?:[^/]+/)*", index + 3
        elif glob.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif glob[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif glob[index] == "?":
            regex, index = regex + "[^/]", index + 1
        elif glob[index] == "[" and "]" in glob[index + 2:]:
            end = glob.index("]", index + 2)
            body = glob[index + 1:end]
            negate = body.startswith("!")
            members = re.escape(body[1:] if negate else body).replace("\\-", "-")
            regex += f"[{'^' if negate else ''}{members}]"
            index = end + 1
        else:
            regex, index = regex + re.escape(glob[index]), index + 1
    return re.compile(regex)


def array_from_config(raw: object, params: Mapping[str, Param]
                      ) -> tuple[ArrayRange | None, str | None]:
    """A template's ``array``: ``"1-10"``, ``"1-10:2"``, or ``{ param = "NAME" }`` for an
    int parameter whose value N makes the indices 1 to N (its min at least 1, its max
    at most MAX_ARRAY_ELEMENTS). Returns (range, param name)."""
    if isinstance(raw, Mapping):
        if set(raw) != {"param"} or not isinstance(raw["param"], str):
            raise TemplateError('array must be "FIRST-LAST[:STEP]" or { param = "NAME" }')
        param = params.get(raw["param"])
        if param is None or param.type != "int":
            raise TemplateError(f"array: {raw['param']!r} must be an int parameter")
        if param.min is None or param.min < 1 or param.max is None or (
                param.max > MAX_ARRAY_ELEMENTS):
            raise TemplateError(f"array: parameter {param.name!r} needs min >= 1 and "
                                f"max <= {MAX_ARRAY_ELEMENTS} (the array's size)")
        return None, param.name
    try:
        return parse_array(raw), None
    except ValueError as exc:
        raise TemplateError(f"array: {exc}") from None


def param_from_config(name: str, raw: Mapping[str, Any]) -> Param:
    """Build a parameter from its TOML table, refusing anything an operator got wrong."""
    if not NAME_PATTERN.match(name):
        raise TemplateError(f"parameter name {name!r} must match [a-z][a-z0-9_]{{0,63}}")
    known = {"type", "default", "required", "description", "min", "max", "max_length",
             "pattern", "choices", "env"}
    unknown = set(raw) - known
    if unknown:
        raise TemplateError(f"parameter {name!r}: unknown key(s) {sorted(unknown)}")
    kind = raw.get("type", "str")
    if kind not in PARAM_TYPES:
        raise TemplateError(f"parameter {name!r}: type must be one of {PARAM_TYPES}")
    env = raw.get("env", "")
    choices = raw.get("choices", ())
    if not isinstance(choices, list | tuple) or not all(isinstance(c, str) for c in choices):
        raise TemplateError(f"parameter {name!r}: choices must be a list of strings")
    for bound in ("min", "max"):
        value = raw.get(bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise TemplateError(f"parameter {name!r}: {bound} must be a number")
    max_length = raw.get("max_length")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 1):
        raise TemplateError(f"parameter {name!r}: max_length must be a positive integer")
    for text in ("env", "description", "pattern"):
        if raw.get(text) is not None and not isinstance(raw[text], str):
            raise TemplateError(f"parameter {name!r}: {text} must be a string")
    param = Param(
        name=name, type=kind, default=None,
        required=bool(raw.get("required", False)), description=str(raw.get("description", "")),
        min=raw.get("min"), max=raw.get("max"), max_length=max_length,
        pattern=raw.get("pattern"), choices=tuple(choices), env=env,
    )
    env_name = param.env_name()
    if not ENV_NAME_PATTERN.match(env_name):
        raise TemplateError(f"parameter {name!r}: {env_name!r} cannot carry a parameter "
                            "(an environment name is [A-Z_][A-Z0-9_]{0,63})")
    if env_name in RESERVED_ENV_NAMES or env_name.startswith(RESERVED_ENV_PREFIXES):
        raise TemplateError(f"parameter {name!r}: {env_name!r} cannot carry a parameter: the "
                            "job, its scheduler or a program's startup reads it; pick another "
                            "name with env = \"...\"")
    if kind == "choice" and not param.choices:
        raise TemplateError(f"parameter {name!r}: a choice needs 'choices'")
    if param.pattern is not None:
        try:
            re.compile(param.pattern)
        except re.error as exc:
            raise TemplateError(f"parameter {name!r}: bad pattern: {exc}") from None
    if raw.get("default") is not None:
        try:
            # Stored as a client's value would be, so a float default of 1 is 1.0.
            param = replace(param, default=coerce_param(param, raw["default"]))
        except ValueError as exc:
            raise TemplateError(f"parameter {name!r}: bad default: {exc}") from None
    return param


def validate_params(template: Template, raw: object) -> dict[str, ParamValue]:
    """Check a client's parameters against the template; defaults fill the gaps."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise InvalidParams({"params": "must be a JSON object"})
    problems: dict[str, str] = {}
    for name in raw:
        if name not in template.params:
            problems[str(name)[:64]] = "unknown parameter"
    values: dict[str, ParamValue] = {}
    for name, param in template.params.items():
        if name not in raw or raw[name] is None:
            if param.default is not None:
                values[name] = param.default
            elif param.required:
                problems[name] = "required"
            continue
        try:
            values[name] = coerce_param(param, raw[name])
        except ValueError as exc:
            problems[name] = str(exc)
    if problems:
        raise InvalidParams(problems)
    return values


def validate_inputs(template: Template, raw: object) -> list[str]:
    """Input files are download links (http or https) that the job fetches."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidParams({"inputs": "must be a list of URLs"})
    if raw and not template.accepts_inputs:
        raise InvalidParams({"inputs": f"template {template.name!r} takes no inputs"})
    if len(raw) > MAX_INPUTS:
        raise InvalidParams({"inputs": f"at most {MAX_INPUTS} inputs"})
    problems: dict[str, str] = {}
    urls = []
    for index, item in enumerate(raw):
        try:
            urls.append(check_url(item))
        except ValueError as exc:
            problems[f"inputs[{index}]"] = str(exc)
    if problems:
        raise InvalidParams(problems)
    return urls


def coerce_param(param: Param, value: object) -> ParamValue:
    """One value, checked for the parameter's type and bounds; raises ValueError."""
    match param.type:
        case "bool":
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            return value
        case "int":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError("must be an integer")
            _check_bounds(param, value)
            return value
        case "float":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("must be a number")
            try:
                number = float(value)
            except OverflowError:
                raise ValueError("must be a finite number") from None
            if not math.isfinite(number):
                raise ValueError("must be a finite number")
            _check_bounds(param, number)
            return number
        case "choice":
            if value not in param.choices:
                raise ValueError(f"must be one of {', '.join(param.choices)}")
            return str(value)
        case "url":
            return check_url(value)
        case _:
            return _check_str(param, value)


def param_text(value: ParamValue) -> str:
    """A parameter's value as a job sees it: in its environment or from its spec."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _check_bounds(param: Param, value: float) -> None:
    if param.min is not None and value < param.min:
        raise ValueError(f"must be at least {param.min}")
    if param.max is not None and value > param.max:
        raise ValueError(f"must be at most {param.max}")


def _check_str(param: Param, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    limit = param.max_length or DEFAULT_STR_MAX_LENGTH
    if len(value) > limit:
        raise ValueError(f"must be at most {limit} characters")
    if "\x00" in value:
        raise ValueError("must not contain NUL")
    if param.pattern is not None and not re.fullmatch(param.pattern, value):
        raise ValueError(f"must match {param.pattern}")
    return value


def check_url(value: object) -> str:
    """An http(s) URL with a host and no credentials."""
    if not isinstance(value, str):
        raise ValueError("must be a URL string")
    if len(value) > MAX_URL_LENGTH:
        raise ValueError(f"must be at most {MAX_URL_LENGTH} characters")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - reading it raises ValueError for a malformed port
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if not parts.hostname:
        raise ValueError("must have a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("must not carry credentials")
    return value
