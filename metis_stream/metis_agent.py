#!/usr/bin/env python3
"""metis-agent: the cluster end of an ``agent`` link (docs/agent.md).

Started once by the cluster user on a login node (after their second-factor login), it
dials out to the metis-stream server over HTTPS, holds a long poll there, and carries out
the few typed operations a scheduler bridge needs: the scheduler's own commands, run as
an argv list without a shell, and file operations inside its work folder. Anything else
is refused, here, and logged. It reconnects with backoff and jitter, forever.

One file, the Python 3 standard library only: written for Python 3.6 and later (no newer
syntax or library call), tested on the interpreters the project's tests run.

    METIS_AGENT_KEY_FILE=~/.metis-agent-key metis-agent --server https://metis.example.org

The key is read from the file named by ``--key-file`` or ``METIS_AGENT_KEY_FILE`` (or
from ``METIS_AGENT_KEY``, which is then removed from the environment the commands get).
"""

import argparse
import base64
import contextlib
import errno
import json
import logging
import os
import random
import re
import secrets
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Dict, List, Optional, Tuple

VERSION = "1"
SCHEDULER_COMMANDS = ("qsub", "qstat", "qdel", "qselect", "sbatch", "squeue", "sacct",
                      "scontrol", "scancel", "sinfo")
"""What the server may run: the batch systems' own commands, and nothing else."""
SUBMIT_COMMANDS = ("qsub", "sbatch")
"""Commands whose last argument is a script: it must be inside the work folder."""
JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
SPOOL_FILE = "events.ndjson"
TOKEN_FILE = "token"  # noqa: S105  # a file's name
POLL_SECONDS = 25.0
"""How long the server holds a poll open; the agent waits a little longer for it."""
HTTP_TIMEOUT = 60.0
WORKERS = 16
OUTPUT_LIMIT = 16 << 20
"""A command's stdout (and its stderr) beyond this is cut: a reply must fit a request."""

log = logging.getLogger("metis-agent")


class Refused(Exception):
    """An operation the agent does not do; ``kind`` says what was refused."""

    def __init__(self, kind: str, message: str) -> None:
        Exception.__init__(self, message)
        self.kind = kind


class Failed(Exception):
    """An operation that could not be carried out (a file error): the server's ShellError."""


def inside(path: str, folder: str) -> bool:
    """Whether the absolute ``path`` is ``folder`` or under it."""
    folder = folder.rstrip("/") or "/"
    return path == folder or path.startswith(folder if folder == "/" else folder + "/")


class Workdir:
    """The one folder the agent's file operations stay in. Paths are relative to the
    user's home (as over SSH) or absolute; a path that leads outside, by ``..`` or by a
    symbolic link anywhere in it, is refused before anything is touched."""

    def __init__(self, home: str, folder: str) -> None:
        self.home = home
        self.lexical = os.path.normpath(os.path.join(home, os.path.expanduser(folder)))
        self.real = os.path.realpath(self.lexical)

    def path(self, given: str) -> str:
        """``given`` as an absolute path, once it is known to stay inside; Refused if not."""
        if not isinstance(given, str) or not given or "\0" in given:
            raise Refused("path", "a path must be a non-empty string without NUL")
        full = os.path.normpath(os.path.join(self.home, given))
        if not (inside(full, self.lexical) or inside(full, self.real)):
            raise Refused("path", f"path {given!r} is outside the agent's work folder "
                          f"{self.lexical}")
        if not inside(os.path.realpath(full), self.real):
            raise Refused("path", f"path {given!r} leads outside the agent's work folder "
                          f"{self.lexical} through a symbolic link")
        return full


def check_argv(argv: Any, allowed: Tuple[str, ...], workdir: Workdir) -> List[str]:
    """The argv the server asked for, if it may run; Refused if not. The same checks as
    the SSH path (metis_stream.shells.base.check_argv), then the allowlist."""
    if not isinstance(argv, list) or not all(isinstance(arg, str) for arg in argv):
        raise Refused("command", "a command must be a list of strings")
    if not argv:
        raise Refused("unsafe", "empty command")
    if argv[0].startswith("-"):
        raise Refused("unsafe", f"a command name cannot start with '-': {argv[0]!r}")
    for arg in argv:
        if "\0" in arg:
            raise Refused("unsafe", f"NUL character in command argument {arg!r}")
    if argv[0] not in allowed:
        raise Refused("command", "command {!r} is not one this agent runs (it runs only {})"
                      .format(argv[0], ", ".join(allowed)))
    if argv[0] in SUBMIT_COMMANDS and len(argv) > 1 and not argv[-1].startswith("-"):
        workdir.path(argv[-1])  # a job's script is one the server staged in the work folder
    return argv


def run_command(argv: List[str], timeout: Optional[float], home: str) -> Dict[str, Any]:
    """Run ``argv`` in ``home``, in a session of its own (killed as a whole at its
    timeout), with empty input; as a POSIX shell says it, 127 when it does not exist."""
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, cwd=home, start_new_session=True)
    except OSError as exc:
        status = 127 if exc.errno == errno.ENOENT else 126
        return {"exit": status, "stdout": "",
                "stderr": _b64(f"{argv[0]}: {exc.strerror}\n".encode())}
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise Refused("timeout", f"{argv[0]} ran past its timeout of {timeout} s and was "
                      "killed") from None
    return {"exit": process.returncode, "stdout": _b64(stdout[:OUTPUT_LIMIT]),
            "stderr": _b64(stderr[:OUTPUT_LIMIT])}


def _kill_group(process: "subprocess.Popen[bytes]") -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    # Something that left the group may hold the pipes: the process itself is reaped.
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.communicate(timeout=5)


def make_private_dirs(folder: str, workdir: Workdir) -> None:
    """Create ``folder`` and its missing parents, each 0700, all inside the work folder."""
    missing = []
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for path in reversed(missing):
        workdir.path(path)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if os.path.isdir(path):
                continue  # made meanwhile by another operation
            raise
        os.chmod(path, 0o700)  # the umask may have narrowed it


def write_file(path: str, data: bytes, mode: int, how: str, workdir: Workdir) -> None:
    """``replace``: the whole file, atomically (a temporary file put in place);
    ``create``: a new file (it must not exist); ``append``: at the end of one that does."""
    if how == "append":
        with open(path, "ab") as file:
            file.write(data)
        return
    make_private_dirs(os.path.dirname(path), workdir)
    target = path
    if how == "replace":
        path = os.path.join(os.path.dirname(target),
                            f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        if how == "replace":
            os.replace(path, target)
    except BaseException:
        if how == "replace":
            _remove_quietly(path)
        raise


def _remove_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def read_part(path: str, offset: int, length: int, tail: bool) -> Optional[bytes]:
    try:
        with open(path, "rb") as file:
            if tail:
                offset = max(0, os.fstat(file.fileno()).st_size - length)
            file.seek(offset)
            return file.read(length)
    except FileNotFoundError:
        return None


def info(name: str, status: os.stat_result) -> Dict[str, Any]:
    mode = status.st_mode
    kind = ("file" if stat.S_ISREG(mode) else "folder" if stat.S_ISDIR(mode)
            else "link" if stat.S_ISLNK(mode) else "other")
    return {"name": name, "kind": kind, "size": status.st_size, "modified": status.st_mtime}


def list_folder(path: str) -> Optional[List[Dict[str, Any]]]:
    try:
        names = os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    entries = []
    for name in names:
        try:
            entries.append(info(name, os.lstat(os.path.join(path, name))))
        except FileNotFoundError:
            continue
    return entries


def resolve(path: str, within: str) -> Optional[Dict[str, Any]]:
    """What ``path`` leads to, if it stays inside ``within`` (both resolved here)."""
    if not os.path.exists(path) or not os.path.exists(within):
        return None
    resolved, root = os.path.realpath(path), os.path.realpath(within)
    if not inside(resolved, root):
        raise Refused("outside", "the path leads outside the folder it must stay in")
    try:
        return info(resolved, os.stat(resolved))
    except FileNotFoundError:
        return None


def spool_frames(jobs_dir: str, words: List[str], boundary: str) -> bytes:
    """The new bytes of each job's spool, framed as metis_stream.spool.READER frames them
    (its parse_frames reads both): for each word ``ID:START:HAVE:MAX`` whose spool's size
    is not HAVE, a header ``--BOUNDARY ID SIZE START COUNT``, COUNT bytes from START (at
    most MAX) and a newline; then ``--BOUNDARY end``."""
    frames = []
    for word in words:
        parts = word.split(":")
        if (len(parts) != 4 or not _is_job_id(parts[0])
                or not all(part.isdigit() for part in parts[1:])):
            raise Refused("argument", f"not a spool read: {word[:100]!r}")
        job_id, start, have, most = parts[0], int(parts[1]), int(parts[2]), int(parts[3])
        try:
            with open(os.path.join(jobs_dir, job_id, SPOOL_FILE), "rb") as file:
                size = os.fstat(file.fileno()).st_size
                if size == have:
                    continue
                count = max(0, min(size - start, most))
                data = b""
                if count > 0:
                    file.seek(start)
                    data = file.read(count)
        except (FileNotFoundError, NotADirectoryError):
            continue
        frames.append(f"--{boundary} {job_id} {size} {start} {count}\n".encode())
        frames.append(data + b"\n")
    frames.append(f"--{boundary} end\n".encode())
    return b"".join(frames)


def sweep_spools(jobs_dir: str, minutes: int) -> None:
    """Remove the spools of ended jobs (no token file left) older than ``minutes``."""
    oldest = time.time() - minutes * 60
    try:
        job_ids = os.listdir(jobs_dir)
    except FileNotFoundError:
        return
    for job_id in job_ids:
        folder = os.path.join(jobs_dir, job_id)
        spool = os.path.join(folder, SPOOL_FILE)
        try:
            old = os.stat(spool).st_mtime < oldest
        except (FileNotFoundError, NotADirectoryError):
            continue
        if old and not os.path.lexists(os.path.join(folder, TOKEN_FILE)):
            _remove_quietly(spool)


def _is_job_id(text: str) -> bool:
    return JOB_ID.match(text) is not None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes(value: Any) -> bytes:
    if not isinstance(value, str):
        raise Refused("argument", "data must be base64 text")
    return base64.b64decode(value.encode("ascii"), validate=True)


def _number(value: Any, name: str, optional: bool = False) -> Any:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise Refused("argument", f"{name} must be a number, 0 or more")
    return value


class Operations:
    """The typed operations, by name: what the server may ask for, and all it may."""

    def __init__(self, workdir: Workdir, allowed: Tuple[str, ...]) -> None:
        self.workdir = workdir
        self.allowed = allowed
        self.table: Dict[str, Callable[[Dict[str, Any]], Dict[str, Any]]] = {
            "run": self.run, "write": self.write, "rename": self.rename,
            "remove": self.remove, "read": self.read, "realpath": self.realpath,
            "list": self.list, "resolve": self.resolve, "read_spools": self.read_spools,
            "sweep_spools": self.sweep_spools,
        }

    def do(self, name: Any, args: Any) -> Dict[str, Any]:
        operation = self.table.get(name) if isinstance(name, str) else None
        if operation is None:
            raise Refused("operation", f"operation {str(name)[:100]!r} is not one this agent does")
        if not isinstance(args, dict):
            raise Refused("argument", "an operation's arguments must be an object")
        try:
            return operation(args)
        except (KeyError, TypeError, ValueError) as exc:
            raise Refused("argument", f"bad arguments for {name}: {exc!r}") from None
        except OSError as exc:
            raise Failed(f"{name}: {exc}") from None

    def run(self, args: Dict[str, Any]) -> Dict[str, Any]:
        argv = check_argv(args["argv"], self.allowed, self.workdir)
        return run_command(argv, _number(args.get("timeout"), "timeout", True),
                           self.workdir.home)

    def write(self, args: Dict[str, Any]) -> Dict[str, Any]:
        how = args["how"]
        mode = args.get("mode", 0o600)
        if how not in ("replace", "create", "append") or not (
                isinstance(mode, int) and 0 <= mode <= 0o777):
            raise Refused("argument", "write: how must be replace, create or append, and "
                          "mode a permission (0 to 0o777)")
        write_file(self.workdir.path(args["path"]), _bytes(args["data"]), mode, how,
                   self.workdir)
        return {}

    def rename(self, args: Dict[str, Any]) -> Dict[str, Any]:
        os.replace(self.workdir.path(args["source"]), self.workdir.path(args["target"]))
        return {}

    def remove(self, args: Dict[str, Any]) -> Dict[str, Any]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.workdir.path(args["path"]))
        return {}

    def read(self, args: Dict[str, Any]) -> Dict[str, Any]:
        data = read_part(self.workdir.path(args["path"]), _number(args["offset"], "offset"),
                         min(_number(args["length"], "length"), OUTPUT_LIMIT),
                         bool(args.get("tail")))
        return {"missing": True} if data is None else {"data": _b64(data)}

    def realpath(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return {"path": os.path.realpath(self.workdir.path(args["path"]))}

    def list(self, args: Dict[str, Any]) -> Dict[str, Any]:
        return {"entries": list_folder(self.workdir.path(args["path"]))}

    def resolve(self, args: Dict[str, Any]) -> Dict[str, Any]:
        try:
            path, within = self.workdir.path(args["path"]), self.workdir.path(args["within"])
        except Refused as exc:
            raise Refused("outside", str(exc)) from None
        return {"found": resolve(path, within)}

    def read_spools(self, args: Dict[str, Any]) -> Dict[str, Any]:
        boundary = args["boundary"]
        if not (isinstance(boundary, str) and len(boundary) == 32
                and all(c in "0123456789abcdef" for c in boundary)):
            raise Refused("argument", "read_spools: the boundary must be 32 hex digits")
        words = args["reads"]
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise Refused("argument", "read_spools: reads must be a list of words")
        jobs_dir = self.workdir.path(args["jobs_dir"])
        return {"output": _b64(spool_frames(jobs_dir, words, boundary))}

    def sweep_spools(self, args: Dict[str, Any]) -> Dict[str, Any]:
        sweep_spools(self.workdir.path(args["jobs_dir"]),
                     int(_number(args["minutes"], "minutes")))
        return {}


class Link:
    """The agent's HTTP side: a long poll for operations, a request per reply."""

    def __init__(self, server: str, key: str, context: Optional[ssl.SSLContext]) -> None:
        self.server = server.rstrip("/")
        self.key = key
        self.context = context

    def post(self, path: str, body: Dict[str, Any], timeout: float) -> Dict[str, Any]:
        # The scheme was checked at start-up (server_context): https, or http where allowed.
        request = urllib.request.Request(  # noqa: S310
            self.server + path, data=json.dumps(body).encode(), method="POST",
            headers={"Authorization": "Bearer " + self.key,
                     "Content-Type": "application/json",
                     "User-Agent": "metis-agent/" + VERSION})
        with urllib.request.urlopen(  # noqa: S310
                request, timeout=timeout, context=self.context) as answer:
            raw = answer.read()
        found = json.loads(raw.decode()) if raw else {}
        if not isinstance(found, dict):
            raise ValueError("the server's answer is not a JSON object")
        return found


class Agent:
    def __init__(self, link: Link, operations: Operations) -> None:
        self.link = link
        self.operations = operations
        self.slots = threading.BoundedSemaphore(WORKERS)
        self.last_error = ""

    def serve_forever(self) -> None:
        """Poll, carry out, reply; on any failure wait (exponential, with jitter) and poll
        again, forever."""
        delay = 0.0
        connected = False
        while True:
            try:
                answer = self.link.post("/api/agent/poll", {
                    "version": VERSION, "workdir": self.operations.workdir.real,
                    "commands": list(self.operations.allowed), "last_error": self.last_error,
                }, POLL_SECONDS + 30)
            except urllib.error.HTTPError as exc:
                self._failed(f"the server refused the poll: {exc.code} {_error_text(exc)}")
                connected = False
            except (OSError, ValueError) as exc:
                self._failed(f"cannot reach the server: {exc}")
                connected = False
            else:
                if not connected:
                    log.info("connected to %s as the agent of cluster %s", self.link.server,
                             answer.get("cluster"))
                    connected = True
                self.last_error = ""
                delay = 0.0
                for operation in answer.get("operations") or []:
                    self.slots.acquire()
                    threading.Thread(target=self._carry_out, args=(operation,),
                                     daemon=True).start()
                continue
            delay = min(60.0, max(1.0, delay * 2))
            time.sleep(random.uniform(delay / 2, delay))

    def _failed(self, message: str) -> None:
        if message != self.last_error:
            log.warning("%s; retrying", message)
        self.last_error = message

    def _carry_out(self, operation: Any) -> None:
        try:
            reply = self.reply_to(operation)
            for attempt in range(5):
                try:
                    self.link.post("/api/agent/reply", reply, HTTP_TIMEOUT)
                    break
                except urllib.error.HTTPError as exc:
                    log.warning("the server refused the reply to %s: %s %s",
                                reply.get("id"), exc.code, _error_text(exc))
                    break
                except (OSError, ValueError) as exc:
                    log.warning("cannot send the reply to %s (%s); retrying",
                                reply.get("id"), exc)
                    time.sleep(min(10.0, 0.5 * 2 ** attempt))
        finally:
            self.slots.release()

    def reply_to(self, operation: Any) -> Dict[str, Any]:
        if not isinstance(operation, dict):
            operation = {}
        reply = {"id": operation.get("id"), "reply_to": operation.get("reply_to")}
        try:
            reply["result"] = self.operations.do(operation.get("op"), operation.get("args"))
        except Refused as exc:
            if exc.kind != "timeout":
                log.warning("refused %s: %s", str(operation.get("op"))[:40], exc)
            reply["error"] = {"kind": exc.kind, "message": str(exc)}
        except Failed as exc:
            reply["error"] = {"kind": "failed", "message": str(exc)}
        return reply


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        return str(json.loads(exc.read().decode()).get("error", ""))[:300]
    except (OSError, ValueError, AttributeError):
        return ""


def server_context(server: str, allow_http: List[str], cafile: Optional[str]
                   ) -> Optional[ssl.SSLContext]:
    """The TLS context for an https server; plain http only to a loopback address or a
    host the operator allowed (``--allow-http``): the key travels in every request."""
    parts = urllib.parse.urlsplit(server)
    if parts.scheme == "https":
        return ssl.create_default_context(cafile=cafile)
    host = parts.hostname or ""
    loopback = host == "localhost" or host == "::1" or host.startswith("127.")
    if parts.scheme == "http" and (loopback or host in allow_http):
        return None
    raise SystemExit("metis-agent: the server must be an https:// URL (plain http:// only to "
                     "a loopback address, or to a host given with --allow-http)")


def read_key(key_file: Optional[str]) -> str:
    key_file = key_file or os.environ.pop("METIS_AGENT_KEY_FILE", None)
    key = os.environ.pop("METIS_AGENT_KEY", "")  # never passed on to the commands
    if key_file:
        with open(os.path.expanduser(key_file)) as file:
            key = file.read()
    key = key.strip()
    if not key:
        raise SystemExit("metis-agent: no key: give --key-file FILE (or METIS_AGENT_KEY_FILE), "
                         "a file that holds the cluster's agent key")
    return key


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="metis-agent", description="Dial out to a metis-stream server and carry out "
        "its scheduler operations on this cluster (docs/agent.md).")
    parser.add_argument("--server", required=True, help="the server's URL (https://...)")
    parser.add_argument("--key-file", help="a file holding this cluster's agent key")
    parser.add_argument("--workdir", default="metis-stream",
                        help="the cluster's workdir, relative to the home folder (the "
                        "cluster's workdir in the server's configuration)")
    parser.add_argument("--allow-http", action="append", default=[], metavar="HOST",
                        help="a host that may be reached over plain http (tests)")
    parser.add_argument("--allow-command", action="append", default=[], metavar="NAME",
                        help="a command to run besides the scheduler's (tests, site tools)")
    parser.add_argument("--cafile", help="CA certificates for a server with a private CA")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s metis-agent %(levelname)s %(message)s")
    context = server_context(args.server, args.allow_http, args.cafile)
    home = os.path.expanduser("~")
    workdir = Workdir(home, args.workdir)
    extra = tuple(name for name in args.allow_command if name not in SCHEDULER_COMMANDS)
    if extra:
        log.warning("also running, with any arguments: %s", ", ".join(extra))
    agent = Agent(Link(args.server, read_key(args.key_file), context),
                  Operations(workdir, SCHEDULER_COMMANDS + extra))
    log.info("metis-agent %s (Python %s): work folder %s", VERSION,
             sys.version.split()[0], workdir.real)
    with contextlib.suppress(KeyboardInterrupt):
        agent.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
