"""`ironfleet doctor`: the checks a technician runs first, in the order they fix things.

Each check (configuration, fleet trust and its key, permissions, database, WAL, device,
disk, clock, daemon, uplink: does what is stored reach the fleet) returns one `Check`
with a status and a line of detail naming the action that fixes a failure. They live apart from the
click commands because they look at the host (files, devices, clock, free space) as well
as at the store, and so that each can be called and tested on its own.
"""

from __future__ import annotations

import glob
import grp
import math
import os
import pwd
import sqlite3
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from agent import config as config_mod
from agent.cliaccess import CliError
from agent.config import Config
from agent.errors import ConfigError
from agent.render import CLOCK_BACK_TOLERANCE, TIME_QUALITY, human_bytes, span
from agent.store import check_integrity
from agent.storedb import held_sql, read_frontiers
from agent.views import (
    Row,
    daemon_view,
    file_bytes,
    flash_view,
    fleet_view,
    links_view,
    read_live,
)

CREDENTIALS: Final = "/run/credentials/"  # systemd LoadCredential=: the service's own
MIN_SANE_YEAR: Final = 2020  # an earlier wall clock was never set (RTC without battery)
CONTROLLER_SKEW_WARN: Final = 60.0  # seconds between a synced controller clock and ours
WAL_WARN_BYTES: Final = 128 * 2**20  # twice the store's journal_size_limit
SKEW_SCAN_ROWS: Final = 1000  # newest events doctor reads to compare controller clocks


# -- doctor ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """One doctor finding: `status` is ok, warn, fail or skip."""

    name: str
    status: str
    detail: str


def check_config(path: str) -> tuple[Check, Config | None]:
    """The configuration file loads and validates exactly as the daemon would load it."""
    try:
        config = config_mod.load(path)
    except ConfigError as exc:
        return Check("config", "fail", str(exc)), None
    devices = ", ".join(s.device for s in config.serials)
    plural = "devices" if len(config.serials) > 1 else "device"
    return Check("config", "ok", f"{path}: valid ({plural} {devices})"), config


def _mode(path: Path) -> str:
    """`drwxr-x--- ironfleet:ironfleet`, numeric ids where no name is known."""
    st = path.stat()
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.filemode(st.st_mode)} {user}:{group}"


def check_permissions(db: Path) -> Check:
    """State directory and database readable by us, not writable by everyone."""
    folder = db.parent
    status, problems = "ok", []
    try:
        detail = f"{folder} {_mode(folder)}"
        if not os.access(folder, os.R_OK | os.X_OK):
            problems.append("directory not readable by you: technicians need the 'ironfleet' group")
        elif not db.exists():
            problems.append(f"no {db.name} in it")
        else:
            detail += f", {db.name} {_mode(db)}"
            for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
                if path.exists() and not os.access(path, os.R_OK):
                    problems.append(f"{path.name} not readable by you ({_mode(path)})")
            if (folder.stat().st_mode | db.stat().st_mode) & stat.S_IWOTH:
                problems.append("writable by everyone")
        if folder.stat().st_mode & stat.S_IRWXO and not problems:
            status, problems = "warn", ["open to everyone (the unit uses StateDirectoryMode=0750)"]
    except OSError as exc:
        return Check("permissions", "fail", f"{exc.filename}: {exc.strerror}")
    if problems and status == "ok":
        status = "fail"
    return Check("permissions", status, "; ".join([detail, *problems]))


def resolve_device(pattern: str) -> list[str]:
    """Existing paths for a configured device: the path itself, or a glob's matches."""
    if glob.has_magic(pattern):
        return sorted(glob.glob(pattern))
    return [pattern] if os.path.exists(pattern) else []


def check_devices(config: Config | None, links: list[Row]) -> list[Check]:
    """Each configured serial device (glob resolved) is present; with several
    controllers one check each, named by its [[serial]] entry, with its published link."""
    if config is None:
        return [Check("device", "skip", "needs a valid configuration")]
    several = len(config.serials) > 1
    published = {k["name"]: k for k in links}
    checks = []
    for i, s in enumerate(config.serials):
        # An older agent's snapshot has no names: its one link is the first port's.
        link = published.get(s.label) or (links[0] if i == 0 and len(links) == 1 else None)
        check = check_device(s.device, link["device"] if link else "")
        if several:
            state = (
                f"; link {link['state']}, controller {link['controller'] or 'none'}" if link else ""
            )
            status = (
                "warn" if check.status == "ok" and link and link["state"] != "up" else check.status
            )
            check = Check(f"device {s.label}", status, check.detail + state)
        checks.append(check)
    return checks


def check_device(pattern: str, published: str) -> Check:
    """One configured serial device (glob resolved) is present."""
    found = resolve_device(pattern)
    if not found:
        return Check("device", "fail", f"{pattern}: not present (cable, power, udev rule?)")
    target = os.path.realpath(found[0])
    kind = "character device" if stat.S_ISCHR(os.stat(target).st_mode) else "not a tty"
    detail = f"{pattern} -> {found[0]} ({target}, {kind})"
    if len(found) > 1:
        detail += f"; {len(found)} matches, the agent opens the first"
    if published:
        detail += f"; the agent has {published} open"
    return Check("device", "ok" if kind == "character device" else "warn", detail)


def check_disk(config: Config | None, db: Path) -> Check:
    """Free space on the state file system against [store] min_free_bytes."""
    if config is None:
        return Check("disk", "skip", "needs a valid configuration")
    try:
        st = os.statvfs(db.parent)
    except OSError as exc:
        return Check("disk", "fail", f"{db.parent}: {exc.strerror}")
    free = st.f_bavail * st.f_frsize
    floor = config.store.min_free_bytes
    detail = f"{human_bytes(free)} free, floor {human_bytes(floor)} ([store] min_free_bytes)"
    if free < floor:
        return Check("disk", "fail", f"{detail}: below the floor, the buffer is shrinking")
    if free < 2 * floor:
        return Check("disk", "warn", f"{detail}: close to the floor")
    return Check("disk", "ok", detail)


def check_clock(now: float, heartbeat: float | None, skew: float | None) -> Check:
    """Wall clock set, not behind the daemon's heartbeat, close to synced controller clocks."""
    year = datetime.fromtimestamp(now).year
    wall = datetime.fromtimestamp(now).astimezone().isoformat(timespec="seconds")
    if year < MIN_SANE_YEAR:
        return Check("clock", "fail", f"wall clock reads {wall}: never set (NTP, RTC battery?)")
    if heartbeat is not None and heartbeat - now > CLOCK_BACK_TOLERANCE:
        return Check("clock", "fail", f"wall clock {wall} is {span(heartbeat - now)} behind the "
                     "daemon's last heartbeat: the clock moved backwards")  # fmt: skip
    detail = f"wall clock {wall}"
    if skew is not None:
        detail += f"; synced controller clock differs by {span(abs(skew))}"
        if abs(skew) > CONTROLLER_SKEW_WARN:
            return Check("clock", "warn", detail + " (one of the two clocks is wrong)")
    return Check("clock", "ok", detail)


def check_daemon(daemon: Row) -> Check:
    """The daemon publishes its heartbeat (about every second), from this machine and boot."""
    pid, age = daemon["pid"] or "?", daemon["heartbeat_age_s"]
    service = "`systemctl status ironfleet-agent`"
    verdicts = {
        "never": ("fail", "no heartbeat ever published (agent never started?)"),
        "copy": ("warn", f"a copy, not a live agent: written by pid {pid} on host "
                 f"{daemon['host']!r}; run doctor on that vehicle for its live state"),
        "stopped": ("fail", f"stopped cleanly (pid {pid}); {service}"),
        "rebooted": ("fail", f"not running since this machine rebooted (pid {pid} of the "
                     f"earlier boot, no clean stop); {service}"),
        "stuck": ("fail", f"pid {pid} runs but has not written its database for "
                  f"{span(age or 0.0)}: disk full or read-only? {service} shows its alarm"),
        "gone": ("fail", f"last heartbeat {span(age or 0.0)} ago (pid {pid}): stopped or stuck; "
                 f"{service}"),
        "live": ("warn", f"heartbeat {span(age or 0.0)} ago (pid {pid}); alarm: {daemon['alarm']}")
        if daemon["alarm"] else ("ok", f"heartbeat {span(age or 0.0)} ago (pid {pid})"),
    }  # fmt: skip
    status, detail = verdicts[daemon["condition"]]
    return Check("daemon", status, detail)


def read_doctor(conn: sqlite3.Connection, now: float) -> Row:
    """What doctor needs from the live state: heartbeat, opened device, clock skew, and
    what waits for the fleet (count and oldest arrival of the rows it does not hold)."""
    live = read_live(conn)
    fleet = fleet_view(live, conn, now)
    cursor = fleet["cursor"]
    held = held_sql(cursor, read_frontiers(conn, cursor))
    waiting = conn.execute(
        f"SELECT count(*), min(received_at) FROM events WHERE id >= ? AND NOT {held}", (cursor,)
    ).fetchone()
    # The newest events only: bounded whatever the number of streams (1M streams' latest
    # events took 900 MB when read all at once). Non-finite differences are not clocks.
    skews = [
        d for (d,) in conn.execute(
            f"SELECT received_at - ts FROM (SELECT received_at, ts, ts_quality FROM events "
            f"ORDER BY id DESC LIMIT {SKEW_SCAN_ROWS}) WHERE ts_quality = ?",
            (TIME_QUALITY.index("synced"),),
        )
        if isinstance(d, float | int) and math.isfinite(d)
    ]  # fmt: skip
    return {
        "daemon": daemon_view(live, now),
        "links": links_view(live),
        "flash": flash_view(live),
        "fleet_key": live.uplink.fleet_key,
        "rejected": dict(live.uplink.rejected),
        "skew": max(skews, key=abs) if skews else None,
        "fleet": fleet,
        "waiting": int(waiting[0]),
        "oldest_waiting_at": waiting[1] if isinstance(waiting[1], float | int) else None,
    }


Reader = Callable[[Callable[[sqlite3.Connection], Any]], Any]


def check_database(db: Path, read: Reader) -> Check:
    """`PRAGMA quick_check` under the read deadline (it reads the whole file)."""
    try:
        problems = read(check_integrity)
    except CliError as exc:
        message = exc.format_message()
        # A read cut by its deadline or by the WAL bound says nothing about the file.
        cut = "timed out" in message or "read stopped" in message
        return Check("database", "warn" if cut else "fail", message)
    if problems:
        return Check("database", "fail", f"quick_check: {'; '.join(problems[:3])}")
    return Check("database", "ok", f"quick_check ok ({human_bytes(sum(file_bytes(db)))})")


def check_fleet_trust(config: Config | None, found: Row | None) -> Check:
    """Acks and commands from the broker are verified against the fleet's key: the key
    file loads, is the one the running agent uses, and the fleet's messages verify."""
    if config is None:
        return Check("fleet trust", "skip", "configuration invalid")
    if not config.uplink.enabled:
        return Check("fleet trust", "skip", "[uplink] enabled = false")
    # Imported here: `cryptography` costs import time every other command need not pay.
    from agent.fleet_auth import (  # noqa: PLC0415
        key_fingerprint,
        load_public_key,
        trust_warnings,
    )

    warnings = trust_warnings(config.uplink)
    running = found["fleet_key"] if found and found["daemon"]["live"] else ""
    path = config.uplink.fleet_key_file
    if config.uplink.allow_unsigned:
        return Check("fleet trust", "warn", "; ".join(warnings))
    try:
        on_disk = key_fingerprint(load_public_key(path, "[uplink] fleet_key_file"))
    except ConfigError as exc:
        hidden = isinstance(exc.__context__, PermissionError | FileNotFoundError) and (
            running or path.startswith(CREDENTIALS)
        )
        if not hidden:
            return Check("fleet trust", "fail", f"{exc}: install the fleet's public key there "
                         "(`ironfleet-collector keygen` makes it), restart the agent")  # fmt: skip
        # A systemd credential (LoadCredential=) is the service's alone: trust what it loaded.
        on_disk = ""
        warnings.append(f"{path} is not readable here; " + (
            f"the running agent loaded {running}" if running
            else "the agent is not running to show the key it loads"))  # fmt: skip
    if running and on_disk and running != on_disk:
        warnings.append(f"the agent runs with key {running} but {path} now holds {on_disk}: "
                        "restart it to use the file's key")  # fmt: skip
    refused = found["rejected"] if found else {}
    failed = int(refused.get("bad_signature", 0) + refused.get("unsigned", 0))
    if failed:
        warnings.append(f"{failed:,} acks or commands failed verification since the agent "
                        f"started (unsigned or not signed by {running or on_disk}): does the "
                        "collector sign with this fleet's key? compare fingerprints")  # fmt: skip
    if warnings:
        return Check("fleet trust", "warn", "; ".join(warnings))
    return Check("fleet trust", "ok", f"acks and commands verified with {path} "
                 f"(Ed25519 {on_disk or running})")  # fmt: skip


def check_uplink(config: Config | None, found: Row, now: float, max_ack_age: float) -> Check:
    """Does what is stored reach the fleet? FAIL when events wait and the fleet has not
    acknowledged anything for longer than `max_ack_age` seconds (or ever): a heartbeat
    alone said "all well" through a 33-minute broker outage."""
    if config is not None and not config.uplink.enabled:
        return Check("uplink", "skip", "[uplink] enabled = false")
    condition = found["daemon"]["condition"]
    if condition == "copy":
        return Check("uplink", "skip", "a copy of another vehicle's database: run doctor there")
    fleet, waiting = found["fleet"], found["waiting"]
    broker = fleet["broker"] or (f"{config.uplink.host}:{config.uplink.port}" if config else "?")
    state = f"uplink {fleet['uplink']}, breaker {fleet['breaker'] or 'unknown'}, broker {broker}"
    error = f"; last error: {fleet['last_error']}" if fleet["last_error"] else ""
    age = fleet["last_ack_age_s"]
    acked = "never" if age is None else f"{span(age)} ago"
    if waiting and (age is None or age > max_ack_age):
        oldest = found["oldest_waiting_at"]
        since = f", the oldest received {span(max(0.0, now - oldest))} ago" if oldest else ""
        if condition in ("stopped", "gone", "rebooted", "never"):
            action = "the agent is not running: `systemctl start ironfleet-agent`"
        elif fleet["uplink"] == "connected":
            action = ("connected, yet no fleet ack: is a collector subscribed for this vehicle? "
                      "`ironfleet breaker`")  # fmt: skip
        else:
            action = (f"make {broker} reachable from this vehicle and accepting its "
                      "credentials (`ironfleet breaker` shows why it fails)")  # fmt: skip
        return Check("uplink", "fail", f"{waiting:,} events wait{since}; fleet ack {acked} "
                     f"(bound {span(max_ack_age)}); {state}{error}: {action}")  # fmt: skip
    detail = f"{state}; fleet ack {acked}; {waiting:,} events wait"
    if fleet["uplink"] != "connected":
        return Check("uplink", "warn", detail + error)
    return Check("uplink", "ok", detail)


def doctor_checks(
    config_path: str, db: Path, read: Reader, now: float, max_ack_age: float = 600.0
) -> list[Check]:
    """Every doctor check, in the order a technician fixes things."""
    config_check, config = check_config(config_path)
    database_check = check_database(db, read)
    try:
        found: Row | None = read(lambda conn: read_doctor(conn, now))
    except CliError:
        found = None  # already reported by the database check
    checks = [config_check, check_fleet_trust(config, found), check_permissions(db),
              database_check]  # fmt: skip
    _, wal = file_bytes(db)
    if wal > WAL_WARN_BYTES:
        checks.append(Check("wal", "warn", f"{human_bytes(wal)} of WAL: a reader holding a "
                            "transaction open starves checkpoints"))  # fmt: skip
    daemon = found["daemon"] if found else None
    checks += check_devices(config, found["links"] if found else [])
    checks += [
        check_disk(config, db),
        check_clock(now, daemon["heartbeat"] if daemon else None, found["skew"] if found else None),
        check_daemon(daemon) if daemon else Check("daemon", "skip", "database unreadable"),
        check_uplink(config, found, now, max_ack_age) if found
        else Check("uplink", "skip", "database unreadable"),
    ]  # fmt: skip
    flash = check_flash(config, found["flash"] if found else None)
    if flash is not None:
        checks.append(flash)
    return checks


def flash_text(f: Row) -> str:
    """Bytes written per event, per day, and the years to the endurance budget."""
    text = f"{human_bytes(f['write_bytes_per_s'] * 86400)}/day written"
    if f["bytes_per_event"] is not None:
        text += f", {human_bytes(f['bytes_per_event'])} per event"
    if f["years_left"] is not None:
        text += f"; {f['years_left']:.1f} years to [store] flash_endurance_bytes at this rate"
    return text


def check_flash(config: Config | None, flash: Row | None) -> Check | None:
    """The storage's projected life at the agent's write rate, against [store]
    flash_warn_years; shown only once both a budget and a rate are known."""
    if config is None or flash is None or None in (flash["years_left"], flash["write_bytes_per_s"]):
        return None
    detail = flash_text(flash)
    bound = config.store.flash_warn_years
    if flash["years_left"] < bound:
        return Check("flash", "warn", f"{detail}: below {bound:g} years ([store] "
                     "flash_warn_years): fewer streams or events, a larger or more enduring "
                     "card, or [store] commit_delay_ms to batch more per commit")  # fmt: skip
    return Check("flash", "ok", detail)
