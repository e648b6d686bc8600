"""`ironfleet-collector`'s command line: parse, call fleet/collector.py and fleet/importer.py,
print, map errors to exit codes.

Six subcommands; `run`, `replay` and `import` take exactly one of `--signing-key` and
`--unsigned`. A usage error exits 2 with click's message naming the option, as in every
IronFleet entry point. `main` returns the exit status instead of raising SystemExit, for
in-process callers (tests/collector, tests/pgharness.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Final

import click

from agent.errors import AgentError, CommitFailed, ConfigError
from agent.fleet_auth import FleetSigner, key_fingerprint, keygen, load_private_key
from agent.version import DISTRIBUTION
from firmware_bridge.clickrun import run_click
from fleet.collector import Collector, CollectorStore, FleetStore, WriterPool, open_store
from fleet.importer import VehicleKeys, import_bundle
from fleet.subscriber import FleetSubscriber

log = logging.getLogger("fleet.collector")  # the name the collector's log lines always had

DB_HELP: Final = "the collector's SQLite file, or a postgresql://... URL (shared by N collectors)"


def _signing_options(f: Callable[..., int]) -> Callable[..., int]:
    """`--signing-key FILE` or `--unsigned`: exactly one (checked by `_signing_choice`)."""
    unsigned = "unsigned acks/commands (agents with allow_unsigned only)"
    f = click.option("--unsigned", is_flag=True, help=unsigned)(f)
    return click.option("--signing-key", metavar="FILE",
                        help="the fleet's Ed25519 private key (PEM; see keygen)")(f)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name=DISTRIBUTION, prog_name="ironfleet-collector",
                      message="%(prog)s %(version)s")  # fmt: skip
def cli() -> None:
    """Reference fleet-side consumer: store, deduplicate, converge, ack."""
    logging.basicConfig(stream=sys.stdout, level=logging.INFO,
                        format="%(asctime)s level=%(levelname)s logger=%(name)s "
                        "%(message)s")  # fmt: skip


@cli.command("run")
@click.option("--broker", default="127.0.0.1:1883", help="host:port of the broker")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--vehicle", "vehicles", multiple=True, help="only these (repeatable)")
@click.option("--client-id", help="MQTT client id (default: ironfleet-collector; "
              "with --group collector-<host>-<pid>)")  # fmt: skip
@click.option("--group", help="MQTT shared-subscription group: N collectors split the "
              "vehicles ($share/GROUP/...; MQTT 5, docs/fleet-deployment.md)")  # fmt: skip
@click.option("--session-expiry", type=int, default=60, metavar="SECONDS",
              help="with --group: the broker drops our session (and stops dealing us "
              "messages) this long after we disconnect")  # fmt: skip
@click.option("--store-wait", type=float, default=60.0, metavar="SECONDS",
              help="at start, keep trying to open the database this long (PostgreSQL "
              "restarting, the network coming up) before giving up")  # fmt: skip
@click.option("--writers", type=int, default=0, metavar="N",
              help="threads storing batches, each with its own database connection "
              "(default: 1 for SQLite, 3 for PostgreSQL)")  # fmt: skip
@_signing_options
def run_command(*, broker: str, signing_key: str | None, unsigned: bool, db: str,
                vehicles: tuple[str, ...], client_id: str | None, group: str | None,
                session_expiry: int, store_wait: float, writers: int) -> int:  # fmt: skip
    """subscribe and collect until SIGTERM"""
    signer = _signer(signing_key, unsigned)
    host, port = _broker(broker)
    return _run(signer, host, port, db=db, vehicles=vehicles, client_id=client_id,
                group=group or "", session_expiry=session_expiry, store_wait=store_wait,
                writers=writers)  # fmt: skip


@cli.command("report")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table")
def report_command(db: str, as_json: bool) -> int:
    """print per-vehicle figures from the database"""
    return _database_command(lambda: _report(open_store(db), as_json))


@cli.command("replay")
@click.option("--broker", default="127.0.0.1:1883", help="host:port of the broker")
@click.option("--vehicle", required=True, help="vehicle id")
@_signing_options
def replay_command(broker: str, vehicle: str, signing_key: str | None, unsigned: bool) -> int:
    """ask a vehicle to resend state and backlog"""
    signer = _signer(signing_key, unsigned)
    host, port = _broker(broker)
    sub = FleetSubscriber(host, port, lambda *_: None, client_id="ironfleet-replay")
    sub.start()
    deadline = time.monotonic() + 10
    while not sub.connected and time.monotonic() < deadline:
        time.sleep(0.05)
    Collector(CollectorStore(":memory:"), sub, signer).request_replay(vehicle)
    time.sleep(0.5)
    sub.stop()
    return 0 if sub.connected else 1


@cli.command("retention")
@click.option("--db", required=True, help="postgresql://... URL of the fleet database")
@click.option("--keep-days", type=int, required=True, help="full days kept before today")
def retention_command(db: str, keep_days: int) -> int:
    """PostgreSQL: drop event partitions past N days"""
    return _database_command(lambda: _retention(db, keep_days))


@cli.command("import")
@click.argument("bundle")
@click.option("--db", required=True, help=DB_HELP)
@click.option("--receipt", help="receipt file to write (default: BUNDLE/receipt.msgpack)")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a line of text")
@click.option("--vehicle-keys", metavar="DIR",
              help="the vehicles' public keys (<vehicle id>.pub): the bundle must be "
              "signed by its vehicle (required unless --unsigned)")  # fmt: skip
@_signing_options
def import_command(*, bundle: str, db: str, receipt: str | None, as_json: bool,
                   vehicle_keys: str | None, signing_key: str | None,
                   unsigned: bool) -> int:  # fmt: skip
    """load a bundle from `ironfleet export`; write its receipt

    BUNDLE is the bundle directory (on the USB stick)."""
    _signing_choice(signing_key, unsigned)
    if vehicle_keys is None and not unsigned:
        print("ironfleet-collector: import needs --vehicle-keys DIR (each vehicle's public key, "
              "<vehicle id>.pub) to check who wrote the bundle; --unsigned skips every "
              "signature (lab only)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        signer = None if signing_key is None else FleetSigner(load_private_key(signing_key))
        keys = VehicleKeys(Path(vehicle_keys)) if vehicle_keys else None
    except ConfigError as exc:
        print(f"ironfleet-collector: {exc}", file=sys.stderr)
        return 2
    # On stderr, not the log: an import is a command a person runs and reads.
    if signer is None:
        print("ironfleet-collector: warning: collector_unsigned: the receipt's acks are not "
              "signed; agents with a fleet key refuse them (lab only)",
              file=sys.stderr)  # fmt: skip
    if keys is None:
        print("ironfleet-collector: warning: bundle_unverified: nothing checks which vehicle "
              "wrote the bundle (--unsigned without --vehicle-keys; lab only)",
              file=sys.stderr)  # fmt: skip
    try:
        result = import_bundle(open_store(db), Path(bundle), signer, vehicle_keys=keys,
                               receipt_path=Path(receipt) if receipt else None)  # fmt: skip
    except (AgentError, sqlite3.Error) as exc:
        print(f"ironfleet-collector: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(asdict(result)))
    else:
        rate = result.events / result.seconds if result.seconds else 0.0
        print(f"{result.vehicle} export {result.export}: {result.chunks} chunks, "
              f"{result.events} events ({result.stored} new, {result.duplicates} already held) "
              f"in {result.seconds:.2f} s ({rate:,.0f} events/s); receipt {result.receipt}: "
              "on the vehicle, `ironfleet import-receipt` it")  # fmt: skip
    return 0


@cli.command("keygen")
@click.option("--private", required=True, help="private key file to create (0600)")
@click.option("--public", required=True, help="public key file for the agents")
def keygen_command(private: str, public: str) -> int:
    """create the fleet's Ed25519 signing key pair"""
    try:
        made = keygen(Path(private), Path(public))
    except OSError as exc:
        print(f"ironfleet-collector: {exc}", file=sys.stderr)
        return 2
    print(f"private key {private} (keep on the collector), public key {public} "
          "(every agent's [uplink] fleet_key_file); fingerprint "
          f"{key_fingerprint(made)} (ironfleet doctor shows the "
          "agent's)")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`ironfleet-collector` on `argv` (None: sys.argv[1:]): the command's exit status."""
    return run_click(cli, argv, "ironfleet-collector")


def _signing_choice(signing_key: str | None, unsigned: bool) -> None:
    """A usage error (exit 2) unless exactly one of --signing-key and --unsigned is given."""
    if signing_key is not None and unsigned:
        raise click.UsageError("--signing-key and --unsigned exclude each other: give one")
    if signing_key is None and not unsigned:
        raise click.UsageError("give --signing-key FILE or --unsigned")


def _signer(signing_key: str | None, unsigned: bool) -> FleetSigner | None:
    """The fleet's signer, None for --unsigned; exits 2 when the key does not load."""
    _signing_choice(signing_key, unsigned)
    if signing_key is None:
        log.warning("collector_unsigned: acks and commands are not signed; agents with a "
                    "fleet key drop them (lab brokers only)")  # fmt: skip
        return None
    try:
        return FleetSigner(load_private_key(signing_key))
    except ConfigError as exc:
        print(f"ironfleet-collector: {exc}", file=sys.stderr)
        raise click.exceptions.Exit(2) from None


def _broker(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return (host or "127.0.0.1"), int(port or 1883)


def _redact(db: str) -> str:
    """A database URL without its password, for logs."""
    head, at, tail = db.rpartition("@")
    if not at or "://" not in head:
        return db
    scheme, _, creds = head.partition("://")
    return f"{scheme}://{creds.split(':', 1)[0]}@{tail}"


def _database_command(command: Callable[[], int]) -> int:
    """`report` and `retention`: the database only, no broker."""
    try:
        return command()
    except CommitFailed as exc:
        print(f"ironfleet-collector: {exc}", file=sys.stderr)
        return 1


def _report(store: FleetStore, as_json: bool) -> int:
    for row in store.report():
        if as_json:
            print(json.dumps(row))
        else:
            print(
                f"{row['vehicle']}: status={row['status']} events={row['events']} "
                f"duplicates={row['duplicates_received']} streams={row['streams']} "
                f"missing_in_sequence={row['missing_in_sequence']}"
            )
    return 0


def _retention(db: str, keep_days: int) -> int:
    if not db.startswith(("postgresql://", "postgres://")) or keep_days < 1:
        print("ironfleet-collector: retention needs a postgresql:// --db and --keep-days >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    from fleet.pgstore import PgCollectorStore  # noqa: PLC0415 - optional dependency

    store = PgCollectorStore(db)
    made = store.ensure_partitions()
    dropped, deleted = store.retention(keep_days)
    print(f"dropped {len(dropped)} partitions {' '.join(dropped)}; deleted {deleted} rows "
          f"from events_default; created {len(made)} ahead")  # fmt: skip
    return 0


def _open_waiting(db: str, seconds: float) -> FleetStore:
    """`open_store`, tried again with a growing pause (0.2 s to 5 s) for up to `seconds`:
    a collector started while PostgreSQL restarts ("the database system is starting up")
    or before the network is up would otherwise exit at once (seen in the 3-collector chaos
    test: a collector restarted just before a PostgreSQL crash stayed down)."""
    deadline = time.monotonic() + max(0.0, seconds)
    pause = 0.2
    while True:
        try:
            return open_store(db)
        except CommitFailed as exc:
            if time.monotonic() + pause > deadline:
                raise
            log.warning("collector_store_unavailable error=%r retry_in=%.1fs", str(exc)[:200],
                        pause)  # fmt: skip
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


def _run(signer: FleetSigner | None, host: str, port: int, *, db: str,
         vehicles: tuple[str, ...], client_id: str | None, group: str,
         session_expiry: int, store_wait: float, writers: int) -> int:  # fmt: skip
    """`run`: subscribe (alone, or as one member of a share group) until SIGTERM."""
    try:
        store = _open_waiting(db, store_wait)
    except CommitFailed as exc:
        print(f"ironfleet-collector: {exc}", file=sys.stderr)
        return 1
    collector = Collector(store, signer=signer)
    if any(c in group for c in "/+#"):
        print("ironfleet-collector: --group must not contain '/', '+' or '#'", file=sys.stderr)
        return 2
    # In a group, unique per instance: two collectors with one id take each other's
    # session over. Alone, a fixed id lets a restart resume the session the broker queued.
    client_id = client_id or (
        f"collector-{socket.gethostname()}-{os.getpid()}" if group else "ironfleet-collector"
    )
    pg = db.startswith(("postgresql://", "postgres://"))
    writers = max(1, writers or (3 if pg else 1))
    pool = WriterPool(collector.handle, writers) if writers > 1 else None
    sub = FleetSubscriber(host, port, pool.submit if pool else collector.handle,
                          client_id=client_id, vehicles=vehicles, share_group=group,
                          session_expiry=session_expiry,
                          on_session_lost=collector.session_lost)  # fmt: skip
    collector.transport = sub
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sub.start()
    log.info("collector_started broker=%s:%d client_id=%s group=%s db=%s", host, port,
             client_id, group or "-", _redact(db))  # fmt: skip
    while not stop.wait(0.2):
        pass
    sub.stop()
    if pool is not None:
        pool.stop()
    log.info(
        "collector_stopped acks=%d bad_messages=%d", collector.acks_sent, collector.bad_messages
    )
    return 0
