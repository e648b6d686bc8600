"""The collector's side of MQTT: subscribe to every vehicle's batches (alone, or as one of
a shared-subscription group), publish acks and commands.

The agent's side is `agent.uplink.MqttTransport`; both use `agent.fleet`'s topics and
codec, the fleet protocol the agent defines (docs/fleet-protocol.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.fleet import topic
from agent.uplink import CONNECT_TIMEOUT, no_delay

log = logging.getLogger(__name__)


class FleetSubscriber:
    """The collector's side of MQTT: subscribe to every vehicle, publish acks and commands.

    Messages are handed to `on_message(topic, payload)` on paho's network thread; the
    handler commits before it calls `ack`, so an ack always follows a durable write.
    """

    def __init__(
        self,
        host: str,
        port: int,
        on_message: Any,
        *,
        client_id: str = "ironfleet-collector",
        vehicles: tuple[str, ...] = (),
        keepalive: int = 30,
        share_group: str = "",
        session_expiry: int = 60,
        on_session_lost: Callable[[], None] | None = None,
    ) -> None:
        self.host, self.port, self.keepalive = host, port, keepalive
        self.on_message = on_message
        self.vehicles = vehicles or ("+",)
        # With a share group, N collectors split the vehicles ($share/<group>/...). MQTT 5
        # then, for its session expiry: mosquitto keeps dealing a disconnected member its
        # round-robin share, queued, until its session ends (docs/fleet-deployment.md).
        self.share_group = share_group
        self._v5 = bool(share_group)
        self._session_expiry = session_expiry
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=None if self._v5 else False,
            protocol=MQTTProtocolVersion.MQTTv5 if self._v5 else MQTTProtocolVersion.MQTTv311,
        )
        self.client.connect_timeout = CONNECT_TIMEOUT
        self.client.reconnect_delay_set(1, 2)
        self.client.max_inflight_messages_set(1000)
        self.client.on_socket_open = no_delay
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.connected = False
        self.handler_bugs = 0
        self.connects = 0
        # A reconnect whose CONNACK says the broker kept no session for us: reported to
        # `on_session_lost` once we are subscribed again (Collector.session_lost).
        self.on_session_lost = on_session_lost
        self.sessions_lost = 0
        self._lost = False

    def start(self) -> None:
        """Connect (retrying in the background) and start paho's network thread."""
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = self._session_expiry
            self.client.connect_async(self.host, self.port, self.keepalive, clean_start=False,
                                      properties=props)  # fmt: skip
            self.client.loop_start()
            return
        self.client.connect_async(self.host, self.port, self.keepalive)
        self.client.loop_start()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def ack(self, vehicle: str, payload: bytes) -> None:
        self.client.publish(topic(vehicle, "ack"), payload, qos=1)

    def command(self, vehicle: str, payload: bytes) -> None:
        self.client.publish(topic(vehicle, "cmd"), payload, qos=1)

    def _on_connect(self, _c: Any, _u: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("collector_connect_refused reason=%s", reason)
            return
        self.connected = True
        self.connects += 1
        # Kept until a SUBACK: a connection lost before it leaves the broker a session
        # without our subscriptions, which the next CONNACK reports as present.
        self._lost = self._lost or (self.connects > 1 and not flags.session_present)
        share = f"$share/{self.share_group}/" if self.share_group else ""
        subs = [
            (share + topic(v, kind), 1)
            for v in self.vehicles
            for kind in ("events", "state", "status")
        ]
        self.client.subscribe(subs)
        log.info("collector_connected broker=%s:%d", self.host, self.port)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: Any, _codes: Any, _props: Any) -> None:
        # After the SUBACK, not the CONNACK: a vehicle's resend must find us subscribed.
        if not self._lost:
            return
        self._lost = False
        self.sessions_lost += 1
        if self.on_session_lost is not None:
            self.on_session_lost()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self.on_message(msg.topic, bytes(msg.payload))
        except Exception:  # last resort: an exception here would stop paho's thread
            self.handler_bugs += 1
            if self.handler_bugs == 1:
                log.exception("collector_handler_bug topic=%r (first; counted after)", msg.topic)
