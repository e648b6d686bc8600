"""Issue 15, offline delivery by hand: the pieces, on real SQLite files (agent store,
collector store) and real keys: the bundle's checks (a flipped byte, a truncated manifest
or chunk, a missing SHA256SUMS), forged receipts (another key, a wrong digest, a ledger
that claims more rows) refused and counted by the daemon's inbox, a receipt for an
unknown export ignored, the caps at max and max + 1, and total decoders. The whole path
with real processes is test_export_e2e.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.bundlesig import SIGNATURE_NAME
from agent.config import UplinkSection
from agent.export import (
    CHUNK_BITS,
    MANIFEST_NAME,
    MAX_CHUNKS,
    MAX_EXPORT_ID,
    MAX_MANIFEST_BYTES,
    SUMS_NAME,
    BundleError,
    Manifest,
    batch_id,
    export_bundle,
)
from agent.fleet import Ack, batch_digest
from agent.fleet_auth import (
    FleetAuth,
    FleetSigner,
    load_private_key,
    load_public_key,
)
from agent.receipts import (
    INBOX_DIR,
    MAX_RECEIPT_BYTES,
    RECEIPT_NAME,
    Receipt,
    ReceiptError,
    ReceiptInbox,
    check_receipt,
)
from agent.resilience import Event
from agent.resync import Resync
from agent.store import EventStore, connect
from agent.storedb import EXPORTS_DIR
from fleet.collector import CollectorStore
from fleet.importer import VehicleKeys, import_bundle

from fleetharness import (
    VEHICLE,
    run_collector,
)
from support import fleet_keys, fleet_signer, vehicle_keys

IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))


# -- helpers -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class In:
    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def fill(store: EventStore, streams: int, per_stream: int, start: int = 1) -> None:
    store.append(
        [In(Event(f"ecu0/s{k}", q, boot_epoch=1, ts=1.7e9 + q, payload=bytes([q % 256])))
         for q in range(start, start + per_stream) for k in range(streams)]
    )  # fmt: skip


@contextlib.contextmanager
def reading(db: Path) -> Iterator[sqlite3.Connection]:
    """One short read-only transaction (what the CLI's guarded `reading` gives)."""
    conn = connect(db, readonly=True)
    try:
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def auth() -> FleetAuth:
    return FleetAuth(VEHICLE, load_public_key(str(fleet_keys()[1])))


@dataclass
class Vehicle:
    """A real agent store and what the uplink thread holds: its reader and resync."""

    store: EventStore
    resync: Resync
    inbox: ReceiptInbox
    clock: float = 1000.0

    @property
    def state_dir(self) -> Path:
        return self.store.path.parent

    def step(self, times: int = 50) -> None:
        """Step the inbox as the uplink thread does (SCAN_INTERVAL apart)."""
        for _ in range(times):
            self.clock += 2.0
            self.inbox.run_once(self.clock)


def vehicle(tmp_path: Path, streams: int = 8, per_stream: int = 300) -> Vehicle:
    state = tmp_path / "state"
    state.mkdir()
    store = EventStore(state / "agent.db")
    fill(store, streams, per_stream)
    reader = connect(store.path, readonly=True)
    resync = Resync(
        reader,
        VEHICLE,
        UplinkSection(),
        lambda upto, positions, fronts: store.mark_delivered(upto, positions, frontiers=fronts),
        run_id=7,
    )
    return Vehicle(store, resync, ReceiptInbox(state, reader, auth(), resync))


def export(v: Vehicle, bundle: Path, **kwargs: Any) -> Manifest:
    """An export signed by the vehicle's key (as `ironfleet export` with signing_key_file)."""
    kwargs.setdefault("signing_key", load_private_key(str(vehicle_keys(VEHICLE)[0])))
    return export_bundle(lambda: reading(v.store.path), bundle, v.state_dir / EXPORTS_DIR,
                         VEHICLE, **kwargs)  # fmt: skip


def keys() -> VehicleKeys:
    """The collector's view of the vehicles' public keys (this test's vehicle only)."""
    return VehicleKeys(vehicle_keys(VEHICLE)[1])


def queue(v: Vehicle, receipt: Receipt, name: str = "1-1.receipt") -> None:
    """Put a receipt straight into the inbox, as anyone in the ironfleet group could."""
    inbox = v.state_dir / INBOX_DIR
    inbox.mkdir(exist_ok=True)
    (inbox / name).write_bytes(receipt.encode())


# -- the pieces ----------------------------------------------------------------------------------


def test_bundle_import_receipt_moves_the_cursor_exactly(tmp_path: Path) -> None:
    v = vehicle(tmp_path)  # 2,400 events in 8 streams
    (tmp_path / "usb").mkdir()  # the stick's mount point
    manifest = export(v, tmp_path / "usb" / "b1", chunk_events=1000)
    assert (manifest.cursor, manifest.top, manifest.events) == (1, 2400, 2400)
    assert [c.kind for c in manifest.chunks] == ["state", "events", "events", "events"]
    assert [(c.first, c.last) for c in manifest.chunks[1:]] == [(1, 1000), (1001, 2000),
                                                                 (2001, 2400)]  # fmt: skip
    assert manifest.complete
    bundle = tmp_path / "usb" / "b1"
    # Self-checking with the tools of any laptop.
    check = subprocess.run(["sha256sum", "--check", "--strict", SUMS_NAME], cwd=bundle,
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert (v.state_dir / EXPORTS_DIR / f"{manifest.export}.json").read_bytes() == (
        bundle / MANIFEST_NAME
    ).read_bytes()

    fleet = CollectorStore(tmp_path / "collector.db")
    first = import_bundle(fleet, bundle, fleet_signer(), vehicle_keys=keys())
    assert (first.stored, first.duplicates) == (2400, 8)  # the state's 8 come again
    again = import_bundle(fleet, bundle, fleet_signer(), vehicle_keys=keys())
    assert (again.stored, again.duplicates) == (0, 2408)
    assert len(fleet.keys(VEHICLE)) == 2400

    receipt = Receipt.decode((bundle / RECEIPT_NAME).read_bytes())
    assert [a.batch_id for a in receipt.acks] == [c.batch for c in manifest.chunks]
    queue(v, receipt)
    assert v.store.cursor == 1  # nothing moves before the daemon has checked it
    v.step()
    assert v.resync.delivered == 2400
    assert v.store.cursor == 2401  # persisted, so the ladder may now evict them
    assert v.inbox.counters["acks_applied"] == 3
    assert v.inbox.counters["acks_state"] == 1
    assert not list((v.state_dir / INBOX_DIR).iterdir()), "applied and persisted: removed"
    assert v.store.checkpoints() == {f"ecu0/s{k}": (1, 300) for k in range(8)}

    queue(v, receipt, "1-2.receipt")  # the same receipt again: stale, harmless
    v.step()
    assert v.inbox.counters["acks_stale"] == 3
    assert v.store.cursor == 2401


def test_a_short_export_covers_a_prefix_and_the_rest_follows(tmp_path: Path) -> None:
    v = vehicle(tmp_path, streams=4, per_stream=500)
    m1 = export(v, tmp_path / "b1", chunk_events=600, max_events=1000)
    assert (m1.complete, m1.stopped, m1.events, m1.top) == (False, "max_events", 1000, 1000)
    fleet = CollectorStore(tmp_path / "collector.db")
    import_bundle(fleet, tmp_path / "b1", fleet_signer())
    queue(v, Receipt.decode((tmp_path / "b1" / RECEIPT_NAME).read_bytes()))
    v.step()
    assert v.store.cursor == 1001
    m2 = export(v, tmp_path / "b2")  # starts at the cursor the receipt moved
    assert (m2.cursor, m2.top, m2.complete) == (1001, 2000, True)
    assert m2.export != m1.export
    assert batch_id(m2.export, 1) >> CHUNK_BITS == m2.export


def test_export_refuses_the_vehicles_disk_a_missing_stick_and_a_used_directory(
    tmp_path: Path,
) -> None:
    v = vehicle(tmp_path, streams=1, per_stream=10)
    with pytest.raises(BundleError, match=r"is on the file system of .*agent\.db"):
        export(v, tmp_path / "b", database=v.store.path)
    with pytest.raises(BundleError, match="does not exist: is the stick mounted"):
        export(v, tmp_path / "not-mounted" / "b")
    export(v, tmp_path / "b")
    with pytest.raises(BundleError, match="already holds a bundle"):
        export(v, tmp_path / "b")
    assert v.store.event_count == 10, "an export deletes nothing"


def test_a_flipped_byte_refuses_the_whole_bundle(tmp_path: Path) -> None:
    v = vehicle(tmp_path)
    export(v, tmp_path / "b", chunk_events=1000)
    chunk = tmp_path / "b" / "0003-events.msgpack"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    fleet = CollectorStore(tmp_path / "collector.db")
    with pytest.raises(BundleError, match=r"0003-events\.msgpack: SHA-256 differs"):
        import_bundle(fleet, tmp_path / "b", fleet_signer())
    assert fleet.keys(VEHICLE) == set(), "nothing of a refused bundle is stored"
    assert not (tmp_path / "b" / RECEIPT_NAME).exists(), "nor acked"
    result = run_collector("import", str(tmp_path / "b"), "--db", str(tmp_path / "c2.db"),
                           "--signing-key", str(fleet_keys()[0]),
                           "--vehicle-keys", str(vehicle_keys(VEHICLE)[1]))  # fmt: skip
    assert result.returncode == 1
    assert "0003-events.msgpack" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_truncated_or_incomplete_bundles_are_refused(tmp_path: Path) -> None:
    v = vehicle(tmp_path)
    fleet = CollectorStore(tmp_path / "collector.db")
    for name, damage, message in [
        ("manifest", lambda b: truncate(b / MANIFEST_NAME), "manifest.json: its SHA-256"),
        ("chunk", lambda b: truncate(b / "0002-events.msgpack"), "0002-events.msgpack: .* trunc"),
        ("sums", lambda b: (b / SUMS_NAME).unlink(), "SHA256SUMS: missing: the bundle is inc"),
        ("extra", lambda b: append_line(b / SUMS_NAME), "SHA256SUMS: does not list exactly"),
    ]:  # fmt: skip
        bundle = tmp_path / name
        export(v, bundle, chunk_events=1000)
        damage(bundle)
        with pytest.raises(BundleError, match=message):
            import_bundle(fleet, bundle, fleet_signer())
    assert fleet.keys(VEHICLE) == set()
    # A manifest truncated *and* re-summed (a buggy copy tool) still fails: it is not JSON.
    bundle = tmp_path / "resummed"
    export(v, bundle, chunk_events=1000)
    truncate(bundle / MANIFEST_NAME)
    lines = (bundle / SUMS_NAME).read_text().splitlines()
    digest = subprocess.run(["sha256sum", MANIFEST_NAME], cwd=bundle, capture_output=True,
                            text=True, check=True).stdout.split()[0]  # fmt: skip
    (bundle / SUMS_NAME).write_text("\n".join([f"{digest}  {MANIFEST_NAME}", *lines[1:]]) + "\n")
    with pytest.raises(BundleError, match=r"manifest.json: not JSON .*truncated\?"):
        import_bundle(fleet, bundle, fleet_signer())


def test_only_a_bundle_signed_by_its_vehicle_is_imported(tmp_path: Path) -> None:
    """The stick travels outside the broker's authentication: the collector checks the
    vehicle's signature on SHA256SUMS before storing anything (agent/bundlesig.py)."""
    v = vehicle(tmp_path)
    fleet = CollectorStore(tmp_path / "collector.db")
    other = Ed25519PrivateKey.generate()
    cases: list[tuple[str, dict[str, Any], Any, str]] = [
        ("unsigned", {"signing_key": None}, None, "SIGNATURE: missing: the bundle is not signed"),
        ("other-key", {"signing_key": other}, None, "does not verify with the vehicle's key"),
        # Altered after signing, SHA256SUMS recomputed to match: the signature catches it.
        ("resummed", {}, resum_after_flip, "does not verify with the vehicle's key"),
        ("garbage", {}, lambda b: (b / SIGNATURE_NAME).write_bytes(b"\x00" * 10), "not JSON"),
        ("huge", {}, lambda b: (b / SIGNATURE_NAME).write_bytes(b" " * 5000), "is over 4096"),
    ]
    for name, kwargs, damage, message in cases:
        bundle = tmp_path / name
        export(v, bundle, chunk_events=1000, **kwargs)
        if damage is not None:
            damage(bundle)
        with pytest.raises(BundleError, match=message):
            import_bundle(fleet, bundle, fleet_signer(), vehicle_keys=keys())
    assert fleet.keys(VEHICLE) == set(), "nothing of a refused bundle is stored"
    # Signed by vehicle A's key, claiming to be vehicle B: B's key does not verify it.
    forged = tmp_path / "forged"
    export_bundle(lambda: reading(v.store.path), forged, v.state_dir / EXPORTS_DIR, "truck-b",
                  signing_key=load_private_key(str(vehicle_keys(VEHICLE)[0])))  # fmt: skip
    shutil.copy(vehicle_keys("truck-b")[1] / "truck-b.pub", vehicle_keys(VEHICLE)[1])
    with pytest.raises(BundleError, match="does not verify"):
        import_bundle(fleet, forged, fleet_signer(), vehicle_keys=keys())
    # A vehicle without a registered key, and one whose id cannot name a file.
    for stranger, message in [("truck-z", "no public key for vehicle 'truck-z'"),
                              ("truck z", "cannot name a key file")]:  # fmt: skip
        bundle = tmp_path / f"stranger-{stranger.replace(' ', '_')}"
        export_bundle(lambda: reading(v.store.path), bundle, v.state_dir / EXPORTS_DIR,
                      stranger, signing_key=other)  # fmt: skip
        with pytest.raises(BundleError, match=re.escape(message)):
            import_bundle(fleet, bundle, fleet_signer(), vehicle_keys=keys())
    # The command line insists on a check, unless told this is a lab.
    unchecked = run_collector("import", str(tmp_path / "other-key"), "--db",
                              str(tmp_path / "c2.db"), "--signing-key",
                              str(fleet_keys()[0]))  # fmt: skip
    assert unchecked.returncode == 2
    assert "import needs --vehicle-keys DIR" in unchecked.stderr
    lab = run_collector("import", str(tmp_path / "other-key"), "--db", str(tmp_path / "c2.db"),
                        "--unsigned", "--json")  # fmt: skip
    assert lab.returncode == 0, lab.stderr
    assert "bundle_unverified" in lab.stderr


def resum_after_flip(bundle: Path) -> None:
    """Flip a byte of a chunk, then rewrite the manifest's digest and SHA256SUMS to match,
    as someone who knows the format (but not the vehicle's key) would."""
    chunk = bundle / "0002-events.msgpack"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    digest = hashlib.sha256(bytes(data)).hexdigest()
    manifest = json.loads((bundle / MANIFEST_NAME).read_bytes())
    old = next(c["sha256"] for c in manifest["chunks"] if c["file"] == chunk.name)
    text = (bundle / MANIFEST_NAME).read_text().replace(old, digest)
    (bundle / MANIFEST_NAME).write_text(text)
    sums = (bundle / SUMS_NAME).read_text().replace(old, digest).splitlines()
    sums[0] = f"{hashlib.sha256(text.encode()).hexdigest()}  {MANIFEST_NAME}"
    (bundle / SUMS_NAME).write_text("\n".join(sums) + "\n")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def append_line(path: Path) -> None:
    with path.open("a") as fh:
        fh.write(f"{'0' * 64}  9999-events.msgpack\n")


def exported_and_imported(tmp_path: Path) -> tuple[Vehicle, Manifest, Receipt]:
    v = vehicle(tmp_path)
    manifest = export(v, tmp_path / "b", chunk_events=1000)
    import_bundle(CollectorStore(tmp_path / "collector.db"), tmp_path / "b", fleet_signer())
    return v, manifest, Receipt.decode((tmp_path / "b" / RECEIPT_NAME).read_bytes())


def test_forged_receipts_are_refused_and_counted(tmp_path: Path) -> None:
    v, manifest, genuine = exported_and_imported(tmp_path)
    # Another key signs exactly the same acks.
    other = FleetSigner(Ed25519PrivateKey.generate())
    wrong_key = Receipt(VEHICLE, genuine.export, tuple(
        other.sign_ack(VEHICLE, Ack(a.batch_id, a.kind, a.stored, a.duplicates, a.digest, a.issued))
        for a in genuine.acks))  # fmt: skip
    # The right key, but a digest that is not the chunk's (the collector got other bytes).
    signer = fleet_signer()
    wrong_digest = Receipt(VEHICLE, genuine.export, tuple(
        signer.sign_ack(VEHICLE, Ack(a.batch_id, a.kind, a.stored, a.duplicates,
                                     batch_digest(b"other bytes"), a.issued))
        for a in genuine.acks))  # fmt: skip
    # The CLI refuses both before anything is queued.
    for forged, reason in ((wrong_key, "bad_signature=4"), (wrong_digest, "digest_mismatch=4")):
        with pytest.raises(ReceiptError, match=f"4 of 4 acks refused \\({reason}\\); nothing"):
            check_receipt(forged.encode(), "r", auth(), v.state_dir)
    # The daemon checks again whatever reaches its inbox.
    queue(v, wrong_key, "1-1.receipt")
    queue(v, wrong_digest, "1-2.receipt")
    v.step()
    assert v.inbox.counters["bad_signature"] == 4
    assert v.inbox.counters["digest_mismatch"] == 4
    assert v.store.cursor == 1
    assert v.resync.delivered == 0
    assert not list((v.state_dir / INBOX_DIR).iterdir()), "refused receipts are removed"

    # A ledger rewritten to claim a longer run for a genuine ack: the daemon rebuilds the
    # chunk from its rows, the digest differs, nothing moves (the CLI's check passes).
    ledger = v.state_dir / EXPORTS_DIR / f"{manifest.export}.json"
    doc = json.loads(ledger.read_text())
    doc["chunks"][-1]["last"] = doc["top"] = 2399  # one row less than the chunk holds
    ledger.write_text(json.dumps(doc))
    check_receipt(genuine.encode(), "r", auth(), v.state_dir)
    queue(v, genuine, "1-3.receipt")
    v.step()
    assert v.inbox.counters["store_mismatch"] == 1
    assert v.resync.delivered == 2000  # the two chunks the ledger did not alter
    assert v.store.cursor == 2001


def test_a_receipt_for_an_unknown_export_is_ignored(tmp_path: Path) -> None:
    v, _manifest, genuine = exported_and_imported(tmp_path)
    unknown = (genuine.export % MAX_EXPORT_ID) + 1
    stray = Receipt(VEHICLE, unknown, genuine.acks)
    with pytest.raises(ReceiptError, match=f"no export {unknown} in"):
        check_receipt(stray.encode(), "r", auth(), v.state_dir)
    other_vehicle = Receipt("truck-0043", genuine.export, genuine.acks)
    with pytest.raises(ReceiptError, match="a receipt for vehicle 'truck-0043'"):
        check_receipt(other_vehicle.encode(), "r", auth(), v.state_dir)
    queue(v, stray, "1-1.receipt")
    queue(v, other_vehicle, "1-2.receipt")
    (v.state_dir / INBOX_DIR / "1-3.receipt").write_bytes(b"\x93\x01garbage")
    v.step()
    assert v.inbox.counters["unknown_export"] == 1
    assert v.inbox.counters["wrong_vehicle"] == 1
    assert v.inbox.counters["undecodable"] == 1
    assert v.inbox.counters["bug"] == 0
    assert v.store.cursor == 1
    assert not list((v.state_dir / INBOX_DIR).iterdir())


def test_caps_at_max_and_max_plus_one(tmp_path: Path) -> None:
    at_max = msgpack.packb(["x" * (MAX_RECEIPT_BYTES - 10)]).ljust(MAX_RECEIPT_BYTES, b"\x00")
    assert len(at_max) == MAX_RECEIPT_BYTES
    with pytest.raises(ReceiptError, match="not a receipt") as found:  # read, then refused
        Receipt.decode(at_max)
    assert "over the cap" not in str(found.value)
    with pytest.raises(ReceiptError, match="over the cap"):
        Receipt.decode(b"\x00" * (MAX_RECEIPT_BYTES + 1))
    with pytest.raises(BundleError, match="over 2097152 bytes"):
        Manifest.from_json(b" " * (MAX_MANIFEST_BYTES + 1), "m")
    v = vehicle(tmp_path, streams=1, per_stream=10)
    good = json.loads(export(v, tmp_path / "b").to_json())
    chunk = good["chunks"][-1]
    for count, ok in ((MAX_CHUNKS, True), (MAX_CHUNKS + 1, False)):
        doc = dict(good, chunks=[], events=count, state_events=0, top=count)
        for index in range(1, count + 1):
            doc["chunks"].append(dict(chunk, file=f"{index:04d}-events.msgpack", first=index,
                                      last=index, events=1,
                                      batch=batch_id(good["export"], index)))  # fmt: skip
        data = json.dumps(doc).encode()
        assert len(data) <= MAX_MANIFEST_BYTES
        if ok:
            assert len(Manifest.from_json(data, "m").chunks) == MAX_CHUNKS
        else:
            with pytest.raises(BundleError, match="at most 4095"):
                Manifest.from_json(data, "m")
    # Export batch ids never meet the live uplink's (run_id << 32 | n, run_id >= 1).
    assert batch_id(MAX_EXPORT_ID, MAX_CHUNKS) < (1 << 32) | 1


def test_decoders_are_total(tmp_path: Path) -> None:
    v, _manifest, genuine = exported_and_imported(tmp_path)
    receipt = genuine.encode()
    manifest = (tmp_path / "b" / MANIFEST_NAME).read_bytes()
    rng = random.Random(15)
    for _ in range(3000):
        for data, decode, error in (
            (receipt, Receipt.decode, ReceiptError),
            (manifest, lambda d: Manifest.from_json(d, "m"), BundleError),
        ):
            mutated = bytearray(data[: rng.randrange(len(data) + 1)])
            for _ in range(rng.randrange(4)):
                if mutated:
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            with contextlib.suppress(error):
                decode(bytes(mutated))
    assert v.inbox.counters["bug"] == 0
