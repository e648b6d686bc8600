"""MQTT transport for the uplink: the agent's only module that imports paho-mqtt.

QoS 1, a persistent session (clean_session=False, fixed client id) so the broker keeps
our `ack` and `cmd` subscriptions across reconnects, a retained `status` with an
"offline" last will, optional TLS and credentials (the password is read from a file,
e.g. systemd's LoadCredential=, never from argv or the environment).

Reconnecting is not left to paho: `FleetSync` decides when (backoff with jitter, and
not while the circuit breaker is open), so paho's automatic reconnect is off and its
network loop is stepped with `poll()` from the uplink thread only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion

from agent.config import UplinkSection
from agent.errors import ConfigError
from agent.fleet import FleetMessageError, parse_topic, status_document, topic

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 5.0  # seconds for TCP connect: a blackholed broker must not hang us


def no_delay(_client: Any, _userdata: Any, sock: Any) -> None:
    """Disable Nagle: paho leaves it on, and a small QoS 1 publish then waits ~40 ms for
    its PUBACK (measured: 87.9 ms per round trip through mosquitto, 0.80 ms without)."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class MqttTransport:
    """paho-mqtt client wrapped for `FleetSync`: connect, poll, publish, events."""

    def __init__(self, config: UplinkSection, vehicle: str) -> None:
        self.config = config
        self.vehicle = vehicle
        client_id = config.client_id or f"ironfleet-{vehicle}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=MQTTProtocolVersion.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.connect_timeout = CONNECT_TIMEOUT
        self.client.max_inflight_messages_set(max(20, config.max_in_flight * 4))
        self.client.will_set(topic(vehicle, "status"), status_document("offline"), 1, True)
        if config.username:
            self.client.username_pw_set(config.username, self._password())
        if config.tls:
            self.client.tls_set(
                ca_certs=config.ca_file or None,
                certfile=config.cert_file or None,
                keyfile=config.key_file or None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        self.client.on_socket_open = no_delay
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._events: list[tuple[str, object]] = []
        self._connected = False
        self._connecting = False  # an attempt is out, no CONNACK yet
        self._ever_connected = False
        self.connect_error = ""  # why the last connect() returned False

    @property
    def address(self) -> str:
        """The broker's host:port, named in every failure the uplink reports."""
        return f"{self.config.host}:{self.config.port}"

    def _password(self) -> str | None:
        if not self.config.password_file:
            return None
        try:
            return Path(self.config.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"[uplink] password_file = {self.config.password_file!r}: {exc.strerror}"
            ) from None

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self) -> bool:
        """Start a connection attempt; the outcome arrives as an event from `poll`."""
        self.connect_error = ""
        try:
            if self._ever_connected:
                rc = self.client.reconnect()
            else:
                rc = self.client.connect(self.config.host, self.config.port, self.config.keepalive)
                self._ever_connected = True
        except ssl.SSLError as exc:
            # An OSError too, but its errno is OpenSSL's: name the TLS failure instead.
            why = getattr(exc, "verify_message", None) or exc.reason or str(exc)
            self.connect_error = f"{self.address}: TLS: {why}"
            log.debug("mqtt_connect_failed error=%r", self.connect_error)
            return False
        except OSError as exc:
            # "127.0.0.1:1883: Connection refused (ECONNREFUSED)": where, and the errno a
            # technician can look up; a DNS failure has no errno, only its text.
            code = errno.errorcode.get(exc.errno or 0)
            self.connect_error = f"{self.address}: {exc.strerror or exc}" + (
                f" ({code})" if code else ""
            )
            log.debug("mqtt_connect_failed error=%r", self.connect_error)
            return False
        except ValueError as exc:
            self.connect_error = f"{self.address}: {exc}"
            log.debug("mqtt_connect_failed error=%r", self.connect_error)
            return False
        self._connecting = rc == MQTTErrorCode.MQTT_ERR_SUCCESS
        if not self._connecting:
            self.connect_error = f"{self.address}: {mqtt.error_string(rc)}"
        return self._connecting

    def poll(self, timeout: float) -> list[tuple[str, object]]:
        """Run paho's network loop once; return what happened since the last call."""
        if self.client.socket() is None:
            # No connection: paho returns at once, which would spin the uplink thread
            # (measured: a full core, and serial ingest starved to 573 frames/s).
            time.sleep(timeout)
        rc = self.client.loop(timeout)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._connected:
            self._connected = False
            self._events.append(("disconnected", f"{self.address}: {mqtt.error_string(rc)}"))
        elif rc != MQTTErrorCode.MQTT_ERR_SUCCESS and self._connecting:
            # Closed before CONNACK (a proxy whose broker is down, a broker restarting):
            # say so now, not after CONNACK_TIMEOUT (a 0.3 s cut cost 9.9 s: measured).
            self._connecting = False
            self._events.append(
                ("refused", f"{self.address} closed before CONNACK: {mqtt.error_string(rc)}")
            )
        events, self._events = self._events, []
        return events

    def publish(self, kind: str, payload: bytes) -> int | None:
        """Publish at QoS 1; the message id, or None if paho refused it."""
        info = self.client.publish(topic(self.vehicle, kind), payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return None
        return int(info.mid)

    def publish_status(self, state: str, **fields: object) -> None:
        self.client.publish(
            topic(self.vehicle, "status"), status_document(state, **fields), 1, True
        )

    def drop(self) -> None:
        """Close the connection (the session stays): the broker stopped answering.

        paho resends unacknowledged QoS 1 messages only on a new connection, so a
        connection whose PUBACKs went missing must be replaced, or its in-flight slots
        stay full and every later publish waits inside paho for ever.
        """
        self.client.disconnect()
        self.client.loop(0.0)
        if self._connected:
            self._connected = False
            self._events.append(("disconnected", f"{self.address}: dropped, PUBACK overdue"))

    def close(self) -> None:
        """Say offline (retained) and disconnect cleanly."""
        if self._connected:
            self.publish_status("offline")
            self.client.loop(0.1)
            self.client.disconnect()
        self.client.loop(0.1)
        self._connected = False

    # paho callbacks (run inside client.loop, on our thread)

    def _on_connect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connecting = False
        if reason.is_failure:
            self._events.append(("refused", f"{self.address}: {reason} (CONNACK)"))
            return
        self._connected = True
        self.client.subscribe([(topic(self.vehicle, "ack"), 1), (topic(self.vehicle, "cmd"), 1)])
        self._events.append(("connected", None))

    def _on_disconnect(self, _c: Any, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if self._connected:
            self._connected = False
            self._events.append(("disconnected", f"{self.address}: {reason}"))
        elif self._connecting:
            self._connecting = False
            self._events.append(("refused", f"{self.address} closed before CONNACK: {reason}"))

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            vehicle, kind = parse_topic(msg.topic)
        except FleetMessageError:
            return
        if vehicle != self.vehicle or kind not in ("ack", "cmd"):
            return  # not subscribed to: a broker bug, never acted on
        if msg.retain:
            # The collector never retains acks or commands: a retained one was left by
            # someone else and would be re-delivered on every (re)connect. Dropped unread,
            # counted by FleetSync (docs/fleet-protocol.md 5).
            self._events.append(("retained", kind))
            return
        self._events.append((kind, bytes(msg.payload)))

    def _on_publish(self, _c: Any, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        self._events.append(("puback", mid))
