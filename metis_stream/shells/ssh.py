"""The ``ssh`` shell: scheduler commands and files on a cluster's login node, with paramiko.

One SSH connection per shell is opened on first use and kept alive; every command gets
its own channel on it, so a command costs one round trip instead of a new handshake.
paramiko is blocking: each call into it runs in a worker thread, never on the event loop.

A login node may ask for a second factor after the key (keyboard-interactive, a one-time
code): then only :meth:`SSHShell.login`, with a code that an operator typed, opens the
connection, and every command meanwhile fails with LoginNeeded (docs/login.md).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import posixpath
import secrets
import shlex
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Iterator, Sequence
from pathlib import Path
from select import select
from typing import NoReturn, TypeVar

import anyio
import anyio.to_thread
import paramiko
from paramiko.auth_strategy import AuthSource, AuthStrategy, InMemoryPrivateKey, SourceResult
from paramiko.common import cMSG_CHANNEL_REQUEST

from metis_stream.backoff import Backoff
from metis_stream.errors import (
    CommandTimeout,
    ConnectionLost,
    HostKeyRefused,
    LoginNeeded,
    LoginRefused,
    MetisError,
    OutsideFolder,
    ShellError,
)
from metis_stream.shells.base import (
    CHUNK_BYTES,
    CommandResult,
    FileInfo,
    check_argv,
    file_kind,
    inside,
)

T = TypeVar("T")

# Failures that mean the connection (not the command) broke.
_CONNECTION_ERRORS = (paramiko.SSHException, EOFError, ConnectionError, socket.timeout)
# Reconnect attempts after a failed one wait about 0.5 s, 1 s, 2 s, ... (with jitter) up to this.
_MAX_BACKOFF = 30.0
_WAIT_FOR_ATTEMPT = 2.0
"""A caller that finds the next reconnect attempt due within this many seconds waits for
it instead of failing at once: a background poll that met a restarting login node a
moment ago must not make the submission that follows fail."""
_READ_SIZE = 65536
_SELECT_WAIT = 0.5
"""Seconds a command's reader waits for output before it looks again (see _collect)."""
# How long a command waits for the server to accept a new channel (see _SessionRefused).
_SESSION_WAIT = 10.0


# The two below never leave this module: they steer the retries of SSHShell.run.


class _NotSent(ShellError):
    """The connection broke before the command reached the server: safe to retry."""


class _SessionRefused(ShellError):
    """The server refused a new channel on a live connection: nothing was sent. OpenSSH
    does so beyond ``MaxSessions``, and also within it for a moment, since it frees a
    channel only after the client's close has arrived and the command's process is reaped;
    so a new channel right after another one closed can be refused."""


class _Refusals:
    """Waits between attempts to open a channel that the server refused: from 50 ms,
    doubling up to 1 s, for at most ``_SESSION_WAIT`` seconds (or the command's timeout)."""

    def __init__(self, timeout: float | None) -> None:
        self._limit = _SESSION_WAIT if timeout is None else min(timeout, _SESSION_WAIT)
        self._started: float | None = None
        self._backoff = Backoff(base=0.05, cap=1.0)

    async def pause(self, what: str, exc: Exception) -> None:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        if now - self._started >= self._limit:
            raise ShellError(f"{what}: the server still refuses a new session after "
                             f"{self._limit:.0f} s: {exc}") from exc
        await anyio.sleep(self._backoff.next_delay())


class SSHShell:
    """The Shell protocol over one kept-alive SSH connection.

    At most ``max_sessions`` commands run at once (OpenSSH allows 10 channels per
    connection by default; one more is kept for SFTP); the others wait their turn.
    Host keys are always checked against ``known_hosts`` and never added.

    A dropped connection is replaced by the next command. When opening one fails, the
    next attempt is allowed after about 0.5 s, then 1 s, 2 s, ... (at most 30 s, with
    jitter); a command in between fails at once with the last error rather than
    queueing on a dead host, unless the attempt is due within ``_WAIT_FOR_ATTEMPT``.

    Not so on a login node that asks for a second factor after the key
    (``second_factor``, or learned when it first asks): a connection is opened only by
    :meth:`login`, and a command without one fails at once with LoginNeeded, which names
    ``cluster`` in the command an operator must run.
    """

    connections_opened: int
    """How many SSH connections this shell has opened: 1 while the first one lasts."""

    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        user: str,
        known_hosts: Path,
        key_file: Path | None = None,
        passphrase: str | None = None,
        use_agent: bool = True,
        max_sessions: int = 8,
        connect_timeout: float = 10,
        keepalive: float = 30,
        cluster: str = "",
        second_factor: bool = False,
    ) -> None:
        if key_file is None and not use_agent:
            raise ValueError("SSHShell needs a key_file, the SSH agent (use_agent), or both")
        self.host = host
        self.port = port
        self.user = user
        self.known_hosts = known_hosts
        self.key_file = key_file
        self._passphrase = passphrase
        self._use_agent = use_agent
        self._connect_timeout = connect_timeout
        self._keepalive = keepalive
        self.connections_opened = 0
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._connect_lock = anyio.Lock()
        self._sftp_lock = anyio.Lock()
        self._sessions = anyio.Semaphore(max_sessions)
        self._reconnects = Backoff(base=0.5, cap=_MAX_BACKOFF)
        self._retry_at = 0.0
        self._last_error = ""
        self._closed = False
        self._cluster = cluster
        self._second_factor = second_factor
        """Whether the login node asks for a second factor after the key: then only login()
        opens a connection."""

    @property
    def _where(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    # ------------------------------------------------------------------ commands

    async def run(
        self, argv: Sequence[str], *, timeout: float | None = None, idempotent: bool = True
    ) -> CommandResult:
        """Run one command; a non-zero exit is a result, not an error.

        ``idempotent=False`` (``qsub``, ``sbatch``) means that running the command twice
        would do harm: when the connection breaks after it was sent, it is not retried
        and ConnectionLost is raised, since it may have run. A command that never reached
        the server is retried once either way.

        A command still running after ``timeout`` is killed with everything it started.
        Cancelling the caller waits for the command to end (its thread cannot be
        interrupted): pass a ``timeout`` for anything that may hang.
        """
        command = command_line(argv)
        async with self._sessions:
            attempt = 1
            refusals = _Refusals(timeout)
            while True:
                client = await self._connected()
                try:
                    return await anyio.to_thread.run_sync(_execute, client, command, timeout)
                except CommandTimeout as exc:
                    raise CommandTimeout(f"{argv[0]} on {self._where}: {exc}") from None
                except _SessionRefused as exc:
                    # Nothing was sent: wait for the server to free a channel.
                    await refusals.pause(f"{argv[0]} on {self._where}", exc)
                except _NotSent as exc:
                    await self._drop(client)
                    if attempt == 2:
                        raise ShellError(f"{self._where}: {exc}") from exc
                    attempt += 1
                except ConnectionLost as exc:
                    await self._drop(client)
                    if not idempotent or attempt == 2:
                        raise ConnectionLost(f"{argv[0]} on {self._where}: {exc}") from exc
                    attempt += 1

    # ------------------------------------------------------------------ files

    async def write_file(self, path: str, data: bytes, *, mode: int = 0o600) -> None:
        await self._with_sftp(lambda sftp: _write_file(sftp, path, data, mode))

    async def read_file(self, path: str, *, max_bytes: int, tail: bool = False) -> bytes | None:
        return await self._with_sftp(lambda sftp: _read_file(sftp, path, max_bytes, tail))

    async def remove_file(self, path: str) -> None:
        await self._with_sftp(lambda sftp: _remove_file(sftp, path))

    async def realpath(self, path: str) -> str:
        return await self._with_sftp(lambda sftp: sftp.normalize(path))

    async def list_folder(self, path: str) -> list[FileInfo] | None:
        return await self._with_sftp(lambda sftp: _list_folder(sftp, path))

    async def resolve(self, path: str, *, within: str) -> FileInfo | None:
        return await self._with_sftp(lambda sftp: _resolve(sftp, path, within))

    async def read_chunks(self, path: str, *, offset: int = 0,
                          length: int | None = None) -> AsyncGenerator[bytes, None]:
        """Each piece is one turn on the SFTP channel: concurrent downloads take turns
        piece by piece instead of one waiting for another's whole file."""
        reader = _Reader(path)
        try:
            remaining = length
            while remaining is None or remaining > 0:
                size = CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining)
                chunk = await self._with_sftp(
                    functools.partial(reader.read, offset=offset, size=size))
                if not chunk:
                    return
                offset += len(chunk)
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk
        finally:
            with anyio.CancelScope(shield=True):
                await self._release(reader.close)

    async def write_chunks(self, path: str, chunks: AsyncIterable[bytes], *,
                           mode: int = 0o600) -> int:
        writer = _Writer(path, mode)
        try:
            await self._with_sftp(writer.open)
            async for chunk in chunks:
                await self._with_sftp(functools.partial(writer.write, chunk=chunk))
            await self._with_sftp(writer.finish)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._release(writer.discard)
            raise
        return writer.written

    async def _release(self, operation: Callable[[paramiko.SFTPClient], None]) -> None:
        """Clean up after a file operation, as far as the connection allows: a broken
        one has released the remote handle already."""
        with contextlib.suppress(ShellError):
            await self._with_sftp(operation)

    async def _with_sftp(self, operation: Callable[[paramiko.SFTPClient], T]) -> T:
        """Run ``operation`` on the connection's one SFTP channel. File operations are
        idempotent, so one that met a broken connection is tried once more."""
        async with self._sftp_lock:
            refusals = _Refusals(None)
            attempt = 1
            while True:
                client = await self._connected()
                try:
                    if self._sftp is None:
                        self._sftp = await anyio.to_thread.run_sync(client.open_sftp)
                    return await anyio.to_thread.run_sync(operation, self._sftp)
                except (paramiko.ChannelException, *_CONNECTION_ERRORS) as exc:
                    if (isinstance(exc, paramiko.ChannelException) and _active(client)
                            and self._sftp is None):
                        # The SFTP channel was refused on a live connection: wait for a
                        # free one (see _SessionRefused).
                        await refusals.pause(f"SFTP on {self._where}", exc)
                        continue
                    # The SFTP channel is gone either way; the connection may be too.
                    self._sftp = None
                    if not _active(client):
                        await self._drop(client)
                    if attempt == 2:
                        raise ShellError(f"SFTP on {self._where} failed: {exc}") from exc
                    attempt += 1
                except OSError as exc:
                    raise ShellError(f"SFTP on {self._where}: {exc}") from exc

    # ------------------------------------------------------------------ connection

    async def _connected(self) -> paramiko.SSHClient:
        """The live connection, opened now if there is none (or it dropped)."""
        client = self._client
        if client is not None and _active(client):
            return client
        async with self._connect_lock:
            if self._closed:
                raise ShellError(f"the SSH shell for {self._where} is closed")
            if self._client is not None:
                if _active(self._client):
                    return self._client  # another task reconnected while we waited
                await self._drop(self._client)
            if self._second_factor:
                # Without a code the attempt could only fail, and each one is a failed
                # login in the node's logs (where fail2ban may count it).
                raise self._login_needed()
            # Fail fast during a long backoff instead of queueing callers behind a dead
            # host: the scheduler's poller and the web requests will come back.
            wait = self._retry_at - time.monotonic()
            if self._reconnects.attempt and 0 < wait <= _WAIT_FOR_ATTEMPT:
                await anyio.sleep(wait)
            elif self._reconnects.attempt and wait > 0:
                raise ShellError(
                    f"cannot connect to {self._where} (retrying in "
                    f"{self._retry_at - time.monotonic():.1f} s): {self._last_error}"
                )
            try:
                # Without a code, a node that asks for one raises LoginNeeded.
                opened, _ = await anyio.to_thread.run_sync(self._connect)
            except LoginNeeded:
                self._second_factor = True
                raise
            except ShellError as exc:
                self._last_error = str(exc)
                self._retry_at = time.monotonic() + self._reconnects.next_delay()
                raise
            self._reconnects.reset()
            self._client = opened
            self.connections_opened += 1
            return opened

    async def login(self, code: str) -> bool:
        """Open the connection with the key and then ``code``, the answer to the login
        node's keyboard-interactive prompts (a one-time code that an operator typed); the
        connection is kept alive until it drops, and then the next one needs a new login.
        False when a connection is open already (``code`` is not used). LoginRefused when
        the node refuses the code. The code is used once and kept nowhere."""
        async with self._connect_lock:
            if self._closed:
                raise ShellError(f"the SSH shell for {self._where} is closed")
            if self._client is not None:
                if _active(self._client):
                    return False
                await self._drop(self._client)
            client, asked = await anyio.to_thread.run_sync(self._connect, code)
            self._second_factor = self._second_factor or asked
            # A login is a person's explicit attempt: a backoff left by failures before it
            # must not hold the commands that follow.
            self._reconnects.reset()
            self._retry_at = 0.0
            self._client = client
            self.connections_opened += 1
            return True

    def needs_login(self) -> LoginNeeded | None:
        """The error a command meets now for want of a login: None while a connection is
        open, or while the login node has not asked for a second factor."""
        if not self._second_factor or (self._client is not None and _active(self._client)):
            return None
        return self._login_needed()

    def _login_needed(self) -> LoginNeeded:
        cluster = self._cluster or "CLUSTER"
        return LoginNeeded(
            f"{self._where} asks for a second factor after the key (keyboard-interactive), "
            f"and no connection is open: an operator must log in with `metis-stream login "
            f"{cluster}` and type the code (docs/login.md)")

    def _connect(self, code: str | None = None) -> tuple[paramiko.SSHClient, bool]:
        """Open and authenticate a connection (blocking: runs in a worker thread); and
        whether the login node asked for a second factor."""
        client = paramiko.SSHClient()
        try:
            # Only this file: never the user's own ~/.ssh/known_hosts behind the config's back.
            client.load_host_keys(str(self.known_hosts))
        except OSError as exc:
            raise ShellError(
                f"cannot read the known_hosts file {self.known_hosts} ({exc.strerror}); host "
                f"keys of {self.host} are always verified: create it with the host's key"
            ) from None
        client.set_missing_host_key_policy(_RefuseUnknownHost())
        try:
            sock = socket.create_connection((self.host, self.port), self._connect_timeout)
        except OSError as exc:
            raise ShellError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        # Without it every round trip stalls ~40 ms (Nagle against delayed ACKs).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        agent: paramiko.Agent | None = None
        try:
            agent = paramiko.Agent() if self._use_agent else None
            keys = [*self._key_files(), *(agent.get_keys() if agent is not None else ())]
            strategy = _KeyThenCode(self.user, keys, code)
            client.connect(
                self.host,
                self.port,
                username=self.user,
                sock=sock,
                timeout=self._connect_timeout,
                banner_timeout=self._connect_timeout,
                auth_timeout=self._connect_timeout,
                auth_strategy=strategy,
            )
        except BaseException as exc:
            client.close()
            sock.close()
            if isinstance(exc, MetisError):
                raise
            raise self._connect_error(exc) from exc
        finally:
            if agent is not None:
                agent.close()  # its keys sign only while logging in
        transport = client.get_transport()
        assert transport is not None  # connect() succeeded
        # Keepalives notice a dead peer and keep NAT and firewall state from expiring; on a
        # login node that asks for a second factor they also keep the one login alive.
        transport.set_keepalive(max(1, round(self._keepalive)))
        return client, strategy.asked_for_code

    def _key_files(self) -> list[paramiko.PKey]:
        """The key file's key, as SSHClient would load it (``PKey.from_path`` takes no
        str passphrase)."""
        if self.key_file is None:
            return []
        failure: Exception | None = None
        for key_class in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
            try:
                return [key_class.from_private_key_file(str(self.key_file), self._passphrase)]
            except paramiko.SSHException as exc:
                failure = exc
            except OSError as exc:
                raise ShellError(f"cannot read the key file {self.key_file}: "
                                 f"{exc.strerror}") from None
        raise ShellError(f"cannot use the key file {self.key_file} (not an Ed25519, ECDSA or "
                         f"RSA private key, or a wrong key_passphrase): {failure}")

    def _connect_error(self, exc: BaseException) -> BaseException:
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        if isinstance(exc, _UnknownHostKey):
            return HostKeyRefused(
                f"host key of {name} ({exc.key_type} {exc.fingerprint}) is not in "
                f"{self.known_hosts}: refusing to connect. Check the fingerprint with the "
                f"cluster's admins, then add the key, for example with "
                f"`ssh-keyscan -p {self.port} {self.host} >> {self.known_hosts}`"
            )
        if isinstance(exc, paramiko.BadHostKeyException):
            return HostKeyRefused(
                f"host key of {name} has CHANGED: it offered {exc.key.get_name()} "
                f"{exc.key.fingerprint}, but {self.known_hosts} expects "
                f"{exc.expected_key.fingerprint}. Refusing to connect: someone may be "
                f"intercepting the connection. If the change is expected, remove the old key "
                f"with `ssh-keygen -R '{name}' -f {self.known_hosts}` and add the new one"
            )
        if isinstance(exc, _CodeNeeded):
            return self._login_needed()
        if isinstance(exc, _CodeRefused):
            return LoginRefused(
                f"{name} refused the code (keyboard-interactive): {exc}. Nothing changed. A "
                f"code is taken once and only within its time step (about 30 s): wait for "
                f"the next one and log in again")
        if isinstance(exc, paramiko.AuthenticationException):
            how = f"key {self.key_file}" if self.key_file else "the SSH agent"
            return ShellError(f"authentication as {self.user} on {name} with {how} failed: {exc}")
        if isinstance(exc, (*_CONNECTION_ERRORS, OSError)):
            return ShellError(f"cannot connect to {name}: {exc or type(exc).__name__}")
        return exc

    async def _drop(self, client: paramiko.SSHClient) -> None:
        """Forget a broken connection; the next command opens a new one."""
        if self._client is client:
            self._client = None
            self._sftp = None
        await anyio.to_thread.run_sync(client.close)

    async def close(self) -> None:
        async with self._connect_lock:
            self._closed = True
            if self._client is not None:
                await self._drop(self._client)


class _CodeNeeded(paramiko.AuthenticationException):
    """The key was accepted, and the login node asks for a code, which there is none of."""


class _CodeRefused(paramiko.AuthenticationException):
    """The login node refused the code."""


class _KeyThenCode(AuthStrategy):
    """How SSHShell logs in, as a paramiko AuthStrategy: each key in turn (the key file's,
    then the agent's), and when the login node accepts one but asks for keyboard-interactive
    after it (a second factor), ``code`` as the answer to every prompt of its first
    question; _CodeNeeded without a code. SSHClient's own way would ask for the code on
    the server's stdin."""

    def __init__(self, user: str, keys: Sequence[paramiko.PKey], code: str | None) -> None:
        super().__init__(ssh_config=paramiko.SSHConfig())
        self._user = user
        self._keys = keys
        self._code = code
        self.asked_for_code = False

    def get_sources(self) -> Iterator[AuthSource]:
        for key in self._keys:
            yield InMemoryPrivateKey(self._user, key)

    def authenticate(self, transport: paramiko.Transport) -> list[SourceResult]:
        failure: paramiko.AuthenticationException | None = None
        for source in self.get_sources():
            try:
                remaining = source.authenticate(transport)
            except paramiko.AuthenticationException as exc:
                failure = exc  # the next key, then
                continue
            if remaining:
                self._second_factor(transport, remaining)
            return [SourceResult(source, [])]
        raise failure or paramiko.AuthenticationException("no key to offer (no key_file, and "
                                                          "the SSH agent has none)")

    def _second_factor(self, transport: paramiko.Transport, methods: list[str]) -> None:
        if "keyboard-interactive" not in methods:
            raise paramiko.AuthenticationException(
                f"the key was accepted, but the login node also asks for {', '.join(methods)}; "
                "only keyboard-interactive (a one-time code) can follow the key")
        self.asked_for_code = True
        if self._code is None:
            raise _CodeNeeded("the login node asks for a second factor")
        code = self._code
        asked = False

        def answer(title: str, instructions: str, prompts: list[tuple[str, bool]]
                   ) -> list[str]:
            # The first question takes the code (OpenSSH's PAM then sends one without
            # prompts); a second question is answered blank, and so refused: there is
            # one code.
            nonlocal asked
            if not prompts:
                return []
            answers = ["" if asked else code] * len(prompts)
            asked = True
            return answers

        try:
            remaining = transport.auth_interactive(self._user, answer)
        except paramiko.AuthenticationException as exc:
            raise _CodeRefused(str(exc) or "authentication failed") from None
        if remaining:
            raise paramiko.AuthenticationException(
                f"after the code, the login node still asks for {', '.join(remaining)}")


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey) -> None:
        super().__init__("host key not in known_hosts")
        self.key_type = key.get_name()
        self.fingerprint = key.fingerprint


class _RefuseUnknownHost(paramiko.RejectPolicy):
    """RejectPolicy, with the offered key kept for the error message."""

    def missing_host_key(
        self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey
    ) -> NoReturn:
        raise _UnknownHostKey(key)


def command_line(argv: Sequence[str]) -> str:
    """``argv`` as one command line for the remote shell, every element quoted."""
    check_argv(argv)
    return shlex.join(argv)


def _active(client: paramiko.SSHClient) -> bool:
    transport = client.get_transport()
    return transport is not None and transport.is_active()


def _execute(client: paramiko.SSHClient, command: str, timeout: float | None) -> CommandResult:
    """Run ``command`` on a new channel and collect its output (blocking)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    transport = client.get_transport()
    try:
        if transport is None:
            raise EOFError("no transport")
        channel = transport.open_session(timeout=timeout)
    except _CONNECTION_ERRORS as exc:
        if transport is not None and transport.is_active():
            # The connection is fine, the server refused the channel (MaxSessions?).
            raise _SessionRefused(f"the server refused a new session: {exc}") from exc
        raise _NotSent(f"connection lost: {exc or type(exc).__name__}") from exc
    with channel:
        try:
            channel.exec_command(command)
            # No input: a command that reads stdin sees EOF instead of hanging.
            channel.shutdown_write()
            stdout, stderr = _collect(channel, deadline)
        except CommandTimeout:
            _kill(channel)
            raise
        except _CONNECTION_ERRORS as exc:
            raise ConnectionLost(f"connection lost: {exc or type(exc).__name__}") from exc
        if channel.exit_status == -1 and not transport.is_active():
            raise ConnectionLost("connection lost before the command's exit status arrived")
        # -1 on a live connection: killed by a signal (paramiko ignores "exit-signal").
        return CommandResult.from_output(channel.exit_status, stdout, stderr)


def _kill(channel: paramiko.Channel) -> None:
    """Have sshd kill the channel's command with everything it started. Closing the
    channel would not: sshd lets a command without a terminal run on. OpenSSH (7.9 and
    later) answers RFC 4254's "signal" request with a kill of the command's process group;
    paramiko has no method for it (paramiko/paramiko#203), so the request is built here."""
    message = paramiko.Message()
    message.add_byte(cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("signal")
    message.add_boolean(False)  # no reply wanted
    message.add_string("KILL")
    with contextlib.suppress(*_CONNECTION_ERRORS):
        # A broken connection leaves no one to ask; the timeout is reported all the same.
        channel.get_transport()._send_user_message(message)  # type: ignore[attr-defined]


def _collect(channel: paramiko.Channel, deadline: float | None) -> tuple[bytes, bytes]:
    """Read stdout and stderr until both end. Both are read as they come: an unread
    stream would fill the channel's window and stall the other."""
    stdout, stderr = bytearray(), bytearray()
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise CommandTimeout("still running after its timeout (killed); its outcome is unknown")
        # The channel's file descriptor is readable when either stream has data or ends;
        # the wait is bounded all the same, so that a wake-up lost in paramiko's emulated
        # descriptor (a stall seen once under load) costs a moment, not the timeout.
        select([channel], [], [], _SELECT_WAIT if remaining is None
               else min(remaining, _SELECT_WAIT))
        while channel.recv_ready():
            stdout += channel.recv(_READ_SIZE)
        while channel.recv_stderr_ready():
            stderr += channel.recv_stderr(_READ_SIZE)
        ended = channel.eof_received or channel.closed
        if ended and not (channel.recv_ready() or channel.recv_stderr_ready()):
            break
    # The exit status follows the output; it is set (or -1) once the channel closes.
    if not channel.status_event.wait(
        None if deadline is None else max(0.0, deadline - time.monotonic())
    ):
        raise CommandTimeout("output ended but no exit status arrived before the timeout")
    return bytes(stdout), bytes(stderr)


def _write_file(sftp: paramiko.SFTPClient, path: str, data: bytes, mode: int) -> None:
    """Write under a temporary name, then rename: a reader never sees half a file."""
    parent, name = posixpath.split(path)
    if parent:
        _makedirs(sftp, parent)
    temporary = posixpath.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
    try:
        with sftp.open(temporary, "wb") as file:
            # Narrow the mode while the file is still empty: the secret never sits in a
            # file that others can read.
            sftp.chmod(temporary, mode)
            file.set_pipelined(True)
            file.write(data)
        sftp.posix_rename(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError, *_CONNECTION_ERRORS):
            _remove_file(sftp, temporary)
        raise


def _makedirs(sftp: paramiko.SFTPClient, folder: str) -> None:
    """Create ``folder`` and its missing parents, private to the user (they hold tokens)."""
    try:
        sftp.stat(folder)
    except FileNotFoundError:
        parent = posixpath.dirname(folder.rstrip("/"))
        if parent and parent != folder:
            _makedirs(sftp, parent)
        sftp.mkdir(folder, mode=0o700)


def _read_file(sftp: paramiko.SFTPClient, path: str, max_bytes: int, tail: bool) -> bytes | None:
    """The first (or last) ``max_bytes`` of a file; None when it does not exist."""
    try:
        with sftp.open(path, "rb") as file:
            if tail:
                file.seek(max(0, (file.stat().st_size or 0) - max_bytes))
            data: bytes = file.read(max_bytes)
            return data
    except FileNotFoundError:
        return None


def _list_folder(sftp: paramiko.SFTPClient, path: str) -> list[FileInfo] | None:
    try:
        entries = sftp.listdir_attr(path)  # the server gives lstat's view
    except FileNotFoundError:
        return None
    return [_info(entry.filename, entry) for entry in entries]


def _resolve(sftp: paramiko.SFTPClient, path: str, within: str) -> FileInfo | None:
    """Resolved by the SFTP server (its realpath), so that links are read where they are."""
    try:
        root = sftp.normalize(within)
        resolved = sftp.normalize(path)
    except FileNotFoundError:
        return None
    if not inside(resolved, root):
        raise OutsideFolder("the path leads outside the folder it must stay in")
    try:
        return _info(resolved, sftp.stat(resolved))
    except FileNotFoundError:
        return None


def _info(name: str, attributes: paramiko.SFTPAttributes) -> FileInfo:
    return FileInfo(name, file_kind(attributes.st_mode or 0), attributes.st_size or 0,
                    float(attributes.st_mtime or 0))


class _Reader:
    """One file being read piece by piece; opened again on the SFTP channel that
    replaced a broken one."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._sftp: paramiko.SFTPClient | None = None
        self._file: paramiko.SFTPFile | None = None
        self._size = 0

    def read(self, sftp: paramiko.SFTPClient, offset: int, size: int) -> bytes:
        if self._file is None or self._sftp is not sftp:
            try:
                self._file = sftp.open(self.path, "rb")
            except FileNotFoundError:
                raise ShellError(f"no such file: {self.path}") from None
            self._sftp = sftp
            self._size = self._file.stat().st_size or 0
        # Never past the end as it was at opening: the server answers a read there with
        # EOF, which paramiko raises as EOFError, the mark of a broken connection.
        size = min(size, self._size - offset)
        if size <= 0:
            return b""
        # readv sends the piece's 32 KiB requests at once instead of one by one.
        try:
            return b"".join(self._file.readv([(offset, size)]))
        except EOFError:
            if sftp.sock.closed:
                raise
            return b""  # the file shrank

    def close(self, sftp: paramiko.SFTPClient) -> None:
        if self._file is not None and self._sftp is sftp:
            self._file.close()
        self._file = None


class _Writer:
    """One file written piece by piece under a temporary name (as _write_file). A broken
    connection ends it: the pieces already sent cannot be sent again."""

    def __init__(self, path: str, mode: int) -> None:
        self.path = path
        self.mode = mode
        parent, name = posixpath.split(path)
        self.temporary = posixpath.join(parent, f".{name}.{secrets.token_hex(6)}.tmp")
        self.written = 0
        self._sftp: paramiko.SFTPClient | None = None
        self._file: paramiko.SFTPFile | None = None

    def open(self, sftp: paramiko.SFTPClient) -> None:
        parent = posixpath.dirname(self.path)
        if parent:
            _makedirs(sftp, parent)
        self._file = sftp.open(self.temporary, "wb")
        sftp.chmod(self.temporary, self.mode)
        self._file.set_pipelined(True)
        self._sftp = sftp

    def write(self, sftp: paramiko.SFTPClient, chunk: bytes) -> None:
        self._check(sftp).write(chunk)
        self.written += len(chunk)

    def finish(self, sftp: paramiko.SFTPClient) -> None:
        self._check(sftp).close()  # waits for every pipelined write's answer
        self._file = None
        size = sftp.stat(self.temporary).st_size
        if size != self.written:
            raise ShellError(f"{self.path}: {size} bytes arrived of {self.written} sent")
        sftp.posix_rename(self.temporary, self.path)

    def discard(self, sftp: paramiko.SFTPClient) -> None:
        if self._file is not None and self._sftp is sftp:
            self._file.close()
        self._file = None
        _remove_file(sftp, self.temporary)

    def _check(self, sftp: paramiko.SFTPClient) -> paramiko.SFTPFile:
        if self._file is None or self._sftp is not sftp:
            raise ShellError(f"the connection broke while {self.path} was being written")
        return self._file


def _remove_file(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            raise
