"""The collector's replay request after the broker lost its session, in process: which
vehicles are asked, how often, and that the thread which asks survives a store that
fails. The MQTT side is a recording transport here, and paho's callbacks are called in the
order a flapping broker gives them; the whole path runs against
mosquitto in tests/agent/test_uplink.py (a real agent, a proxy holding the collector
off) and tests/chaos/test_fleet_pg.py (three collectors, one of which asks).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.client import ConnectFlags
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent.fleet import Command
from agent.fleet_auth import FleetAuth, load_public_key
from fleet import collector as collector_module
from fleet.collector import Collector, CollectorStore
from fleet.pgstore import PgCollectorStore
from fleet.subscriber import FleetSubscriber

from pgharness import PgCluster
from support import fleet_keys, fleet_signer, wait_for


class Recorder:
    """What the collector publishes to each vehicle's cmd topic, and when."""

    def __init__(self, vehicles: tuple[str, ...] = ("+",)) -> None:
        self.vehicles = vehicles
        self.commands: list[tuple[float, str, bytes]] = []
        self.lock = threading.Lock()

    def command(self, vehicle: str, payload: bytes) -> None:
        with self.lock:
            self.commands.append((time.monotonic(), vehicle, payload))

    def sent(self) -> list[str]:
        with self.lock:
            return [v for _, v, _ in self.commands]


def known_store(tmp_path: Path, names: tuple[str, ...]) -> CollectorStore:
    store = CollectorStore(tmp_path / "c.db")
    for name in names:
        store.set_status(name, "online", 1.0)
    return store


def test_every_known_vehicle_is_asked_with_a_signed_replay(tmp_path: Path) -> None:
    store = known_store(tmp_path, ("v2", "v1", "v3"))
    rec = Recorder()
    col = Collector(store, rec, signer=fleet_signer())
    col.session_lost()
    wait_for(lambda: col.replays_sent == 3, 10, "three requests")
    assert sorted(rec.sent()) == ["v1", "v2", "v3"]
    public = load_public_key(str(fleet_keys()[1]))
    ids = set()
    for _, vehicle, payload in rec.commands:
        cmd = Command.decode(payload)
        assert cmd.op == "replay"
        assert FleetAuth(vehicle, public).command_ok(cmd), "as agents verify it"
        ids.add(cmd.cmd_id)
    # One id for the round (ids grow per vehicle), not one a vehicle running ahead of the
    # clock: a command stamped with the clock just after must still be accepted.
    assert len(ids) == 1
    assert ids.pop() <= int(time.time() * 1000)


def test_named_vehicles_are_asked_not_the_store(tmp_path: Path) -> None:
    store = known_store(tmp_path, ("v1", "v2"))
    rec = Recorder(vehicles=("v9",))  # the collector was started with --vehicles v9
    col = Collector(store, rec, signer=fleet_signer())
    col.session_lost()
    wait_for(lambda: col.replays_sent == 1, 10, "one request")
    assert rec.sent() == ["v9"]


def test_losses_in_a_row_are_paced_and_none_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flapping broker: losses reported while a round runs are served by one more
    round (not one each, and not none), which starts no sooner than the interval after
    the first."""
    monkeypatch.setattr(collector_module, "REPLAY_ALL_INTERVAL", 0.5)
    store = known_store(tmp_path, ("v1", "v2"))
    rec = Recorder()
    col = Collector(store, rec, signer=fleet_signer())
    real = store.vehicles
    gate = threading.Event()
    rounds: list[float] = []  # when each round began (the collector's own mark)

    def gated(limit: int) -> list[str]:
        rounds.append(col._last_replay_all)
        gate.wait(10)
        return real(limit)

    monkeypatch.setattr(store, "vehicles", gated)
    col.session_lost()
    wait_for(lambda: len(rounds) == 1, 10, "the first round")
    col.session_lost()  # two more losses while it runs
    col.session_lost()
    gate.set()
    wait_for(lambda: col.replays_sent == 4, 10, "one more round")
    assert len(rounds) == 2
    assert rounds[1] - rounds[0] >= 0.5, "the second round waited for the interval"
    assert not col._replay_due.is_set(), "nothing else pending: no third round"


def test_a_failing_store_is_logged_and_the_thread_lives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(collector_module, "REPLAY_ALL_INTERVAL", 0.0)
    store = known_store(tmp_path, ("v1",))
    rec = Recorder()
    col = Collector(store, rec, signer=fleet_signer())
    real = store.vehicles
    calls = {"n": 0}

    def flaky(limit: int) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return real(limit)

    monkeypatch.setattr(store, "vehicles", flaky)
    col.session_lost()
    wait_for(lambda: calls["n"] == 1, 10, "the failed round")
    col.session_lost()
    wait_for(lambda: col.replays_sent == 1, 10, "the next round, on the same thread")
    assert col._replayer is not None
    assert col._replayer.is_alive()


def test_a_loss_is_reported_once_subscribed_even_across_a_second_drop() -> None:
    """paho's callbacks in the order a flapping broker gives them: the first connect is
    never a loss; a reconnect without a session is, and stays pending through a further
    reconnect that finds the empty session the broker made meanwhile, until a SUBACK
    reports it, once."""
    lost: list[int] = []
    sub = FleetSubscriber("127.0.0.1", 1, lambda *_: None, on_session_lost=lambda: lost.append(1))
    ok = ReasonCode(PacketTypes.CONNACK, "Success")

    def connack(present: bool) -> None:
        sub._on_connect(sub.client, None, ConnectFlags(session_present=present), ok, None)

    def suback() -> None:
        sub._on_subscribe(sub.client, None, 1, [], None)

    connack(False)  # the first connect of the process
    suback()
    assert lost == []
    connack(False)  # the broker forgot us; this connection drops before its SUBACK
    connack(True)  # the session it made meanwhile holds no subscription
    assert lost == []
    suback()
    suback()
    assert lost == [1]
    assert sub.sessions_lost == 1
    connack(True)  # a reconnect that kept the session: nothing was dropped
    suback()
    assert lost == [1]


def test_on_postgresql_one_member_asks_and_its_next_round_is_sent(
    pg: PgCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two members of a group on one database lose their sessions at once: one asks, the
    other sees the claim. The one that asked loses its session again: its next round,
    paced by its own clock, is sent (its claim, timed by the server's, has expired)."""
    monkeypatch.setattr(collector_module, "REPLAY_ALL_INTERVAL", 2.0)
    monkeypatch.setattr(collector_module, "REPLAY_CLAIM_SECONDS", 1.0)
    url = pg.create_database("t_replay_claim")
    stores = [PgCollectorStore(url), PgCollectorStore(url)]
    for name in ("v1", "v2"):
        stores[0].set_status(name, "online", 1.0)
    claims: list[list[bool]] = [[], []]
    for store, seen in zip(stores, claims, strict=True):
        real = store.claim_replay

        def claim(seconds: float, real: Any = real, seen: list[bool] = seen) -> bool:
            seen.append(real(seconds))
            return seen[-1]

        monkeypatch.setattr(store, "claim_replay", claim)
    cols = [Collector(s, Recorder(), signer=fleet_signer()) for s in stores]
    cols[0].session_lost()
    wait_for(lambda: cols[0].replays_sent == 2, 10, "the first member's round")
    cols[1].session_lost()
    wait_for(lambda: claims[1] == [False], 10, "the second member to see the claim")
    cols[0].session_lost()
    wait_for(lambda: cols[0].replays_sent == 4, 10, "the first member's next round")
    assert claims[0] == [True, True]
    assert cols[1].replays_sent == 0
    for s in stores:
        s.close()
