"""Configuration: one TOML file, ``METIS_<KEY>`` environment overrides, embedded defaults.

No file at all means the embedded defaults: memory backend, local scheduler,
the example templates, loopback only, and no API keys (which ``serve`` refuses: the
demo brings its own).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from metis_stream import tokens
from metis_stream.backends.contract import DEFAULT_MAX_JOB_BYTES
from metis_stream.errors import ConfigError, TemplateError
from metis_stream.events import MAX_EVENT_BYTES, MAX_REQUEST_BYTES, TYPE_PATTERN
from metis_stream.files import write_private
from metis_stream.keys import HASHED_KEY, ApiKey, keyring, named_key
from metis_stream.schedulers.dialects import SCHEDULERS
from metis_stream.spool import DELIVERIES
from metis_stream.templates import (
    DEFAULT_LOG_MAX_BYTES,
    DEFAULT_LOG_MAX_EVENTS,
    DEFAULT_STDERR_TAIL_LINES,
    Template,
    array_from_config,
    output_pattern,
    param_from_config,
)
from metis_stream.webhooks import (
    EVENT_CLASSES,
    WEBHOOK_NAME,
    Webhook,
    parse_secret,
)

__all__ = [
    "ClusterConfig",
    "Config",
    "ServerConfig",
    "check_auth",
    "load_config",
]

PACKAGE_DIR = Path(__file__).parent
JOBSCRIPTS_DIR = PACKAGE_DIR / "jobscripts"
EXAMPLES_FILE = JOBSCRIPTS_DIR / "examples.toml"
EMIT_SCRIPT = JOBSCRIPTS_DIR / "metis-emit"
AGENT_SCRIPT = PACKAGE_DIR / "metis_agent.py"
"""metis-agent, as ``GET /agent`` serves it."""
LINKS = ("ssh", "agent")
MIN_SECRET_BYTES = 32


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str = ""
    secret: str = ""
    redis_url: str = ""
    api_keys: tuple[str, ...] = ()
    """Admin keys, each named after its hash (metis_stream.keys): what every key was
    before keys had names and roles."""
    keys: tuple[ApiKey, ...] = ()
    """``[server.keys.NAME]``: keys with a name and a role (only in the file)."""
    insecure_no_auth: bool = False
    """Serve without keys: anyone who can connect is a full client, and on loopback
    that is every user of this machine. A server refuses to start without one or the
    other (``check_auth``); for a machine that nobody else uses."""
    allowed_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    """Names the server answers to besides the loopback names and the host of
    ``public_url`` (or of ``host``); ``"*"``: any name (see web/hosts.py)."""
    state_dir: str = "~/.local/state/metis-stream"
    max_event_bytes: int = MAX_EVENT_BYTES
    max_request_bytes: int = MAX_REQUEST_BYTES
    max_events_per_job: int = 10_000
    max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
    """The wire JSON of one job's events in all; past it, 413 for all but a terminal event.
    A thousand events of the largest size, or the whole event cap at 6.5 KiB each: far more
    than token and step events use, and what one job may cost the backend's memory."""
    max_lines_per_request: int = 10_000
    max_sockets_per_job: int = 100
    max_sockets: int = 10_000
    """Websockets per server process; beyond either socket limit a handshake gets 429."""
    max_streams_per_client: int = 10
    """Websockets and SSE streams one client (an API key, a watch token, or an address on a
    keyless server) may hold open on one job: well under ``max_sockets_per_job``, so that
    one watch token cannot take all of a job's slots; beyond it, 429."""
    send_timeout: float = 30.0
    """Seconds one send to a stream's client may wait on a client that does not read; past
    it the connection is aborted and its slot freed."""
    max_connections: int = 11_000
    """Open connections per server process, streams included (uvicorn's
    ``limit_concurrency``); beyond it an HTTP request gets 503 at once. Keep it above
    ``max_sockets``, or open streams alone would turn requests away."""
    header_timeout: float = 10.0
    """Seconds a connection has to send a complete request line and headers."""
    body_idle_timeout: float = 300.0
    """Seconds a request body may send nothing before it is refused with 408. A streamed
    ``metis-emit pipe`` sends nothing while its program is silent; it sends the next line
    again on a new request."""
    max_history_reads_per_client: int = 8
    """History pages (JSON ``GET /api/jobs/{id}/events``) one client (an API key, a watch
    token, or an address on a keyless server) may be reading at once; beyond it, 429."""
    event_retention: float = 7 * 24 * 3600
    max_job_lifetime: float = 30 * 24 * 3600
    """Redis: an unfinished job older than this is ended with a ``fatal`` event by the
    periodic sweep, so that its keys expire like any ended job's."""
    submit_timeout: float = 120.0
    access_log: bool = False
    """One log line per HTTP request: off by default, since jobs post every event as a
    request (about 5% of the server's CPU) and watch URLs carry tokens."""
    submissions_per_minute: float = 120.0
    """Per API key; on a server without keys, per client address and for all callers
    together. Beyond it, 429."""
    max_download_bytes: int = 16 << 30
    """The largest job file ``GET /api/jobs/{id}/files/PATH`` serves (413 beyond): a
    download is streamed and costs no memory, but it does cost the cluster's login node
    and the link to it."""
    max_upload_file_bytes: int = 1 << 30
    """The largest input file a submission may upload (413 beyond)."""
    max_upload_bytes: int = 4 << 30
    """All the input files of one submission together (413 beyond)."""
    forwarded_allow_ips: tuple[str, ...] = ()
    """Proxies (addresses or networks) whose ``X-Forwarded-For`` and
    ``X-Forwarded-Proto`` name the client; empty: the headers are ignored, so a caller
    cannot pick the address that rate limits and logs see."""

    @property
    def events_base_url(self) -> str:
        return (self.public_url or f"http://{self.host}:{self.port}").rstrip("/")

    def events_url(self, job_id: str) -> str:
        """Where a job posts its events (``METIS_EVENTS_URL``)."""
        return f"{self.events_base_url}/api/jobs/{job_id}/events"

    @property
    def keyring(self) -> tuple[ApiKey, ...]:
        """Every API key, ``api_keys`` and ``keys`` together; ConfigError for a key given
        twice (``check_auth`` refuses such a configuration before a server starts)."""
        return keyring(self.api_keys, self.keys)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    name: str
    scheduler: str = "local"
    host: str = ""
    port: int = 22
    user: str = ""
    key_file: str = ""
    key_passphrase: str = ""
    use_agent: bool = True
    known_hosts: str = "~/.ssh/known_hosts"
    second_factor: bool = False
    """The login node asks for a one-time code after the key: the server connects only when
    an operator logs it in (``metis-stream login``, docs/login.md), in one server process."""
    workdir: str = "metis-stream"
    poll_interval: float = 10.0
    max_sessions: int = 8
    command_timeout: float = 60.0
    stop_jobs_on_exit: bool = False
    """Local scheduler only: a server that stops stops its running jobs too (the demo).
    A cluster's jobs belong to its scheduler, and outlive the server."""
    delivery: str = ""
    """How jobs send their events (metis_stream.spool.DELIVERIES): ``http``, ``spool`` or
    ``both``. Left out: ``both`` on a cluster, ``http`` on the local scheduler."""
    spool_interval: float = 1.0
    """Seconds between reads of the spools while the cluster has running jobs (longer,
    up to ``poll_interval``, while nothing changes)."""
    spool_max_bytes: int = 1024 * 1024
    """Bytes one read takes from all spools together (at least one event's worth a job)."""
    spool_keep: float = 0.0
    """Seconds a job's spool stays after the job ended; 0: removed with its token."""
    link: str = "ssh"
    """How the server reaches the cluster (LINKS): ``ssh`` to ``host`` (with no host, the
    commands run on this machine), or ``agent``: metis-agent dials out from the cluster
    (docs/agent.md)."""
    agent_key: str = ""
    """``sha256:<hex>`` of the key the cluster's agent presents (``link = "agent"``)."""
    agent_wait: float = 30.0
    """Seconds an operation (a submission) waits for the agent to be connected before it
    fails (``link = "agent"``)."""

    def __post_init__(self) -> None:
        if not self.delivery:  # the default depends on the scheduler: set it here, once
            default = "http" if self.scheduler == "local" else "both"
            object.__setattr__(self, "delivery", default)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    clusters: Mapping[str, ClusterConfig] = field(default_factory=dict)
    templates: Mapping[str, Template] = field(default_factory=dict)
    webhooks: Mapping[str, Webhook] = field(default_factory=dict)

    @property
    def state_dir(self) -> Path:
        return Path(self.server.state_dir).expanduser()


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (or the embedded defaults), apply ``METIS_*`` overrides, fill the secret."""
    environ = os.environ if environ is None else environ
    source = path or EXAMPLES_FILE
    try:
        raw = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: {exc}") from None
    _refuse_unknown(raw, {"server", "clusters", "templates", "webhooks"}, f"{source}",
                    "section(s)")
    server = _server_config({**raw.get("server", {}), **_environment_overrides(environ)})
    clusters = {name: _cluster_config(name, table)
                for name, table in raw.get("clusters", {}).items()}
    templates = {name: _template(name, table, source.parent, clusters)
                 for name, table in raw.get("templates", {}).items()}
    for name, template in templates.items():
        if template.log_max_events < server.max_events_per_job:
            continue
        if "log_max_events" in raw["templates"][name]:
            raise ConfigError(
                f"[templates.{name}] log_max_events ({template.log_max_events}) must be below "
                f"[server] max_events_per_job ({server.max_events_per_job}), to leave room for "
                "the job's own events")
        # The default is half of the server's default limit: half of this server's, then.
        templates[name] = replace(template,
                                  log_max_events=max(2, server.max_events_per_job // 2))
    webhooks = {name: _webhook(name, table, templates, server)
                for name, table in raw.get("webhooks", {}).items()}
    config = Config(server=server, clusters=clusters, templates=templates, webhooks=webhooks)
    if server.secret:
        _check_secret(server.secret, "[server] secret (or METIS_SECRET)",
                      "make one with `metis-stream new-key`, or leave it out to have one "
                      "generated and kept in state_dir")
    else:
        config = replace(config, server=replace(server, secret=_kept_secret(config.state_dir)))
    return config


def check_auth(config: Config) -> None:
    """Refuse to serve without API keys, unless told ``insecure_no_auth``, and then only on
    loopback. Loopback is no trust boundary: every user of the machine can connect to it
    (on a login node, every user of the cluster), and without keys each one is a client
    that submits jobs as this account and reads every job."""
    server = config.server
    if server.keyring:
        if server.insecure_no_auth:
            raise ConfigError("[server] has both API keys (api_keys or [server.keys.*]) and "
                              "insecure_no_auth = true: remove one")
        return
    if not server.insecure_no_auth:
        raise ConfigError(
            "refusing to serve without API keys: every user of this machine could submit "
            "jobs as this account and read every job. Add a [server.keys.NAME] table with "
            'key = "sha256:..." and role = "client" or "admin", or api_keys to [server] (or '
            "METIS_API_KEYS; `metis-stream new-key` makes one), or, on a machine that nobody "
            "else uses, set insecure_no_auth = true in [server]")
    if not _is_loopback(server.host):
        raise ConfigError(
            f"refusing to listen on {server.host}: a server reachable from other machines "
            "needs API keys ([server.keys.NAME], or api_keys in [server], or METIS_API_KEYS), "
            "whatever insecure_no_auth says; without keys, anyone who can reach it could "
            "submit jobs to your cluster"
        )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse_unknown(table: Mapping[str, Any], known: set[str], where: str,
                    what: str = "key(s)") -> None:
    """A misspelt key would otherwise be ignored silently."""
    unknown = set(table) - known
    if unknown:
        raise ConfigError(f"{where}: unknown {what} {sorted(unknown)}")


FILE_ONLY = frozenset({"keys"})
"""``[server]`` keys that no environment variable sets: tables, not values."""


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for item in fields(ServerConfig):
        if item.name in FILE_ONLY:
            continue
        value = environ.get(f"METIS_{item.name.upper()}")
        if value is not None:
            overrides[item.name] = value
    return overrides


def _server_config(table: Mapping[str, Any]) -> ServerConfig:
    known = {f.name: f for f in fields(ServerConfig)}
    _refuse_unknown(table, set(known), "[server]")
    values: dict[str, Any] = {}
    named = table.get("keys", {})
    if not isinstance(named, Mapping):
        raise ConfigError('[server] keys: give each key a table, [server.keys.NAME] with key = '
                          '"sha256:..." and role = "client" or "admin"')
    values["keys"] = tuple(named_key(name, entry) for name, entry in named.items())
    for name, value in table.items():
        if name == "keys":
            continue
        default = getattr(ServerConfig(), name)
        try:
            values[name] = _coerce(value, default)
        except (TypeError, ValueError):
            raise ConfigError(f"[server] {name}: cannot use {value!r}") from None
    server = ServerConfig(**values)
    for limit in ("max_download_bytes", "max_upload_file_bytes", "max_upload_bytes"):
        if getattr(server, limit) < 1:
            raise ConfigError(f"[server] {limit} must be a positive number of bytes")
    keyring(server.api_keys, server.keys)  # refuses a key given twice, a malformed sha256:
    return server


def _coerce(value: Any, default: Any) -> Any:
    """Values from the environment arrive as text; lists there are comma-separated."""
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(item).strip() for item in items if str(item).strip())
    if isinstance(default, bool):
        return _strict_bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if not isinstance(value, str):
        raise TypeError
    return value


def _strict_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise TypeError


def _cluster_config(name: str, table: Mapping[str, Any]) -> ClusterConfig:
    known = {f.name for f in fields(ClusterConfig)} - {"name"}
    _refuse_unknown(table, known, f"[clusters.{name}]")
    values: dict[str, Any] = {}
    for key, value in table.items():
        default = getattr(ClusterConfig(name=name), key)
        try:
            values[key] = _coerce(value, default)
        except (TypeError, ValueError):
            raise ConfigError(f"[clusters.{name}] {key}: cannot use {value!r}") from None
    cluster = ClusterConfig(name=name, **values)
    if cluster.scheduler not in SCHEDULERS:
        raise ConfigError(f"[clusters.{name}] scheduler must be one of {', '.join(SCHEDULERS)}")
    if cluster.host and not cluster.user:
        raise ConfigError(f"[clusters.{name}]: a cluster reached over SSH needs a user")
    if cluster.second_factor and not cluster.host:
        raise ConfigError(f"[clusters.{name}]: second_factor is for a login node reached over "
                          "SSH (host); remove it")
    if cluster.scheduler == "local" and cluster.host:
        raise ConfigError(f"[clusters.{name}]: the local scheduler runs jobs here; remove host")
    if cluster.scheduler != "local" and cluster.stop_jobs_on_exit:
        raise ConfigError(f"[clusters.{name}]: stop_jobs_on_exit is for the local scheduler; "
                          "a cluster's jobs outlive the server (cancel them to stop them)")
    if cluster.delivery not in DELIVERIES:
        raise ConfigError(f"[clusters.{name}] delivery must be one of {', '.join(DELIVERIES)}: "
                          "http (events over the network), spool (through the shared "
                          "filesystem only), both")
    _check_link(cluster)
    if cluster.spool_interval <= 0 or cluster.spool_keep < 0:
        raise ConfigError(f"[clusters.{name}]: spool_interval must be above 0 and spool_keep "
                          "0 or more (seconds)")
    if cluster.spool_max_bytes < MAX_EVENT_BYTES:
        raise ConfigError(f"[clusters.{name}] spool_max_bytes must be at least "
                          f"{MAX_EVENT_BYTES} (one event)")
    return cluster


def _check_link(cluster: ClusterConfig) -> None:
    where = f"[clusters.{cluster.name}]"
    if cluster.link not in LINKS:
        raise ConfigError(f"{where} link must be one of {', '.join(LINKS)}: ssh (the server "
                          "logs in to host) or agent (metis-agent dials out from the cluster)")
    if cluster.link != "agent":
        if cluster.agent_key:
            raise ConfigError(f'{where}: agent_key is for link = "agent"')
        return
    if cluster.scheduler == "local" or cluster.host:
        raise ConfigError(f'{where}: link = "agent" is for a cluster\'s batch system (pbs or '
                          "slurm) that metis-agent reaches: remove host")
    if not HASHED_KEY.match(cluster.agent_key):
        raise ConfigError(f'{where}: link = "agent" needs agent_key = "sha256:<64 hex '
                          'digits>", the hash of the key the agent presents (`metis-stream '
                          "new-key` prints a key and that form of it)")
    if cluster.agent_wait <= 0:
        raise ConfigError(f"{where} agent_wait must be above 0 (seconds)")


def _template(name: str, table: Mapping[str, Any], base: Path,
              clusters: Mapping[str, ClusterConfig]) -> Template:
    where = f"[templates.{name}]"
    known = {"cluster", "script", "remote_script", "description", "queue", "account",
             "resources", "params", "accepts_inputs", "capture", "log_max_events",
             "log_max_bytes", "stderr_tail_lines", "outputs", "array"}
    _refuse_unknown(table, known, where)
    cluster = table.get("cluster", "")
    if cluster not in clusters:
        raise ConfigError(f"{where}: cluster {cluster!r} is not configured")
    if ("script" in table) == ("remote_script" in table):
        raise ConfigError(f"{where}: give exactly one of script or remote_script")
    script = None
    if "script" in table:
        script = (base / Path(table["script"]).expanduser()).resolve()
        if not script.is_file():
            raise ConfigError(f"{where}: script {script} does not exist")
    try:
        params = {key: param_from_config(key, value)
                  for key, value in table.get("params", {}).items()}
    except TemplateError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    resources = {str(k): str(v) for k, v in table.get("resources", {}).items()}
    capture = table.get("capture", True)
    if not isinstance(capture, bool):
        raise ConfigError(f"{where}: capture must be true or false")
    budget = {key: _count(table, key, default, where) for key, default in (
        ("log_max_events", DEFAULT_LOG_MAX_EVENTS), ("log_max_bytes", DEFAULT_LOG_MAX_BYTES),
        ("stderr_tail_lines", DEFAULT_STDERR_TAIL_LINES))}
    if budget["log_max_events"] < 2:
        raise ConfigError(f"{where}: log_max_events must be at least 2 (one for the "
                          "notice that output was cut)")
    outputs = table.get("outputs", [])
    if not isinstance(outputs, list) or not all(isinstance(glob, str) for glob in outputs):
        raise ConfigError(f'{where}: outputs must be a list of globs, such as ["*.png"]')
    for glob in outputs:
        try:
            output_pattern(glob)
        except TemplateError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    array, array_param = None, None
    if "array" in table:
        if clusters[cluster].scheduler == "local":
            raise ConfigError(f"{where}: array: the local scheduler runs no arrays; put the "
                              "template on a pbs or slurm cluster (docs/arrays.md)")
        if clusters[cluster].delivery == "spool":
            raise ConfigError(f"{where}: array: an array's elements deliver over http; "
                              f"cluster {cluster!r} has delivery = \"spool\": set "
                              "\"both\" or \"http\" (docs/arrays.md)")
        try:
            array, array_param = array_from_config(table["array"], params)
        except TemplateError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return Template(
        name=name, cluster=cluster, script=script, remote_script=table.get("remote_script"),
        description=table.get("description", ""), queue=table.get("queue"),
        account=table.get("account"), resources=resources, params=params,
        accepts_inputs=bool(table.get("accepts_inputs", True)), capture=capture,
        outputs=tuple(outputs), array=array, array_param=array_param, **budget,
    )


WEBHOOK_SECONDS = ("timeout", "retry_period", "retry_base", "retry_cap")


def _webhook(name: str, table: Any, templates: Mapping[str, Template],
             server: ServerConfig) -> Webhook:
    """A ``[webhooks.NAME]`` table (docs/webhooks.md)."""
    where = f"[webhooks.{name}]"
    if not WEBHOOK_NAME.match(name):
        raise ConfigError(f"{where}: a webhook's name may have only letters, digits, _ and - "
                          "(at most 64): it names the webhook in metrics and dead letters")
    if not isinstance(table, Mapping):
        raise ConfigError(f'{where} must be a table: url = "https://...", secret = "whsec_..."')
    _refuse_unknown(table, {"url", "secret", "events", "types", "templates", "owner",
                            *WEBHOOK_SECONDS}, where)
    url = table.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ConfigError(f'{where} needs url = "https://...": where the events are POSTed')
    secret = parse_secret(table.get("secret"), where)
    events = _names(table, "events", where, ["state"] if "types" not in table else [])
    unknown = events - set(EVENT_CLASSES)
    if unknown:
        raise ConfigError(f"{where} events may name {', '.join(EVENT_CLASSES)}, not "
                          f"{', '.join(sorted(unknown))}; chosen event types go in types")
    types = _names(table, "types", where, [])
    bad_types = {name for name in types if not TYPE_PATTERN.match(name)}
    if bad_types:
        raise ConfigError(f"{where} types: {', '.join(sorted(bad_types))} cannot be event "
                          "types ([a-z][a-z0-9_.-]{0,63})")
    if not events and not types:
        raise ConfigError(f"{where} sends nothing: give events (state, terminal, all) or "
                          "types")
    chosen = _names(table, "templates", where, [])
    missing = chosen - set(templates)
    if missing:
        raise ConfigError(f"{where} templates: {', '.join(sorted(missing))} not configured")
    owner = None
    if "owner" in table:
        owner = next((key for key in server.keyring if key.name == table["owner"]), None)
        if owner is None:
            raise ConfigError(f"{where} owner must name a [server.keys.NAME] key: the "
                              "webhook then sends only the jobs that key sees")
    seconds = {}
    for key in WEBHOOK_SECONDS:
        if key in table:
            value = table[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(f"{where} {key} must be a number of seconds above 0")
            seconds[key] = float(value)
    hook = Webhook(name=name, url=url, secret=secret, events=events, types=types,
                   templates=chosen, owner=owner, **seconds)
    if hook.retry_base > hook.retry_cap:
        raise ConfigError(f"{where} retry_base must not be above retry_cap")
    return hook


def _names(table: Mapping[str, Any], key: str, where: str, default: list[str]
           ) -> frozenset[str]:
    value = table.get(key, default)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where} {key} must be a list of names")
    return frozenset(value)


def _check_secret(secret: str, where: str, remedy: str) -> None:
    """Whoever guesses the secret can mint every token: no fewer bytes than the HMAC-SHA256
    output that it protects."""
    length = len(secret.encode())
    if length < MIN_SECRET_BYTES:
        raise ConfigError(f"the {where} is {length} bytes; it must be at least "
                          f"{MIN_SECRET_BYTES} bytes: {remedy}")


def _count(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key} must be a whole number")
    return value


def _kept_secret(state_dir: Path) -> str:
    """The server's secret, generated once and kept, so tokens survive a restart and every
    process on this machine agrees on them."""
    path = state_dir / "secret"
    if not path.exists():
        # Two processes starting at once must end up with the same secret.
        write_private(path, tokens.new_secret().encode(), replace=False)
    secret = path.read_text().strip()
    _check_secret(secret, f"secret kept in {path}",
                  "remove the file to have a new one generated, or write one made with "
                  "`metis-stream new-key` there")
    return secret
