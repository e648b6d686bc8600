"""A small TCP proxy for uplink tests: pass, cut, blackhole (no FIN/RST) or delay, and an
MQTT-aware mangler of what the broker sends to the client.

Runs in a thread on 127.0.0.1; the agent connects to the proxy, the proxy to the
broker. `cut()` closes every connection and refuses new ones; `blackhole()` keeps the
sockets open but forwards nothing (what a dead cellular link looks like); `delay(s)`
holds every chunk for `s` seconds; `heal()` goes back to passing.

With `mqtt=True` the broker -> client direction is split into MQTT packets (fixed header:
type nibble, flags nibble, remaining length as a 1-4 byte varint; MQTT 3.1.1 section 2.2)
and `mqtt_faults(...)` can, packet by packet:
- swallow PUBACKs (type 4) with a probability: the broker's word that it holds a QoS 1
  PUBLISH never reaches the client, while the PUBLISH itself went through;
- hold PUBLISH packets (type 3) on one topic for a random time, so they arrive late and
  out of order; add QoS 0 copies of some (duplicates); and re-inject old ones (stale).
Copies and stale packets are sent as QoS 0: they carry no packet id, so the client sends
no PUBACK for a packet id the broker never used on this connection (a QoS 1 copy could
acknowledge a different in-flight message of the broker's session).
Client -> broker bytes are always forwarded as they come (only the link modes apply).
"""

from __future__ import annotations

import contextlib
import heapq
import random
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field

PUBLISH = 3  # MQTT control packet types (MQTT 3.1.1, table 2.1)
PUBACK = 4
MAX_VARINT_BYTES = 4  # the remaining length takes at most four bytes (MQTT 3.1.1, 2.2.3)
STALE_HISTORY = 512  # mangled PUBLISH packets kept for stale re-injection


class MqttFramingError(ValueError):
    """The broker -> client byte stream is not a sequence of MQTT packets."""


def split_packets(buf: bytearray) -> list[bytes]:
    """Remove and return every complete MQTT packet at the start of `buf`."""
    out: list[bytes] = []
    while len(buf) >= 2:
        length, multiplier, pos = 0, 1, 1
        while True:
            if pos >= len(buf):
                return out  # the length is not all here yet
            byte = buf[pos]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            pos += 1
            if not byte & 0x80:
                break
            if pos > MAX_VARINT_BYTES:
                raise MqttFramingError("remaining length longer than four bytes")
        if len(buf) < pos + length:
            return out
        out.append(bytes(buf[: pos + length]))
        del buf[: pos + length]
    return out


def encode_varint(value: int) -> bytes:
    """MQTT remaining-length encoding of `value` (0 .. 268,435,455)."""
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def parse_publish(packet: bytes) -> tuple[str, int, bytes]:
    """(topic, qos, payload) of an MQTT 3.1.1 PUBLISH packet."""
    pos = 1
    while packet[pos] & 0x80:
        pos += 1
    pos += 1
    qos = (packet[0] >> 1) & 0x03
    topic_len = int.from_bytes(packet[pos : pos + 2], "big")
    topic = packet[pos + 2 : pos + 2 + topic_len].decode()
    pos += 2 + topic_len + (2 if qos else 0)  # packet id only at QoS 1 and 2
    return topic, qos, packet[pos:]


def encode_publish_qos0(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH of `payload` on `topic` (no packet id, so no PUBACK is due)."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + payload
    return bytes([PUBLISH << 4]) + encode_varint(len(body)) + body


@dataclass
class MqttFaults:
    """What the mangler does to broker -> client packets (all off by default)."""

    drop_puback: float = 0.0  # probability that a PUBACK is swallowed
    topic: str = ""  # PUBLISH topic to mangle ("" : none)
    hold_max: float = 0.0  # each such PUBLISH is held uniform(0, hold_max) seconds
    duplicate: float = 0.0  # probability of a QoS 0 copy, released independently
    stale: float = 0.0  # probability that an old PUBLISH is re-injected as well


@dataclass
class MqttCounters:
    """What the mangler did, for the test's figures."""

    packets: int = 0
    pubacks: int = 0
    pubacks_dropped: int = 0
    held: int = 0
    duplicated: int = 0
    stale_injected: int = 0
    reordered: int = 0  # packets released after one that arrived later
    seen_topics: set[str] = field(default_factory=set)


class TcpProxy:
    """A threaded TCP proxy on 127.0.0.1 with link faults and, optionally, MQTT faults."""

    def __init__(
        self,
        upstream_port: int,
        upstream_host: str = "127.0.0.1",
        *,
        mqtt: bool = False,
        seed: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.mode = "pass"
        self.latency = 0.0
        self.connections = 0
        self.mqtt = mqtt
        self.faults = MqttFaults()
        self.counters = MqttCounters()
        self.rng = random.Random(seed)
        self._pairs: dict[socket.socket, socket.socket] = {}
        # Per source socket: (due, order, bytes) to send to its peer, a heap so that
        # held packets can be overtaken.
        self._pending: dict[socket.socket, list[tuple[float, int, bytes]]] = {}
        self._order = 0
        self._from_broker: set[socket.socket] = set()
        self._parse: dict[socket.socket, bytearray] = {}
        self._history: deque[tuple[str, bytes]] = deque(maxlen=STALE_HISTORY)  # topic, payload
        self._released_max = -1
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
        """Back to passing bytes (MQTT faults, set apart, stay as they are)."""
        with self._lock:
            self.mode, self.latency = "pass", 0.0

    def mqtt_faults(self, **faults: float | str) -> None:
        """Set the MQTT faults (see MqttFaults); unnamed ones go back to off."""
        assert self.mqtt, "MQTT faults need TcpProxy(..., mqtt=True)"
        with self._lock:
            self.faults = MqttFaults(**faults)  # type: ignore[arg-type]

    def inject_stale(self, count: int) -> int:
        """Re-inject up to `count` old mangled PUBLISHes now, on every live connection."""
        with self._lock:
            injected = 0
            for sock in list(self._from_broker):
                for _ in range(count if self._history else 0):
                    self._queue(sock, 0.0, encode_publish_qos0(*self.rng.choice(self._history)))
                    injected += 1
            self.counters.stale_injected += injected
            return injected

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
            for key, _ in self._sel.select(timeout=0.01):
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
            self._pending[a] = []
            self._sel.register(a, selectors.EVENT_READ)
        self._from_broker.add(server)
        self._parse[server] = bytearray()

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
        if self.mqtt and sock in self._from_broker:
            buf = self._parse[sock]
            buf += data
            try:
                packets = split_packets(buf)
            except MqttFramingError:
                self._close(sock)
                return
            for packet in packets:
                self._mangle(sock, packet)
        else:
            self._queue(sock, self.latency, data)

    def _queue(self, sock: socket.socket, after: float, data: bytes) -> None:
        self._order += 1
        heapq.heappush(self._pending[sock], (time.monotonic() + after, self._order, data))

    def _mangle(self, sock: socket.socket, packet: bytes) -> None:
        f, c = self.faults, self.counters
        c.packets += 1
        kind = packet[0] >> 4
        if kind == PUBACK:
            c.pubacks += 1
            if f.drop_puback and self.rng.random() < f.drop_puback:
                c.pubacks_dropped += 1
                return
        elif kind == PUBLISH and f.topic:
            topic, _qos, payload = parse_publish(packet)
            c.seen_topics.add(topic)
            if topic == f.topic:
                c.held += 1
                self._history.append((topic, payload))
                # The original keeps its QoS 1 packet id: the broker gets its PUBACK.
                self._queue(sock, self.rng.uniform(0, f.hold_max), packet)
                if f.duplicate and self.rng.random() < f.duplicate:
                    c.duplicated += 1
                    copy = encode_publish_qos0(topic, payload)
                    self._queue(sock, self.rng.uniform(0, 2 * f.hold_max), copy)
                if f.stale and self.rng.random() < f.stale:
                    c.stale_injected += 1
                    old = encode_publish_qos0(*self.rng.choice(self._history))
                    self._queue(sock, self.rng.uniform(0, f.hold_max), old)
                return
        self._queue(sock, self.latency, packet)

    def _flush(self) -> None:
        if self.mode == "blackhole":
            return
        now = time.monotonic()
        for sock, heap in list(self._pending.items()):
            peer = self._pairs.get(sock)
            while heap and heap[0][0] <= now and peer is not None:
                due, order, data = heap[0]
                try:
                    sent = peer.send(data)
                except (BlockingIOError, InterruptedError):
                    break  # the peer's buffer is full: retry on the next round
                except OSError:
                    self._close(sock)
                    break
                if sent < len(data):  # the rest goes first next time
                    heap[0] = (due, order, data[sent:])
                    break
                heapq.heappop(heap)
                if sock in self._from_broker:
                    if order < self._released_max:
                        self.counters.reordered += 1
                    self._released_max = max(self._released_max, order)
        # Re-arm sockets parked by a blackhole once it is over.
        for sock in list(self._pairs):
            try:
                self._sel.get_key(sock)
            except KeyError:
                self._sel.register(sock, selectors.EVENT_READ)

    def _close(self, sock: socket.socket) -> None:
        peer = self._pairs.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            self._pairs.pop(s, None)
            self._pending.pop(s, None)
            self._parse.pop(s, None)
            self._from_broker.discard(s)
            s.close()
