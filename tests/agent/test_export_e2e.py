"""Issue 15, offline delivery by hand, end to end with real processes: the daemon
ingests from the simulator over a pty while its broker never answers; `ironfleet export`
writes a bundle meanwhile; `ironfleet-collector import` loads it (twice: the second stores
nothing) and writes the signed receipt; `ironfleet import-receipt` hands it to the running
daemon, whose persisted cursor then covers exactly the bundle's top, and to a stopped
daemon, which applies it at its next start; when the broker finally comes up, the rest
follows over MQTT: every ACKed event at the collector once, 0 lost. Also the agent's key
commands (keygen, signature problems). The pieces are tested in test_export.py.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundlesig import check_signature, signature_file
from agent.config import from_mapping
from agent.errors import ConfigError
from agent.fleet_auth import (
    key_fingerprint,
    load_public_key,
)
from agent.receipts import (
    RECEIPT_NAME,
)

from fleetharness import (
    VEHICLE,
    CollectorHarness,
    StartAgent,
    StartSim,
    check_zero_loss,
    run_collector,
    top_rowid,
    uplink,
    wait_drained,
)
from simharness import Broker, TruthReader, agent_state, free_port, stored_events
from support import fleet_keys, vehicle_keys, wait_for

IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))


def run_cli(*args: str) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if k != "IRONFLEET_DB"}
    result = subprocess.run([IRONFLEET, *args, "--json"], capture_output=True, text=True,
                            env=base, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, f"ironfleet {' '.join(args)}: {result.stderr}"
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def collector_import(bundle: Path, db: Path) -> dict[str, Any]:
    result = run_collector("import", str(bundle), "--db", str(db), "--signing-key",
                           str(fleet_keys()[0]), "--vehicle-keys",
                           str(vehicle_keys(VEHICLE)[1]), "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


def cursor(db: Path) -> int:
    return int(agent_state(db).get("uplink.cursor", 1))


def rows_upto(db: Path, top: int) -> dict[int, tuple[str, int, int, str]]:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return {rowid: (s, e, q, bytes(p).hex()) for rowid, s, e, q, p in conn.execute(
            "SELECT e.id, s.name, e.boot_epoch, e.seq, e.payload FROM events e "
            "JOIN streams s ON s.id = e.stream_id WHERE e.id <= ?", (top,))}  # fmt: skip
    finally:
        conn.close()


def collector_events(db: Path) -> dict[tuple[str, int, int], str]:
    conn = sqlite3.connect(db.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT stream, boot_epoch, seq, payload FROM events WHERE vehicle = ?", (VEHICLE,)
        ).fetchall()
        return {(s, e, q): bytes(p).hex() for s, e, q, p in rows}
    finally:
        conn.close()


def test_export_import_receipt_end_to_end_with_no_broker(
    tmp_path: Path, start_sim: StartSim, start_agent: StartAgent
) -> None:
    port = free_port()  # nothing listens here until the very end
    sim = start_sim("--rate", "2000", "--streams", "8")
    agent = start_agent(
        sim.devices["ecu0"],
        uplink=uplink(port),
        agent={"signing_key_file": str(vehicle_keys(VEHICLE)[0])},
    ).start()
    truth = TruthReader(sim.truth_path)
    cfg = ("--config", str(agent.config))
    fleet_db = tmp_path / "fleet.db"
    wait_for(agent.started, 30, "the agent to start")
    wait_for(lambda: top_rowid(agent.db) >= 4000, 30, "4,000 stored events")
    truth.poll()
    acked_before = dict(truth.acked)  # ACK after commit: all of them are at or below the top

    # 1. Export while the daemon ingests.
    bundle = tmp_path / "usb" / "truck-1"
    bundle.parent.mkdir()  # the stick's mount point (here on the agent's file system, hence
    # --same-filesystem: on a vehicle export refuses it, docs/operations.md 15)
    plan = run_cli(*cfg, "export")
    assert plan["cursor"] == 1
    assert plan["events"] >= 4000
    started = time.monotonic()
    out = run_cli(*cfg, "export", str(bundle), "--chunk-events", "1000", "--same-filesystem")
    took = time.monotonic() - started
    top = out["top"]
    assert out["complete"]
    assert out["first"] == 1
    assert out["events"] == top >= 4000
    assert out["chunks"] == 1 + -(-top // 1000)  # the state, then the backlog
    assert top_rowid(agent.db) > top, "ingest went on during the export"
    assert cursor(agent.db) == 1, "the broker never answered: nothing acked yet"
    before = rows_upto(agent.db, top)
    assert len(before) == top, "rows 1..top all stored, none deleted"

    # 2. The fleet side, twice: the second import stores nothing new.
    first = collector_import(bundle, fleet_db)
    assert first["stored"] + first["duplicates"] == first["events"] == top + out["state_events"]
    second = collector_import(bundle, fleet_db)
    assert (second["stored"], second["duplicates"]) == (0, first["events"])

    # 3. The receipt back on the vehicle: the running daemon applies it.
    queued = run_cli(*cfg, "import-receipt", str(bundle))
    assert (queued["first"], queued["last"], queued["events"]) == (1, top, top)
    assert rows_upto(agent.db, top) == before, "nothing deleted before the fleet's ack"
    wait_for(lambda: cursor(agent.db) > top, 20, "the receipt to move the cursor")
    assert cursor(agent.db) == top + 1, "exactly the bundle's top, not a row more"
    listing = run_cli(*cfg, "import-receipt")
    assert [e["delivered"] for e in listing["exports"]] == [True]

    fleet = collector_events(fleet_db)
    for rowid, (stream, epoch, seq, payload) in before.items():
        assert fleet.get((stream, epoch, seq)) == payload, f"row {rowid} missing or altered"
    missing = [k for k, p in acked_before.items() if fleet.get(k) != p]
    assert not missing, f"{len(missing)} ACKed events not at the collector: {missing[:3]}"

    # 4. A second export, its receipt imported while the daemon is stopped: applied at start.
    wait_for(lambda: top_rowid(agent.db) > top + 1000, 20, "1,000 more events")
    out2 = run_cli(*cfg, "export", str(tmp_path / "usb" / "truck-2"), "--same-filesystem")
    assert out2["first"] == top + 1
    assert out2["complete"]
    collector_import(tmp_path / "usb" / "truck-2", fleet_db)
    assert agent.terminate() == 0
    run_cli(*cfg, "import-receipt", str(tmp_path / "usb" / "truck-2" / RECEIPT_NAME))
    assert cursor(agent.db) == top + 1
    agent.start()
    wait_for(lambda: cursor(agent.db) > out2["top"], 20, "the queued receipt at start")
    assert cursor(agent.db) == out2["top"] + 1

    # 5. Next contact: the broker comes up; the rest follows over MQTT, deduplicated.
    broker = Broker(tmp_path / "broker", port=port).start()
    harness = CollectorHarness(fleet_db, port)
    try:
        sim.signal(signal.SIGTERM)
        assert sim.wait(timeout=20) == 0
        wait_drained(agent, 60)
        assert agent.terminate() == 0
        check_zero_loss(truth, harness, agent)
        stored = stored_events(agent.db)
        assert set(collector_events(fleet_db)) == set(stored)  # all of them, each once
    finally:
        harness.stop()
        broker.stop(signal.SIGKILL)
    print(f"\nexport of {top} events while ingesting: {took:.2f} s ({top / took:,.0f} events/s "
          f"incl. process start); import {first['seconds']:.2f} s; "
          f"{out['bytes'] / (top + out['state_events']):.0f} bytes per event")  # fmt: skip


def test_agent_keygen_makes_a_vehicle_key_once(tmp_path: Path) -> None:
    """`ironfleet-agent keygen`: the vehicle's pair, private 0600, never overwritten; the
    fingerprint printed is the one the collector's key file yields."""
    agent = str(Path(sys.executable).with_name("ironfleet-agent"))
    private, public = tmp_path / "vehicle.key", tmp_path / f"{VEHICLE}.pub"
    made = subprocess.run([agent, "keygen", "--private", str(private), "--public", str(public)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert private.stat().st_mode & 0o777 == 0o600
    assert key_fingerprint(load_public_key(str(public))) in made.stdout
    again = subprocess.run([agent, "keygen", "--private", str(private), "--public",
                            str(tmp_path / "x.pub")], capture_output=True, text=True,
                           check=False)  # fmt: skip
    assert again.returncode == 1
    assert "File exists" in again.stderr
    assert not (tmp_path / "x.pub").exists(), "no public key without its private one"


def test_signature_problems_are_printable_and_the_vehicle_id_must_name_a_key() -> None:
    """A SIGNATURE's own text reaches the operator's terminal escaped; a vehicle that signs
    must have an id its key file can be named by at the fleet (`<vehicle_id>.pub`)."""
    key = Ed25519PrivateKey.generate()
    doc = json.loads(signature_file(key, b"sums"))
    doc["key"] = "\x1b[2J\x1b]0;pwned\x07"
    problem = check_signature(json.dumps(doc).encode(), b"other sums", key.public_key())
    assert problem is not None
    assert "\x1b" not in problem
    assert "\\x1b[2J" in problem
    for vehicle in ("bus 12", ".hidden", "-x", "veh:7"):
        with pytest.raises(ConfigError, match="needs a vehicle_id the fleet can name"):
            from_mapping({"agent": {"vehicle_id": vehicle, "signing_key_file": "/k"},
                          "uplink": {"allow_unsigned": True}})  # fmt: skip
    from_mapping({"agent": {"vehicle_id": "bus 12"}, "uplink": {"allow_unsigned": True}})
