"""Clients that stop reading: a request sent by hand on a socket with a tiny receive buffer,
and then never a read, so that what the server sends backs up in its own buffers."""

from __future__ import annotations

import base64
import fcntl
import os
import socket
import struct
import termios
from collections.abc import Mapping

from tests.support.server import ServerProcess

RECEIVE_BUFFER = 4096


def _request(server: ServerProcess, path: str, headers: Mapping[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {server.host}:{server.port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
    sock.connect((server.host, server.port))
    return sock


def stalled_get(server: ServerProcess, path: str,
                headers: Mapping[str, str] | None = None) -> socket.socket:
    """``GET path``, and then never a read."""
    sock = _connect(server)
    sock.sendall(_request(server, path, headers or {}))
    return sock


def frozen_websocket(server: ServerProcess, path: str,
                     headers: Mapping[str, str] | None = None) -> socket.socket:
    """A websocket handshake on ``path``, its answer read, and then never a read again."""
    sock = _connect(server)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(_request(server, path, {
        "Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13", **(headers or {})}))
    answer = b""
    while b"\r\n\r\n" not in answer:
        byte = sock.recv(1)
        assert byte, f"the server closed the connection: {answer!r}"
        answer += byte
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


def pending_bytes(sock: socket.socket) -> int:
    """What the server has sent that the client has not read (in its receive buffer)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    count: int = struct.unpack("i", raw)[0]
    return count
