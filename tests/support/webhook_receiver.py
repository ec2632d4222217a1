"""A webhook receiver, run as a process of its own by the tests: it records every request
it gets, one JSON line each (headers, body, the status it answered), and answers 500 to
its first ``--fail-first`` requests, or never answers any (``--hang``); with
``--exit-after N`` it goes down once it has answered N requests (a request that comes
meanwhile gets its connection closed, unanswered and unrecorded).

    python -m tests.support.webhook_receiver --port 8123 --log requests.ndjson

It verifies nothing itself: the tests verify what it recorded with ``standardwebhooks``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--fail-first", type=int, default=0)
    parser.add_argument("--hang", action="store_true", help="never answer")
    parser.add_argument("--exit-after", type=int, default=0)
    args = parser.parse_args()
    lock = threading.Lock()
    seen = 0

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            nonlocal seen
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with lock:
                if args.exit_after and seen >= args.exit_after:
                    self.close_connection = True
                    return
                seen += 1
                status = (None if args.hang else 500 if seen <= args.fail_first else 204)
                record = {"headers": dict(self.headers.items()), "body": body.decode(),
                          "status": status, "time": time.time()}
                with args.log.open("a") as log:
                    log.write(json.dumps(record) + "\n")
            if status is None:
                time.sleep(3600)
                return
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()
            if args.exit_after and seen >= args.exit_after:
                self.wfile.flush()
                threading.Timer(0.05, os._exit, (0,)).start()

        def log_message(self, format: str, *values: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
