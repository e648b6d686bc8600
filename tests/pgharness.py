"""The fleet side's harness, for tests/fleet, tests/chaos/test_fleet_pg.py and
bench/bench_fleet.py: a throwaway PostgreSQL cluster, `ironfleet-collector` processes
(optionally with one deliberate bug patched in, the chaos suite's control) and the
PostgreSQL oracle. The load generator they judge is in fleetload.py.

The cluster: initdb + pg_ctl in a temporary directory, listening on a free 127.0.0.1
port (and a unix socket in the same directory), never a mock.

`make test` installs the Debian `postgresql` package (Makefile, system-deps); its server
binaries live in /usr/lib/postgresql/<major>/bin, off PATH, so they are looked for there.
initdb refuses to run as root, so as root the cluster belongs to the unprivileged
`postgres` user the package creates (or `nobody`), started through runuser; the cluster
directory is made in /tmp and chowned, since pytest's own tmp dirs are 0700 root.

One cluster per test session (`shared_cluster`), one database per test module
(`PgCluster.create_database`): initdb costs ~1.5 s, a database ~0.1 s.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import psycopg

from agent.fleet import Ack, Batch, FleetMessageError, batch_digest, parse_topic
from agent.resilience import Event, replay

from fleetload import FleetLoad, Key

START_TIMEOUT = 60.0  # seconds for pg_ctl -w: a loaded CI machine replays WAL slowly
USER = "ironfleet"  # the cluster's superuser (initdb -U), trusted on loopback only


def pg_bindir() -> Path:
    """Directory of initdb/pg_ctl/postgres: the newest /usr/lib/postgresql/*/bin, else
    `pg_config --bindir`. AssertionError naming the package when there is none."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    pg_config = shutil.which("pg_config")
    if pg_config:
        bindir = Path(
            subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        if (bindir / "initdb").exists():
            return bindir
    raise AssertionError(
        "PostgreSQL is not installed: `make test` installs it (apt-get install postgresql)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> list[str]:
    """Prefix that runs a command as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return []
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return ["runuser", "-u", name, "--"]
    raise AssertionError("running as root with neither a 'postgres' nor a 'nobody' user")


@dataclass
class PgCluster:
    """A private PostgreSQL server: `start()`, `stop(mode)`, `restart()`, `url(db)`."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ironfleet-pg-")))
    port: int = 0
    starts: int = 0

    def __post_init__(self) -> None:
        self.bindir = pg_bindir()
        self.port = self.port or free_port()
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.prefix = _run_as()
        if self.prefix:
            user = pwd.getpwnam(self.prefix[2])
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.root.chmod(0o700)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            USER,
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        # Small and quick to restart, with the durability settings of production:
        # fsync and synchronous_commit stay on, since acks follow commits.
        conf = [
            f"port = {self.port}",
            "listen_addresses = '127.0.0.1'",
            f"unix_socket_directories = '{self.root}'",
            "shared_buffers = 128MB",
            "max_connections = 50",
            "fsync = on",
            "synchronous_commit = on",
            "max_wal_size = 1GB",
            "logging_collector = off",
            "log_min_messages = warning",
        ]
        with (self.data / "postgresql.conf").open("a") as fh:
            fh.write("\n".join(conf) + "\n")

    def _run(self, tool: str, *args: str, timeout: float = START_TIMEOUT) -> None:
        cmd = [*self.prefix, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise AssertionError(f"{tool} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> PgCluster:
        self.starts += 1
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            "start",
        )
        return self

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (clean), or `immediate` (a crash: WAL replay at start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> str:
        """A fresh, empty database (dropped first if a previous run left it); its URL."""
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def query(self, db: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Rows of one read query in database `db` (a short autocommit connection)."""
        with psycopg.connect(self.url(db), autocommit=True) as conn:
            return conn.execute(sql, params or None).fetchall()

    def destroy(self) -> None:
        if self.running():
            with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


_SHARED: list[PgCluster] = []


def shared_cluster(request: Any) -> PgCluster:
    """The session's one cluster, started on first use and destroyed at the session's end
    (call from a session-scoped fixture; `request` is its FixtureRequest)."""
    if not _SHARED:
        cluster = PgCluster()
        _SHARED.append(cluster)
        request.session.config.add_cleanup(cluster.destroy)
        cluster.start()
    cluster = _SHARED[0]
    if not cluster.running():
        cluster.start()  # a test that stopped it and failed before restarting
    return cluster


def wait_accepting(cluster: PgCluster, timeout: float = 30.0) -> None:
    """Wait until the server accepts connections (after a restart)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with psycopg.connect(cluster.url(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# -- collectors ------------------------------------------------------------------------------

COLLECTOR = str(Path(sys.executable).with_name("ironfleet-collector"))


@dataclass
class CollectorProc:
    """One `ironfleet-collector run` process in a share group, started and killed by PID.

    With `broken`, the same CLI runs with that bug patched in (`python pgharness.py
    broken-collector VARIANT ...`, like tests/chaos/broken.py for the agent)."""

    workdir: Path
    url: str
    port: int
    client_id: str
    signing_key: Path
    group: str = "fleet"
    broken: str | None = None
    session_expiry: int = 30
    writers: int = 0  # 0: the CLI's default
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.workdir / f"{self.client_id}.log"

    def start(self) -> CollectorProc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = ["run", "--db", self.url, "--broker", f"127.0.0.1:{self.port}"]
        args += ["--client-id", self.client_id, "--signing-key", str(self.signing_key)]
        if self.writers:
            args += ["--writers", str(self.writers)]
        if self.group:  # else the single collector of old (MQTT 3.1.1, no share)
            args += ["--group", self.group, "--session-expiry", str(self.session_expiry)]
        if self.broken:
            cmd = [sys.executable, __file__, "broken-collector", self.broken, *args]
        else:
            cmd = [COLLECTOR, *args]
        self.starts += 1
        with self.log.open("ab") as fh:
            fh.write(f"--- start {self.starts}\n".encode())
            fh.flush()
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def connected(self) -> bool:
        """Connected (and subscribing) since its latest start."""
        return "collector_connected" in self.text().rsplit("--- start", 1)[-1]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def in_transaction(self, cluster: PgCluster) -> bool:
        """Its PostgreSQL backend is inside a transaction right now (a batch's insert)."""
        if not self.alive():
            return False
        assert self.proc is not None
        try:
            conns = psutil.Process(self.proc.pid).net_connections("tcp")
        except psutil.Error:
            return False
        ports = [c.laddr.port for c in conns if c.raddr and c.raddr.port == cluster.port]
        if not ports:
            return False
        rows = cluster.query(
            "postgres",
            "SELECT count(*) FROM pg_stat_activity WHERE client_port = ANY(%s) "
            "AND xact_start IS NOT NULL AND query NOT LIKE 'SHOW%%'",
            ports,
        )
        return bool(rows[0][0])

    def acks(self) -> int:
        """Acks sent by every stopped run (SIGTERM logs `collector_stopped acks=N`)."""
        return sum(
            int(line.split("acks=")[1].split()[0])
            for line in self.text().splitlines()
            if "collector_stopped acks=" in line
        )


# -- the oracle -------------------------------------------------------------------------------


@dataclass
class PgVerdict:
    """The fleet-side oracle against what is in PostgreSQL, as figures (a control asserts
    that it fails)."""

    stored: int  # rows in events
    acked: int  # events in acked batches
    missing_acked: list[tuple[str, Key]]  # acked, not in PostgreSQL
    missing_below_checkpoint: list[tuple[str, Key]]
    stored_twice: list[tuple[Any, ...]]  # (vehicle, stream, boot_epoch, seq, copies)
    state_diff: list[tuple[str, str, Any, Any]]  # (vehicle, stream, state, replay)
    foreign: list[tuple[str, Key]] = field(default_factory=list)  # stored, never sent

    @property
    def ok(self) -> bool:
        return not (
            self.missing_acked
            or self.missing_below_checkpoint
            or self.stored_twice
            or self.state_diff
            or self.foreign
        )

    def describe(self) -> str:
        return (
            f"stored={self.stored} acked={self.acked} "
            f"missing_acked={len(self.missing_acked)} {self.missing_acked[:2]} "
            f"missing_below_checkpoint={len(self.missing_below_checkpoint)} "
            f"stored_twice={len(self.stored_twice)} {self.stored_twice[:2]} "
            f"state_diff={len(self.state_diff)} {self.state_diff[:2]} "
            f"foreign={len(self.foreign)}"
        )


def pg_verdict(url: str, load: FleetLoad) -> PgVerdict:
    """For every vehicle: each acked event in PostgreSQL exactly once, nothing stored that
    was never sent, and the state table equal to `replay` of every event stored."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT vehicle, stream, boot_epoch, seq, ts, kind, priority, payload FROM events"
        ).fetchall()
        twice = conn.execute(
            "SELECT vehicle, stream, boot_epoch, seq, count(*) FROM events "
            "GROUP BY 1, 2, 3, 4 HAVING count(*) > 1"
        ).fetchall()
        state = conn.execute(
            "SELECT vehicle, stream, boot_epoch, seq, payload FROM state"
        ).fetchall()
    stored: dict[str, list[Event]] = {}
    for vehicle, stream, epoch, seq, ts, kind, priority, payload in rows:
        stored.setdefault(vehicle, []).append(
            Event(
                stream,
                seq,
                boot_epoch=epoch,
                ts=ts,
                kind=kind,
                priority=priority,
                payload=bytes(payload),
            )
        )
    keys = {(v, (e.stream, e.boot_epoch, e.seq)) for v, evs in stored.items() for e in evs}
    with load.lock:
        acked = {(n, k) for n, v in load.vehicles.items() for k in v.acked_keys()}
        below = {(n, k) for n, v in load.vehicles.items() for k in v.checkpoint_keys()}
        sent = {(n, k) for n, v in load.vehicles.items() for k in v.truth}
    have = {(v, s): (e, q, bytes(p)) for v, s, e, q, p in state}
    want = {
        (v, e.stream): (e.boot_epoch, e.seq, e.payload)
        for v, evs in stored.items()
        for e in replay(evs)
    }
    diff = [
        (v, s, have.get((v, s)), want.get((v, s)))
        for v, s in sorted(set(have) | set(want))
        if have.get((v, s)) != want.get((v, s))
    ]
    return PgVerdict(
        stored=len(rows),
        acked=len(acked),
        missing_acked=sorted(acked - keys),
        missing_below_checkpoint=sorted(below - keys),
        stored_twice=[tuple(r) for r in twice],
        state_diff=diff,
        foreign=sorted(keys - sent),
    )


# -- deliberate bugs for the controls (run as `python pgharness.py broken-collector ...`) ----


def ack_before_commit() -> None:
    """The collector acks a batch as soon as it decoded it, then stores it: a batch whose
    commit then fails (the server restarting) or never happens (SIGKILL) is acked and
    lost; the vehicle no longer resends it."""
    from fleet import collector  # noqa: PLC0415 - only in the broken process

    def handle(self: collector.Collector, topic_name: str, payload: bytes) -> None:
        try:
            vehicle, kind = parse_topic(topic_name)
            if kind == "status":
                return
            batch = Batch.decode(payload)
        except FleetMessageError:
            return
        ack = Ack(
            batch.batch_id,
            batch.kind,
            len(batch.events),
            0,
            batch_digest(payload),
            int(time.time() * 1000),
        )
        if self.signer is not None:
            ack = self.signer.sign_ack(vehicle, ack)
        self.transport.ack(vehicle, ack.encode())
        self.acks_sent += 1
        with contextlib.suppress(Exception):
            self.store.ingest(batch)

    collector.Collector.handle = handle  # type: ignore[method-assign]


BROKEN: dict[str, Callable[[], None]] = {"ack_before_commit": ack_before_commit}


def _broken_main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in BROKEN:
        print(
            f"usage: pgharness.py broken-collector {{{','.join(BROKEN)}}} ARGS...", file=sys.stderr
        )
        return 2
    BROKEN[argv[0]]()
    print(f"broken_variant name={argv[0]} (a deliberate bug: this run must fail)", flush=True)
    from fleet import collector  # noqa: PLC0415

    return collector.main(argv[1:])


if __name__ == "__main__":
    if sys.argv[1:2] != ["broken-collector"]:
        print("usage: pgharness.py broken-collector VARIANT ARGS...", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(_broken_main(sys.argv[2:]))
