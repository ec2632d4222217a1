"""A TCP proxy in a thread of the test process: the route from a test cluster to a server,
that the test can cut.

The server listens where the cluster cannot reach it (127.0.0.1 of this machine); the
proxy listens on an address the cluster reaches (``TestCluster.server_address``) and
forwards each connection to the server. :meth:`TcpProxy.stop` cuts the route: the
listening socket closes (new connections are refused) and every open connection is
shut down, as when a firewall or a network between them fails. Pure Python, nothing
sent anywhere but the two addresses it is given.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable

__all__ = ["TcpProxy"]


class TcpProxy:
    """Forwards connections to ``listen_host:port`` to ``target_host:target_port``."""

    def __init__(self, listen_host: str, port: int, target_host: str, target_port: int) -> None:
        self.listen_host = listen_host
        self.port = port
        self.target = (target_host, target_port)
        self.connections = 0
        """Connections accepted since the proxy was made."""
        self._listener: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self.port))
        listener.listen(64)
        self._listener = listener
        self._stopping.clear()
        self._acceptor = self._spawn(self._accept, listener)

    def stop(self) -> None:
        """Cut the route: refuse new connections and break every open one."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        self._stopping.set()
        assert self._acceptor is not None
        self._acceptor.join(5)  # from here on, no connection is taken
        listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        self._threads = []
        with self._lock:
            for sock in self._open:
                sock.close()
            self._open.clear()

    def _spawn(self, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()
        return thread

    def _accept(self, listener: socket.socket) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            while not self._stopping.is_set():
                if not selector.select(timeout=0.05):
                    continue
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                self.connections += 1
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                except OSError:
                    client.close()
                    continue
                upstream.settimeout(None)
                with self._lock:
                    self._open.update((client, upstream))
                self._spawn(self._pump, client, upstream)
                self._spawn(self._pump, upstream, client)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            # The other direction failed, or stop() broke the connection: break both.
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
