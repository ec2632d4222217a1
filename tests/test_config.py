"""Unit tests of metis_stream.config: the TOML file, METIS_* overrides, defaults, the secret."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from metis_stream.backends.memory import MemoryBackend
from metis_stream.config import (
    EXAMPLES_FILE,
    ClusterConfig,
    Config,
    ServerConfig,
    check_auth,
    load_config,
)
from metis_stream.errors import ConfigError
from metis_stream.factory import build_schedulers
from metis_stream.templates import (
    DEFAULT_LOG_MAX_BYTES,
    DEFAULT_LOG_MAX_EVENTS,
    DEFAULT_STDERR_TAIL_LINES,
    Param,
)

OPERATOR_SECRET = "an-operator-made-secret-of-40-bytes-or-so"

FULL = """
[server]
host = "127.0.0.1"
port = 8123
public_url = "http://10.0.0.5:8123"
secret = "{secret}"
redis_url = "redis://127.0.0.1:6379/0"
api_keys = ["k1", "sha256:0000000000000000000000000000000000000000000000000000000000000000"]
allowed_origins = ["https://app.example.org"]
state_dir = "{state}"
max_event_bytes = 1000
max_events_per_job = 50
submit_timeout = 30

[clusters.metis]
scheduler = "pbs"
host = "metis.example.edu"
port = 2222
user = "me"
key_file = "~/.ssh/id_ed25519"
known_hosts = "~/.ssh/known_hosts"
workdir = "metis-stream"
poll_interval = 10

[clusters.laptop]
scheduler = "local"

[templates.tokens]
cluster = "metis"
script = "jobs/tokens.pbs"
description = "Stream a model's output token by token"
queue = "short"
account = "proj1"
resources = {{ select = "1:ncpus=1", walltime = "00:05:00", mem = 4 }}
params.text = {{ type = "str", max_length = 200, default = "Hello from the cluster" }}
params.delay = {{ type = "float", min = 0, max = 5, default = 0.05 }}

[templates.remote]
cluster = "laptop"
remote_script = "/abs/path/run.pbs"
accepts_inputs = false
"""


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def env(state: Path) -> dict[str, str]:
    """An environment that keeps the secret out of the real home directory."""
    return {"METIS_STATE_DIR": str(state)}


def write(tmp_path: Path, text: str, scripts: tuple[str, ...] = ("jobs/tokens.pbs",)) -> Path:
    folder = tmp_path / "conf"
    folder.mkdir(exist_ok=True)
    for script in scripts:
        (folder / script).parent.mkdir(parents=True, exist_ok=True)
        (folder / script).write_text("#!/bin/sh\n")
    path = folder / "metis.toml"
    path.write_text(text)
    return path


def minimal(extra: str = "", template: str | None = "") -> str:
    return ('[clusters.c]\nscheduler = "local"\n' + extra
            + ("\n[templates.t]\ncluster = \"c\"\nremote_script = \"/x.sh\"\n" + template
               if template is not None else ""))


# no file: the embedded defaults


def test_no_file_means_the_embedded_examples(env, state):
    config = load_config(None, env)
    assert config.server.host == "127.0.0.1"
    assert config.server.redis_url == ""
    assert config.server.api_keys == ()
    assert set(config.clusters) == {"local", "spooled"}
    assert config.clusters["local"].scheduler == "local"
    assert (config.clusters["spooled"].scheduler, config.clusters["spooled"].delivery) == (
        "local", "spool")
    assert set(config.templates) == {"tokens", "tokens-spool", "download", "audio"}
    tokens = config.templates["tokens"]
    assert set(tokens.params) == {"text", "delay"}
    assert tokens.params["delay"].type == "float"
    assert tokens.script is not None
    assert tokens.script.is_file()
    download = config.templates["download"]
    assert download.params["url"].type == "url"
    assert download.params["url"].required
    assert config.server.secret
    with pytest.raises(ConfigError, match="refusing to serve without API keys"):
        check_auth(config)  # nobody gets a keyless server by default


def test_the_embedded_examples_file_parses():
    # Independent of the scripts being present: the file itself names what the demo needs.
    import tomllib

    raw = tomllib.loads(EXAMPLES_FILE.read_text())
    assert raw["clusters"]["local"]["scheduler"] == "local"
    assert set(raw["templates"]) == {"tokens", "tokens-spool", "download", "audio"}
    assert raw["templates"]["download"]["params"]["url"]["type"] == "url"


# a full file


def test_a_file_with_every_section(tmp_path, state):
    path = write(tmp_path, FULL.format(state=state, secret=OPERATOR_SECRET))
    config = load_config(path, {})
    server = config.server
    assert server == ServerConfig(
        host="127.0.0.1", port=8123, public_url="http://10.0.0.5:8123", secret=OPERATOR_SECRET,
        redis_url="redis://127.0.0.1:6379/0",
        api_keys=("k1", "sha256:" + "0" * 64), allowed_origins=("https://app.example.org",),
        state_dir=str(state), max_event_bytes=1000, max_events_per_job=50, submit_timeout=30.0)
    assert isinstance(server.submit_timeout, float)
    assert server.events_base_url == "http://10.0.0.5:8123"
    assert config.clusters["metis"] == ClusterConfig(
        name="metis", scheduler="pbs", host="metis.example.edu", port=2222, user="me",
        key_file="~/.ssh/id_ed25519", known_hosts="~/.ssh/known_hosts", workdir="metis-stream",
        poll_interval=10, delivery="both")
    assert config.clusters["laptop"].scheduler == "local"
    assert config.clusters["laptop"].delivery == "http"
    tokens = config.templates["tokens"]
    assert tokens.cluster == "metis"
    assert tokens.script == (tmp_path / "conf" / "jobs" / "tokens.pbs").resolve()
    assert tokens.remote_script is None
    assert (tokens.queue, tokens.account) == ("short", "proj1")
    assert tokens.resources == {"select": "1:ncpus=1", "walltime": "00:05:00", "mem": "4"}
    assert tokens.params["delay"] == Param("delay", type="float", min=0, max=5, default=0.05)
    assert tokens.params["text"].max_length == 200
    assert tokens.accepts_inputs
    remote = config.templates["remote"]
    assert remote.script is None
    assert remote.remote_script == "/abs/path/run.pbs"
    assert not remote.accepts_inputs
    assert not state.exists()  # a configured secret is not written anywhere


def test_events_base_url_defaults_from_host_and_port(tmp_path, env):
    path = write(tmp_path, '[server]\nhost = "127.0.0.2"\nport = 9001\n' + minimal())
    assert load_config(path, env).server.events_base_url == "http://127.0.0.2:9001"


def test_public_url_trailing_slash_is_dropped(tmp_path, env):
    path = write(tmp_path, '[server]\npublic_url = "http://h:1/"\n')
    assert load_config(path, env).server.events_base_url == "http://h:1"


def test_script_paths_are_relative_to_the_config_file(tmp_path, env, monkeypatch):
    path = write(tmp_path, minimal(template=None) + '[templates.t]\ncluster = "c"\n'
                 'script = "sub/run.sh"\n', scripts=("sub/run.sh",))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    script = load_config(path, env).templates["t"].script
    assert script == (tmp_path / "conf" / "sub" / "run.sh").resolve()
    assert script is not None
    assert script.is_absolute()


def test_a_missing_script_is_named(tmp_path, env):
    path = write(tmp_path, minimal(template=None) + '[templates.t]\ncluster = "c"\n'
                 'script = "nope.sh"\n', scripts=())
    with pytest.raises(ConfigError, match=r"\[templates\.t\]: script .*nope\.sh does not exist"):
        load_config(path, env)


# METIS_* overrides


def test_environment_wins_over_the_file(tmp_path, state):
    path = write(tmp_path, FULL.format(state=state, secret=OPERATOR_SECRET))
    config = load_config(path, {
        "METIS_HOST": "127.0.0.9", "METIS_PORT": "9999", "METIS_SECRET": "e" * 32,
        "METIS_API_KEYS": " a, b ,,c ,", "METIS_REDIS_URL": "redis://other:1/2",
        "METIS_SUBMIT_TIMEOUT": "2.5", "METIS_ALLOWED_ORIGINS": "https://x.org",
    })
    server = config.server
    assert server.host == "127.0.0.9"
    assert server.port == 9999
    assert isinstance(server.port, int)
    assert server.secret == "e" * 32
    assert server.api_keys == ("a", "b", "c")
    assert server.redis_url == "redis://other:1/2"
    assert server.submit_timeout == 2.5
    assert server.allowed_origins == ("https://x.org",)
    assert server.public_url == "http://10.0.0.5:8123"  # not overridden: the file's


def test_unrelated_metis_variables_are_ignored(tmp_path, env):
    path = write(tmp_path, minimal())
    config = load_config(path, {**env, "METIS_URL": "http://x", "METIS_API_KEY": "k",
                                "METIS_CONFIG": "/nope", "METIS_JOB_ID": "j_1"})
    assert config.server.api_keys == ()


@pytest.mark.parametrize(("name", "value"), [("METIS_PORT", "eighty"),
                                             ("METIS_PORT", "80.5"),
                                             ("METIS_MAX_EVENT_BYTES", "1k"),
                                             ("METIS_SUBMIT_TIMEOUT", "soon")])
def test_bad_environment_values_are_named(tmp_path, env, name, value):
    path = write(tmp_path, minimal())
    key = name.removeprefix("METIS_").lower()
    with pytest.raises(ConfigError, match=rf"\[server\] {key}: cannot use"):
        load_config(path, {**env, name: value})


def test_empty_api_keys_from_the_environment_means_none(tmp_path, env):
    path = write(tmp_path, '[server]\napi_keys = ["k"]\n')
    assert load_config(path, {**env, "METIS_API_KEYS": " , "}).server.api_keys == ()


# refusals, with where


@pytest.mark.parametrize(("text", "where"), [
    ("[serverr]\nhost = 'x'\n", r"unknown section\(s\) \['serverr'\]"),
    ("[server]\nhots = 'x'\n", r"\[server\]: unknown key\(s\) \['hots'\]"),
    ('[clusters.c]\nscheduler = "local"\nhots = "x"\n',
     r"\[clusters\.c\]: unknown key\(s\) \['hots'\]"),
    (minimal(template='scirpt = "x"\n'), r"\[templates\.t\]: unknown key\(s\) \['scirpt'\]"),
    (minimal(template='params.p = { type = "str", maxlen = 3 }\n'),
     r"\[templates\.t\]: parameter 'p': unknown key"),
    (minimal(template='params.PATH = { type = "str" }\n'), r"\[templates\.t\]: parameter"),
    (minimal(template='params.path = { type = "str" }\n'), r"\[templates\.t\]: .*'PATH'"),
    ('[server]\nport = "http"\n', r"\[server\] port: cannot use"),
    ('[server]\nhost = 5\n', r"\[server\] host: cannot use"),
])
def test_unknown_or_bad_keys_are_refused_with_where(tmp_path, env, text, where):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=where):
        load_config(path, env)


def test_unreadable_or_invalid_toml_names_the_file(tmp_path, env):
    with pytest.raises(ConfigError, match=r"nope\.toml"):
        load_config(tmp_path / "nope.toml", env)
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\nhost=")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        load_config(bad, env)


@pytest.mark.parametrize(("cluster", "message"), [
    ('scheduler = "sge"', "scheduler must be one of local, pbs, slurm"),
    ('scheduler = "pbs"\nhost = "h"', "a cluster reached over SSH needs a user"),
    ('scheduler = "slurm"\nhost = "h"', "needs a user"),
    ('scheduler = "local"\nhost = "h"\nuser = "u"', "the local scheduler runs jobs here"),
    ('scheduler = "slurm"\nstop_jobs_on_exit = true', "stop_jobs_on_exit is for the local"),
    ('delivery = "carrier-pigeon"', "delivery must be one of http, spool, both"),
    ('delivery = "spool"\nspool_interval = 0', "spool_interval must be above 0"),
    ("spool_keep = -1", "spool_keep 0 or more"),
    ("spool_max_bytes = 1000", "spool_max_bytes must be at least 65536"),
    ('spool_interval = "often"', "spool_interval: cannot use 'often'"),
])
def test_cluster_validation(tmp_path, env, cluster, message):
    path = write(tmp_path, f"[clusters.hpc]\n{cluster}\n")
    with pytest.raises(ConfigError, match=rf"\[clusters\.hpc\].*{message}"):
        load_config(path, env)


@pytest.mark.parametrize(("cluster", "message"), [
    ('scheduler = "local"', "the local scheduler runs no arrays"),
    ('scheduler = "slurm"\nhost = "h"\nuser = "u"\ndelivery = "spool"',
     "an array's elements deliver over http"),
])
def test_an_array_is_refused_where_its_elements_cannot_run_or_report(tmp_path, env, cluster,
                                                                      message):
    path = write(tmp_path, f"[clusters.hpc]\n{cluster}\n\n[templates.sweep]\ncluster = 'hpc'\n"
                           "script = 'jobs/tokens.pbs'\narray = '1-5'\n")
    with pytest.raises(ConfigError, match=rf"sweep.*{message}"):
        load_config(path, env)


def test_a_local_cluster_needs_no_host(tmp_path, env):
    path = write(tmp_path, "[clusters.here]\nscheduler = 'local'\n")
    cluster = load_config(path, env).clusters["here"]
    assert (cluster.scheduler, cluster.host) == ("local", "")


@pytest.mark.parametrize("scheduler", ["pbs", "slurm"])
def test_a_batch_scheduler_without_host_runs_on_this_machine(tmp_path, env, scheduler):
    # no host: the server itself runs on the login node and calls qsub/sbatch directly
    path = write(tmp_path, f"[clusters.login]\nscheduler = '{scheduler}'\n")
    cluster = load_config(path, env).clusters["login"]
    assert (cluster.scheduler, cluster.host, cluster.user) == (scheduler, "", "")


def test_scheduler_defaults_to_local(tmp_path, env):
    path = write(tmp_path, "[clusters.here]\npoll_interval = 1\n")
    assert load_config(path, env).clusters["here"].scheduler == "local"


def test_cluster_values_are_type_checked(tmp_path, env):
    path = write(tmp_path, '[clusters.here]\nscheduler = "local"\npoll_interval = "fast"\n')
    with pytest.raises(ConfigError, match=r"\[clusters\.here\]"):
        load_config(path, env)


@pytest.mark.parametrize(("template", "message"), [
    ('cluster = "nowhere"\nremote_script = "/x"', "cluster 'nowhere' is not configured"),
    ('remote_script = "/x"', "cluster '' is not configured"),
    ('cluster = "c"', "give exactly one of script or remote_script"),
    ('cluster = "c"\nscript = "jobs/tokens.pbs"\nremote_script = "/x"', "give exactly one"),
])
def test_template_validation(tmp_path, env, template, message):
    path = write(tmp_path, minimal(template=None) + f"[templates.t]\n{template}\n")
    with pytest.raises(ConfigError, match=rf"\[templates\.t\]: {message}"):
        load_config(path, env)


# the secret


def test_the_secret_is_generated_once_kept_0600_and_reused(tmp_path, state):
    path = write(tmp_path, minimal())
    env = {"METIS_STATE_DIR": str(state)}
    first = load_config(path, env).server.secret
    assert len(first) >= 40
    kept = state / "secret"
    assert kept.read_text().strip() == first
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert [p.name for p in state.iterdir()] == ["secret"]  # no draft left behind
    assert load_config(path, env).server.secret == first
    assert load_config(path, env).server.secret == first


def test_a_different_state_dir_gets_a_different_secret(tmp_path):
    path = write(tmp_path, minimal())
    a = load_config(path, {"METIS_STATE_DIR": str(tmp_path / "a")}).server.secret
    b = load_config(path, {"METIS_STATE_DIR": str(tmp_path / "b")}).server.secret
    assert a != b


def test_an_existing_secret_file_is_used_stripped(tmp_path, state):
    state.mkdir()
    (state / "secret").write_text(f"  {OPERATOR_SECRET} \n")
    path = write(tmp_path, minimal())
    assert load_config(path, {"METIS_STATE_DIR": str(state)}).server.secret == OPERATOR_SECRET


def test_a_given_secret_writes_nothing(tmp_path, state):
    path = write(tmp_path, minimal())
    config = load_config(path, {"METIS_STATE_DIR": str(state), "METIS_SECRET": OPERATOR_SECRET})
    assert config.server.secret == OPERATOR_SECRET
    assert not state.exists()


@pytest.mark.parametrize("where", ["file", "environment", "kept file"])
@pytest.mark.parametrize("secret", ["s3cr3t", "x" * 31, "\u00e9" * 15 + "x"])
def test_a_secret_shorter_than_32_bytes_is_refused_with_what_to_do(tmp_path, state, where,
                                                                   secret):
    env = {"METIS_STATE_DIR": str(state)}
    text = minimal()
    if where == "file":
        text = f'[server]\nsecret = "{secret}"\n' + text
    elif where == "environment":
        env["METIS_SECRET"] = secret
    else:
        state.mkdir()
        (state / "secret").write_text(secret)
    with pytest.raises(ConfigError, match="at least 32 bytes") as caught:
        load_config(write(tmp_path, text), env)
    assert "metis-stream new-key" in str(caught.value)
    assert secret not in str(caught.value)  # a refused secret is still not printed


def test_a_secret_of_32_bytes_is_taken(tmp_path, state):
    config = load_config(write(tmp_path, minimal()),
                         {"METIS_STATE_DIR": str(state), "METIS_SECRET": "s" * 32})
    assert config.server.secret == "s" * 32


def test_state_dir_and_its_folders_are_made_0700_whatever_the_umask(tmp_path):
    state = tmp_path / "deep" / "state"
    old = os.umask(0)
    try:
        config = load_config(write(tmp_path, minimal()), {"METIS_STATE_DIR": str(state)})
        asyncio.run(build_schedulers(config, MemoryBackend())["c"].start())
    finally:
        os.umask(old)
    for folder in (tmp_path / "deep", state, state / "jobs", state / "jobs" / "c"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert stat.S_IMODE((state / "secret").stat().st_mode) == 0o600


def test_state_dir_expands_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path, minimal())
    config = load_config(path, {"METIS_STATE_DIR": "~/st"})
    assert config.state_dir == tmp_path / "st"
    assert (tmp_path / "st" / "secret").read_text().strip() == config.server.secret


# check_auth


def with_server(**values: Any) -> Config:
    return Config(server=ServerConfig(**values))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "0.0.0.0"])
def test_no_keys_is_refused_on_every_address_with_what_to_do(host):
    with pytest.raises(ConfigError) as caught:
        check_auth(with_server(host=host))
    message = str(caught.value)
    assert message.startswith("refusing to serve without API keys")
    assert "every user of this machine" in message
    assert "metis-stream new-key" in message and "insecure_no_auth = true" in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "localhost"])
def test_insecure_no_auth_serves_loopback_without_keys(host):
    check_auth(with_server(host=host, insecure_no_auth=True))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "10.0.0.5", "172.16.0.1",
                                  "metis.example.edu", "", "fe80::1"])
def test_beyond_loopback_without_keys_is_refused_even_when_insecure(host):
    with pytest.raises(ConfigError, match="api_keys") as caught:
        check_auth(with_server(host=host, insecure_no_auth=True))
    assert "refusing to listen" in str(caught.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "192.168.1.10", "::", "example.org"])
def test_any_address_is_allowed_with_keys(host):
    check_auth(with_server(host=host, api_keys=("k",)))


def test_keys_and_insecure_no_auth_together_are_refused():
    with pytest.raises(ConfigError, match=r"both API keys .* and insecure_no_auth"):
        check_auth(with_server(api_keys=("k",), insecure_no_auth=True))


def test_insecure_no_auth_from_the_file_and_the_environment(tmp_path, env):
    path = write(tmp_path, "[server]\ninsecure_no_auth = true\n" + minimal())
    assert load_config(path, env).server.insecure_no_auth
    assert not load_config(path, {**env, "METIS_INSECURE_NO_AUTH": "false"}
                           ).server.insecure_no_auth
    with pytest.raises(ConfigError, match="insecure_no_auth"):
        load_config(path, {**env, "METIS_INSECURE_NO_AUTH": "yes"})


# the launcher's settings per template


def test_capture_and_the_output_budget_have_defaults(tmp_path, env):
    template = load_config(write(tmp_path, minimal()), env).templates["t"]
    assert template.capture is True
    assert (template.log_max_events, template.log_max_bytes, template.stderr_tail_lines) == (
        DEFAULT_LOG_MAX_EVENTS, DEFAULT_LOG_MAX_BYTES, DEFAULT_STDERR_TAIL_LINES)
    assert ServerConfig().max_events_per_job > DEFAULT_LOG_MAX_EVENTS


def test_capture_and_the_output_budget_are_read(tmp_path, env):
    path = write(tmp_path, minimal(template="capture = false\nlog_max_events = 100\n"
                                            "log_max_bytes = 65536\nstderr_tail_lines = 5\n"))
    template = load_config(path, env).templates["t"]
    assert (template.capture, template.log_max_events, template.log_max_bytes,
            template.stderr_tail_lines) == (False, 100, 65536, 5)


def test_the_default_event_budget_fits_a_smaller_server_limit(tmp_path, env):
    path = write(tmp_path, "[server]\nmax_events_per_job = 50\n" + minimal())
    assert load_config(path, env).templates["t"].log_max_events == 25
    path = write(tmp_path, "[server]\nmax_events_per_job = 50\n"
                 + minimal(template="log_max_events = 50\n"))
    with pytest.raises(ConfigError, match=r"log_max_events \(50\) must be below"):
        load_config(path, env)


@pytest.mark.parametrize("line", ['capture = "yes"', "log_max_events = -1",
                                  "log_max_bytes = 1.5", "stderr_tail_lines = true",
                                  "log_max_events = 1"])
def test_bad_capture_settings_are_refused(tmp_path, env, line):
    path = write(tmp_path, minimal(template=line + "\n"))
    with pytest.raises(ConfigError, match=r"\[templates\.t\]"):
        load_config(path, env)


def test_delivery_defaults_by_scheduler_however_the_config_is_made():
    # Built in code as from a file: a cluster reads spools by default, the local one not.
    assert ClusterConfig(name="hpc", scheduler="slurm").delivery == "both"
    assert ClusterConfig(name="here").delivery == "http"
    assert ClusterConfig(name="hpc", scheduler="pbs", delivery="spool").delivery == "spool"


# webhooks

WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
KEYS = ('[server.keys.alice]\nkey = "k-alice"\nrole = "client"\n'
        '[server.keys.root]\nkey = "k-root"\nrole = "admin"\n')


def webhook(lines: str = "") -> str:
    return (KEYS + minimal() + '\n[webhooks.app]\nurl = "https://app.example.org/hook"\n'
            f'secret = "{WEBHOOK_SECRET}"\n' + lines)


def test_a_webhook_has_defaults(tmp_path, env):
    hook = load_config(write(tmp_path, webhook()), env).webhooks["app"]
    assert (hook.url, hook.events, hook.types, hook.templates, hook.owner) == (
        "https://app.example.org/hook", frozenset({"state"}), frozenset(), frozenset(), None)
    assert (hook.timeout, hook.retry_period, hook.retry_base, hook.retry_cap) == (
        10.0, 24 * 3600.0, 1.0, 600.0)
    assert len(hook.secret) == 24
    assert load_config(write(tmp_path, minimal()), env).webhooks == {}


def test_a_webhook_with_every_option(tmp_path, env):
    hook = load_config(write(tmp_path, webhook(
        'events = ["terminal"]\ntypes = ["step", "result"]\ntemplates = ["t"]\n'
        'owner = "alice"\ntimeout = 2\nretry_period = 30.5\nretry_base = 0.1\n'
        'retry_cap = 1\n')), env).webhooks["app"]
    assert (hook.events, hook.types, hook.templates) == (
        frozenset({"terminal"}), frozenset({"step", "result"}), frozenset({"t"}))
    assert hook.owner is not None and (hook.owner.name, hook.owner.admin) == ("alice", False)
    assert (hook.timeout, hook.retry_period, hook.retry_base, hook.retry_cap) == (
        2.0, 30.5, 0.1, 1.0)


def test_types_alone_send_only_those_types(tmp_path, env):
    hook = load_config(write(tmp_path, webhook('types = ["step"]\n')), env).webhooks["app"]
    assert (hook.events, hook.types) == (frozenset(), frozenset({"step"}))


@pytest.mark.parametrize(("lines", "message"), [
    ('color = "red"\n', r"unknown key\(s\) \['color'\]"),
    ('events = ["state", "step"]\n', "events may name state, terminal, all, not step; chosen "
                                     "event types go in types"),
    ('events = "state"\n', "events must be a list of names"),
    ('events = []\n', "sends nothing"),
    ('types = ["Step!"]\n', "Step! cannot be event types"),
    ('templates = ["nope"]\n', "templates: nope not configured"),
    ('owner = "mallory"\n', r"owner must name a \[server.keys.NAME\] key"),
    ("timeout = 0\n", "timeout must be a number of seconds above 0"),
    ('retry_period = "1d"\n', "retry_period must be a number of seconds"),
    ("retry_base = 10\nretry_cap = 1\n", "retry_base must not be above retry_cap"),
])
def test_bad_webhooks_are_refused_with_where(tmp_path, env, lines, message):
    with pytest.raises(ConfigError, match=rf"\[webhooks\.app\].*{message}"):
        load_config(write(tmp_path, webhook(lines)), env)


@pytest.mark.parametrize(("table", "message"), [
    ('[webhooks.app]\nsecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n', "needs url"),
    ('[webhooks.app]\nurl = "ftp://x"\nsecret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"\n',
     "needs url"),
    ('[webhooks.app]\nurl = "https://x"\n', "secret must be whsec_"),
    ('[webhooks.app]\nurl = "https://x"\nsecret = "hunter2"\n', "secret must be whsec_"),
    ('[webhooks."a b"]\nurl = "https://x"\n', "only letters, digits"),
    ('[webhooks]\napp = 3\n', "must be a table"),
])
def test_a_webhook_needs_a_name_a_url_and_a_secret(tmp_path, env, table, message):
    with pytest.raises(ConfigError, match=rf"\[webhooks\.[^]]+\].*{message}"):
        load_config(write(tmp_path, minimal() + table), env)
