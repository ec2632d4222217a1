"""The ``metis-stream`` command line."""

from __future__ import annotations

import argparse
import sys
import webbrowser
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import uvicorn

from metis_stream.config import Config, ConfigError, check_listen_address, load_config
from metis_stream.web.app import create_app


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except ConfigError as exc:
        print(f"metis-stream: {exc}", file=sys.stderr)
        return 2
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metis-stream", description=__doc__)
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the server")
    serve.add_argument("--config", type=Path, help="TOML configuration (or METIS_CONFIG)")
    _listen_options(serve)
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="run the server on embedded defaults and open the "
                                             "viewer: no Redis, no cluster needed")
    _listen_options(demo)
    demo.add_argument("--no-browser", action="store_true", help="do not open a browser")
    demo.set_defaults(run=_demo)
    return parser


def _listen_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address to listen on (default from the config)")
    parser.add_argument("--port", type=int, help="port to listen on (default from the config)")


def _with_listen_options(config: Config, args: argparse.Namespace) -> Config:
    server = config.server
    if args.host:
        server = replace(server, host=args.host)
    if args.port is not None:
        server = replace(server, port=args.port)
    return replace(config, server=server)


def _serve(args: argparse.Namespace) -> int:
    import os

    path = args.config or (Path(os.environ["METIS_CONFIG"]) if os.environ.get("METIS_CONFIG")
                           else None)
    return _run_server(_with_listen_options(load_config(path), args))


def _demo(args: argparse.Namespace) -> int:
    config = _with_listen_options(load_config(None), args)
    url = f"http://{config.server.host}:{config.server.port}/"
    print(f"metis-stream demo: open {url} and submit the 'tokens' template", flush=True)
    if not args.no_browser:
        webbrowser.open(url)
    return _run_server(config)


def _run_server(config: Config) -> int:
    check_listen_address(config)
    uvicorn.run(create_app(config), host=config.server.host, port=config.server.port,
                log_level="info", ws_ping_interval=20, ws_ping_timeout=20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
