"""A small TCP proxy for uplink tests: pass, cut, blackhole (no FIN/RST) or delay.

Runs in a thread on 127.0.0.1; the agent connects to the proxy, the proxy to the
broker. `cut()` closes every connection and refuses new ones; `blackhole()` keeps the
sockets open but forwards nothing (what a dead cellular link looks like); `delay(s)`
holds every chunk for `s` seconds; `heal()` goes back to passing.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections import deque


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.mode = "pass"
        self.latency = 0.0
        self.connections = 0
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._pending: dict[socket.socket, deque[tuple[float, bytes]]] = {}
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.listener, selectors.EVENT_READ)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- control ---------------------------------------------------------------------------

    def cut(self) -> None:
        with self._lock:
            self.mode = "cut"
            for sock in list(self._pairs):
                self._close(sock)

    def blackhole(self) -> None:
        with self._lock:
            self.mode = "blackhole"

    def delay(self, seconds: float) -> None:
        with self._lock:
            self.mode, self.latency = "delay", seconds

    def heal(self) -> None:
        with self._lock:
            self.mode, self.latency = "pass", 0.0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for sock in list(self._pairs):
                self._close(sock)
        self.listener.close()

    # -- loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.02):
                with self._lock:
                    if key.fileobj is self.listener:
                        self._accept()
                    else:
                        self._read(key.fileobj)  # type: ignore[arg-type]
            with self._lock:
                self._flush()

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.mode == "cut":
            client.close()
            return
        try:
            server = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        self.connections += 1
        for a, b in ((client, server), (server, client)):
            a.setblocking(False)
            self._pairs[a] = b
            self._pending[a] = deque()
            self._sel.register(a, selectors.EVENT_READ)

    def _read(self, sock: socket.socket) -> None:
        if sock not in self._pairs:
            return
        if self.mode == "blackhole":
            # Leave the bytes in the kernel: no forwarding, no FIN, no RST.
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(sock)
            return
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        self._pending[sock].append((time.monotonic() + self.latency, data))

    def _flush(self) -> None:
        if self.mode == "blackhole":
            return
        now = time.monotonic()
        for sock, queue in list(self._pending.items()):
            peer = self._pairs.get(sock)
            while queue and queue[0][0] <= now and peer is not None:
                _, data = queue.popleft()
                try:
                    peer.sendall(data)
                except OSError:
                    self._close(sock)
                    break
        # Re-arm sockets parked by a blackhole once it is over.
        for sock in list(self._pairs):
            try:
                self._sel.get_key(sock)
            except KeyError:
                self._sel.register(sock, selectors.EVENT_READ)

    def _close(self, sock: socket.socket) -> None:
        peer = self._pairs.pop(sock, None)
        self._pending.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            self._pairs.pop(s, None)
            self._pending.pop(s, None)
            s.close()
