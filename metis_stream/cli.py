"""The ``metis-stream`` command line: run the server, and talk to one.

Client commands find the server from ``--url`` or ``METIS_URL`` and the key
from ``--key`` or ``METIS_API_KEY``. ``tail`` exits 0 after ``completed``, 1
after ``fatal`` or ``cancelled``, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import functools
import getpass
import os
import shlex
import sys
import time
import webbrowser
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import uvicorn

from metis_stream import tokens, webhooks
from metis_stream.client import Client, post_event
from metis_stream.config import Config, check_auth, load_config
from metis_stream.diagnosis import render_json, render_text
from metis_stream.doctor import DEFAULT_TIMEOUT as DEFAULT_DOCTOR_TIMEOUT
from metis_stream.doctor import diagnose
from metis_stream.errors import EXIT_FAILED, ClientError, ConfigError, MetisError, outcome_of
from metis_stream.events import OUTPUT_STREAMS, parse_chunk
from metis_stream.media import MediaSaver
from metis_stream.terminal import (
    EventPrinter,
    ProgressBar,
    StatusLine,
    byte_size,
    describe_end,
    json_line,
    shown,
    writes_utf8,
)
from metis_stream.web.app import create_app
from metis_stream.web.protocol import BoundedHttpToolsProtocol

DEFAULT_URL = "http://127.0.0.1:8000"
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        code: int = args.run(args)
    except MetisError as exc:
        status = f" ({exc.status})" if isinstance(exc, ClientError) and exc.status else ""
        print(f"metis-stream: {exc.message}{status}", file=sys.stderr)
        return outcome_of(exc).exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metis-stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    server = argparse.ArgumentParser(add_help=False)
    server.add_argument("--host", help="address to listen on (default from the config)")
    server.add_argument("--port", type=int, help="port to listen on (default from the config)")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", type=Path, help="TOML configuration (or METIS_CONFIG)")
    client = argparse.ArgumentParser(add_help=False)
    client.add_argument("--url", default=os.environ.get("METIS_URL", DEFAULT_URL),
                        help=f"the server (or METIS_URL; default {DEFAULT_URL})")
    client.add_argument("--key", default=os.environ.get("METIS_API_KEY"),
                        help="API key (or METIS_API_KEY)")

    def command(name: str, help: str, run: Any, *parents: argparse.ArgumentParser
                ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=list(parents))
        sub.set_defaults(run=run)
        return sub

    serve = command("serve", "run the server", _serve, config, server)
    serve.add_argument("--workers", type=int, default=1,
                       help="server processes (more than one needs redis_url)")
    demo = command("demo", "run the server on embedded defaults (no Redis, no cluster) and "
                           "open the viewer", _demo, server)
    demo.add_argument("--no-browser", action="store_true", help="do not open a browser")

    submit = command("submit", "submit a job from a template", _submit, client)
    submit.add_argument("template")
    submit.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a template parameter (repeatable)")
    submit.add_argument("-i", "--input", action="append", default=[], metavar="FILE|URL",
                        help="an input: a local file, uploaded into the job's inputs/ "
                             "folder, or an http(s) link the job downloads (repeatable)")
    submit.add_argument("--user", help="the end user the job is for (your app's id for them)")
    submit.add_argument("--follow", action="store_true", help="then tail the job")
    submit.add_argument("--json", action="store_true", help="with --follow: one event a line")

    tail = command("tail", "print a job's events until it ends", _tail, client)
    tail.add_argument("job")
    tail.add_argument("--after", type=int, default=0, help="only events after this seq")
    tail.add_argument("--json", action="store_true", help="one event a line, as JSON")
    tail.add_argument("--save", type=Path, metavar="DIR",
                      help="write each media stream's chunks to a file in DIR (docs/media.md)")
    tail.add_argument("--stream", choices=OUTPUT_STREAMS,
                      help="only the job's output on this stream, line by line (how the "
                           "job ended goes to stderr and to the exit status)")

    jobs = command("jobs", "list the jobs the key sees (a client key: its own), newest first",
                   _jobs, client)
    jobs.add_argument("--state", help="only jobs in this state")
    jobs.add_argument("--user", help="only the jobs of this end user")
    jobs.add_argument("--json", action="store_true", help="one job record a line, as JSON")

    files = command("files", "list a job's files (its folder on the cluster)", _files, client)
    files.add_argument("job")
    files.add_argument("--json", action="store_true", help="one file a line, as JSON")

    get = command("get", "download one of a job's files", _get, client)
    get.add_argument("job")
    get.add_argument("path", help="the file's path in the job's folder (as `files` lists it)")
    get.add_argument("-o", "--output", type=Path,
                     help="where to write it (default: its name, in this folder; - for stdout)")

    cancel = command("cancel", "cancel a job", _cancel, client)
    cancel.add_argument("job")

    login = command("login", "log the server in to a cluster whose login node asks for a "
                             "one-time code after the key (an admin key; docs/login.md)",
                    _login, client)
    login.add_argument("cluster")
    login.add_argument("--code", help="the code (else asked for on the terminal, or read "
                                      "from stdin; a code on the command line shows in ps)")

    token = command("token", "print a job's ingest token (needs the server's secret)",
                    _token, config)
    token.add_argument("job")

    command("new-key", "print a new random API key, then the sha256: form of it to put in a "
                       "[server.keys.NAME] key or [server] api_keys (the key itself also "
                       "serves as a secret)", _new_key)

    hooks = commands.add_parser("webhooks", help="the webhooks' dead letters, and secrets",
                                description="the webhooks' dead letters (an admin key), "
                                            "and new secrets (docs/webhooks.md)")
    hook_commands = hooks.add_subparsers(required=True, metavar="WEBHOOKS_COMMAND")
    failed = hook_commands.add_parser("failed", parents=[client],
                                      help="list the events no webhook could deliver")
    failed.add_argument("--json", action="store_true", help="one dead letter a line, as JSON")
    failed.set_defaults(run=_failed_webhooks)
    replay = hook_commands.add_parser("replay", parents=[client],
                                      help="send a dead letter once more, now")
    replay.add_argument("letter", help="its id, as `webhooks failed` lists it")
    replay.set_defaults(run=_replay_webhook)
    hook_commands.add_parser("new-secret", help="print a new webhook secret (whsec_...)"
                             ).set_defaults(run=_new_webhook_secret)

    doctor = command("doctor", "check a cluster from this machine with the server's "
                               "configuration, with a probe job, and say what to change "
                               "(docs/doctor.md); exits 1 when something blocks real jobs",
                     _doctor, config)
    doctor.add_argument("cluster", help="a [clusters.NAME] of the configuration")
    doctor.add_argument("--json", action="store_true", help="one JSON document, for scripts")
    doctor.add_argument("--timeout", type=float, default=DEFAULT_DOCTOR_TIMEOUT,
                        help="seconds to wait for the probe job, queue included "
                             f"(default {DEFAULT_DOCTOR_TIMEOUT:g})")

    emit = command("emit", "post one event from inside a job (the Python twin of "
                           "scripts/metis-emit)", _emit)
    emit.add_argument("type")
    emit.add_argument("data", nargs="?", help="JSON, or text taken as a string")
    return parser


# The server


def _load_config(args: argparse.Namespace) -> Config:
    path = args.config or (Path(os.environ["METIS_CONFIG"]) if os.environ.get("METIS_CONFIG")
                           else None)
    return load_config(path)


def _serve(args: argparse.Namespace) -> int:
    config = _with_listen_options(_load_config(args), args)
    check_auth(config)  # here, before any worker starts: one refusal that says why
    if args.workers > 1:
        return _run_workers(config, args)
    return _run_server(config)


def _run_workers(config: Config, args: argparse.Namespace) -> int:
    """Several processes, each building the app from the environment; they can share jobs
    and events only through Redis.

    Each worker loads the configuration as this process did (the same file, the same
    environment), so it finds the same secret: in the file, in the operator's own
    METIS_SECRET, or kept in state_dir (which loading the config here has made). The
    secret is never put in the environment, which every process the server starts would
    inherit.
    """
    if not config.server.redis_url:
        raise ConfigError("--workers needs redis_url: server processes share jobs and events "
                          "only through Redis")
    second_factor = [name for name, cluster in config.clusters.items()
                     if cluster.second_factor]
    if second_factor:
        raise ConfigError(
            f"cluster {second_factor[0]} has second_factor = true: its connection lives in "
            "the one server process that an operator logged in, and a login reaches one "
            "process only. Serve it with --workers 1, or link the cluster with the agent "
            "instead (docs/login.md)")
    if args.config:
        os.environ["METIS_CONFIG"] = str(args.config.resolve())
    os.environ.update(METIS_HOST=config.server.host, METIS_PORT=str(config.server.port))
    uvicorn.run("metis_stream.web.app:from_environment", factory=True,
                host=config.server.host, port=config.server.port, workers=args.workers,
                **_uvicorn_options(config))
    return 0


def _demo(args: argparse.Namespace) -> int:
    config = _with_listen_options(load_config(None), args)
    # A key of its own, new each run unless METIS_DEMO_TOKEN fixes it (for scripts), as
    # notebook servers do: every user of this machine can reach loopback, and the demo
    # runs jobs as you. The viewer takes it from the URL's fragment, which no request
    # carries, so it reaches no log.
    key = os.environ.get("METIS_DEMO_TOKEN") or tokens.new_secret()
    server = replace(config.server, api_keys=(tokens.hash_api_key(key),),
                     insecure_no_auth=False)
    # The demo's jobs are its own (its clusters are local): they stop with it, where a
    # server's jobs would run on.
    config = replace(config, server=server,
                     clusters={name: replace(cluster, stop_jobs_on_exit=True)
                               for name, cluster in config.clusters.items()})
    url = f"http://{server.host}:{server.port}/#key={quote(key, safe='')}"
    print(f"metis-stream demo: open {url}\n"
          "  and submit the 'tokens' template (Ctrl-C stops the demo and its jobs).\n"
          "  curl and the CLI need its API key: "
          f"export METIS_API_KEY={shlex.quote(key)}", flush=True)
    if not args.no_browser:
        webbrowser.open(url)
    return _run_server(config)


def _with_listen_options(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.host:
        server = replace(server, host=args.host)
    if args.port is not None:
        server = replace(server, port=args.port)
    return replace(config, server=server)


def _run_server(config: Config) -> int:
    uvicorn.run(create_app(config), host=config.server.host, port=config.server.port,
                **_uvicorn_options(config))
    return 0


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, and the server's own messages (a cluster's change of health, a
    spool's damage) at INFO through the same handler: without it only warnings would
    reach the log."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["loggers"]["metis_stream"] = {"handlers": ["default"], "level": "INFO",
                                         "propagate": False}
    return config


def _uvicorn_options(config: Config) -> dict[str, Any]:
    server = config.server
    return {
        "log_level": "info",
        "log_config": _log_config(),
        "access_log": server.access_log,
        # uvicorn would take X-Forwarded-For from any loopback caller by default.
        "proxy_headers": bool(server.forwarded_allow_ips),
        "forwarded_allow_ips": list(server.forwarded_allow_ips) or None,
        # uvicorn calls its protocol class with keywords only: a partial passes ours.
        "http": functools.partial(BoundedHttpToolsProtocol,
                                  header_timeout=server.header_timeout),
        "limit_concurrency": server.max_connections,
        # Pings find dead peers; a client that stops reading is dropped when a send to it
        # passes send_timeout (web/deadline.py, SECURITY.md).
        "ws_ping_interval": 20, "ws_ping_timeout": 20,
        # Events are small JSON: compression cost ~17 us per delivered event and ~29 KiB
        # per idle socket in bench/ and saved little.
        "ws_per_message_deflate": False,
        # Open SSE responses would hold a shutdown until their jobs end; clients resume.
        "timeout_graceful_shutdown": 5,
    }


# Clients


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, key=args.key)


def _submit(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            templates = {t["name"]: t for t in await client.templates()}
            if args.template not in templates:
                raise ClientError(422, f"no template named {args.template!r}; there are: "
                                       f"{', '.join(templates) or 'none'}")
            params = _parse_params(templates[args.template], args.param)
            links = [given for given in args.input if given.startswith(("http://", "https://"))]
            uploads = [Path(given) for given in args.input if given not in links]
            for path in uploads:
                if not path.is_file():
                    raise ClientError(400, f"--input {path}: no such file (a download link "
                                           "starts with http:// or https://)")
            job = await client.submit(args.template, params, links, user=args.user,
                                      files=uploads)
            if not args.follow:
                print(job["id"])
                return 0
            print(f"job {job['id']}", file=sys.stderr)
            return await _follow(client, job["id"], 0, as_json=args.json)

    return _run(run())


def _parse_params(template: dict[str, Any], pairs: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` pairs, typed by the template so ``-p delay=0.1`` is a number."""
    types = {param["name"]: param["type"] for param in template["params"]}
    params: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise ClientError(400, f"parameter {pair!r}: write NAME=VALUE")
        kind = types.get(name)
        try:
            params[name] = (int(text) if kind == "int" else float(text) if kind == "float"
                            else _parse_bool(text) if kind == "bool" else text)
        except ValueError:
            raise ClientError(400, f"parameter {name!r}: {text!r} is not a {kind}") from None
    return params


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise ValueError(text)


def _tail(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            return await _follow(client, args.job, args.after, as_json=args.json,
                                 stream=args.stream, save=args.save)

    return _run(run())


async def _follow(client: Client, job_id: str, after: int, *, as_json: bool,
                  stream: str | None = None, save: Path | None = None) -> int:
    printer = EventPrinter(sys.stdout, as_json=as_json, stream=stream)
    saver = MediaSaver(save, sys.stderr) if save is not None else None
    final = None
    try:
        async for event in client.watch(job_id, after):
            if saver is not None and event["type"] == "chunk":
                saver.add(parse_chunk(event["data"]))
            else:
                printer.show(event)
            final = event
    finally:
        if saver is not None:
            saver.close()
    printer.finish()
    if final is not None and final["type"] == "completed":
        return 0
    if stream is not None and final is not None:
        # Only the stream's lines went to stdout; how the job ended still needs saying.
        print(shown(describe_end(final)), file=sys.stderr)
    return EXIT_FAILED


def _jobs(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            for job in await client.jobs(args.state, user=args.user):
                if args.json:
                    print(json_line(job))
                else:
                    created = time.strftime("%Y-%m-%d %H:%M:%S",
                                            time.localtime(job["created"]))
                    user = f"  {job['user']}" if job.get("user") else ""
                    print(shown(f"{job['id']}  {job['state']:<10} {job['template']:<12} "
                                 f"{created}{user}"))
        return 0

    return _run(run())


def _files(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            listing = await client.files(args.job)
        for entry in listing["files"]:
            if args.json:
                print(json_line(entry))
                continue
            modified = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["modified"]))
            mark = "*" if entry["output"] else " "
            print(shown(f"{byte_size(entry['size']):>9}  {modified} {mark} {entry['path']}"))
        if listing["truncated"]:
            print("(more files than a listing shows)", file=sys.stderr)
        return 0

    return _run(run())


def _get(args: argparse.Namespace) -> int:
    output: Path = args.output or Path(args.path.rstrip("/").rsplit("/", 1)[-1])

    async def run() -> int:
        async with _client(args) as client:
            if str(output) == "-":
                await client.download(args.job, args.path, sys.stdout.buffer)
                return 0
            partial = output.with_name(f".{output.name}.part")
            bar = ProgressBar(sys.stderr, output.name) if sys.stderr.isatty() else None
            try:
                with partial.open("wb") as file:
                    await client.download(args.job, args.path, file,
                                          progress=bar.show if bar else None)
                partial.replace(output)
            finally:
                partial.unlink(missing_ok=True)
                if bar is not None:
                    bar.finish()
        return 0

    return _run(run())


def _cancel(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            job = await client.cancel(args.job)
            print(f"{job['id']} {job['state']}")
        return 0

    return _run(run())


def _login(args: argparse.Namespace) -> int:
    code = args.code if args.code is not None else _read_code(args.cluster)

    async def run() -> int:
        async with _client(args) as client:
            answer = await client.login(args.cluster, code)
        if answer["connection"] == "opened":
            print(f"logged in to {args.cluster}: the server keeps the connection open until "
                  "it drops (then log in again)")
        else:
            print(f"{args.cluster}: the server's connection is open already (the code was "
                  "not used)")
        return 0

    return _run(run())


def _read_code(cluster: str) -> str:
    """The code from the terminal without echo, or the first line of stdin (a script)."""
    if sys.stdin.isatty():
        return getpass.getpass(f"one-time code for {cluster}: ").strip()
    return sys.stdin.readline().strip()


def _failed_webhooks(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            for letter in await client.failed_webhooks():
                if args.json:
                    print(json_line(letter))
                else:
                    failed = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(letter["failed"]))
                    print(shown(f"{letter['id']}  {letter['type']:<10} {failed}  "
                                f"{letter['attempts']} attempts: {letter['error']}"))
        return 0

    return _run(run())


def _replay_webhook(args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            letter = await client.replay_webhook(args.letter)
            print(f"{letter['id']} delivered")
        return 0

    return _run(run())


def _new_webhook_secret(args: argparse.Namespace) -> int:
    print(webhooks.new_secret())
    return 0


def _doctor(args: argparse.Namespace) -> int:
    config = _load_config(args)
    if args.cluster not in config.clusters:
        raise ConfigError(f"no cluster named {args.cluster!r} in the configuration; it has: "
                          f"{', '.join(config.clusters) or 'none'}")
    status = StatusLine(sys.stderr)
    diagnosis = asyncio.run(diagnose(config, args.cluster, timeout=args.timeout,
                                     progress=status.show))
    if args.json:
        print(json_line(render_json(diagnosis)))
    else:
        sys.stdout.write(render_text(diagnosis, utf8=writes_utf8(sys.stdout)))
    return diagnosis.exit_status


def _token(args: argparse.Namespace) -> int:
    print(tokens.job_token(_load_config(args).server.secret, args.job))
    return 0


def _new_key(args: argparse.Namespace) -> int:
    key = tokens.new_secret()
    print(key)
    print(tokens.hash_api_key(key))
    return 0


def _emit(args: argparse.Namespace) -> int:
    url = os.environ.get("METIS_EVENTS_URL")
    token_file = os.environ.get("METIS_TOKEN_FILE")
    if not url or not token_file:
        raise ConfigError("emit runs inside a job: METIS_EVENTS_URL and METIS_TOKEN_FILE "
                          "must be set")
    token = Path(token_file).read_text().strip()
    result = post_event(url, token, args.type, _json_or_text(args.data))
    print(" ".join(str(seq) for seq in result["seqs"]))
    return 0


def _json_or_text(text: str | None) -> Any:
    """Event data from the command line: JSON when it parses, else the text as a string."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _run(coroutine: Any) -> int:
    try:
        code: int = asyncio.run(coroutine)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ClientError as exc:
        if exc.status == 0:
            # The client names the URL; only here is it known where the URL came from.
            raise ClientError(0, f"{exc.message}; is the server running, and is --url "
                                 "(or METIS_URL) right?") from None
        raise
    return code


if __name__ == "__main__":
    sys.exit(main())
