"""Configuration: one frozen object, defaults in one place, errors that name key and file.

The file is TOML (`/etc/ironfleet/agent.toml` under systemd). Every key is optional;
docs/configuration.md lists each with its default, and a test checks that it does.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from agent.errors import ConfigError

# A vehicle id that can name its public key file at the fleet (`--vehicle-keys DIR`).
KEY_FILE_NAME = re.compile(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")


@dataclass(frozen=True)
class AgentSection:
    """[agent]: identity and where state lives."""

    vehicle_id: str = "vehicle-0001"
    state_dir: str = "/var/lib/ironfleet"
    # Where the live snapshot is also written (tmpfs; systemd RuntimeDirectory=ironfleet):
    # it stays current while the database cannot be written. "" writes it nowhere.
    runtime_dir: str = "/run/ironfleet"
    log_level: str = "INFO"
    # The vehicle's Ed25519 private key (PEM; `ironfleet-agent keygen`): `ironfleet export`
    # signs its bundles with it. "" writes unsigned bundles, which a collector with
    # --vehicle-keys refuses.
    signing_key_file: str = ""

    def validate(self) -> dict[str, str]:
        problems = {}
        if not self.vehicle_id or any(c in self.vehicle_id for c in "/+#"):
            problems["vehicle_id"] = "must be non-empty without '/', '+' or '#' (MQTT topic part)"
        elif len(self.vehicle_id.encode()) > 64:  # sent in the serial HELLO (MAX_ID_LEN)
            problems["vehicle_id"] = "must be at most 64 bytes"
        if self.runtime_dir and not self.runtime_dir.startswith("/"):
            problems["runtime_dir"] = "must be an absolute path, or empty for none"
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            problems["log_level"] = "must be one of DEBUG, INFO, WARNING, ERROR"
        if self.signing_key_file and not self.signing_key_file.startswith("/"):
            problems["signing_key_file"] = "must be an absolute path, or empty for none"
        elif self.signing_key_file and not KEY_FILE_NAME.match(self.vehicle_id):
            problems["signing_key_file"] = (
                f"needs a vehicle_id the fleet can name its key file by (<vehicle_id>.pub): "
                f"{self.vehicle_id!r} is not 1 to 64 of A-Z a-z 0-9 _ . - starting with a "
                "letter, digit or _"
            )
        return problems


MAX_CONTROLLERS = 8  # [[serial]] entries: each a thread, a queue share, a metrics label
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")


@dataclass(frozen=True)
class SerialSection:
    """[serial], or one [[serial]] entry: a controller's device and link timing."""

    # How status, metrics (the `controller` label) and the capture file name the port;
    # "" is the device's file name (a glob's characters replaced).
    name: str = ""
    device: str = "/dev/ttyIronFleet0"
    baudrate: int = 921_600
    heartbeat_interval: float = 1.0
    missed_heartbeats: int = 3
    reconnect_min: float = 0.25
    reconnect_max: float = 10.0
    read_size: int = 65_536
    # Record the port's raw bytes both ways (firmware_bridge/capture.py); SIGHUP applies it.
    capture: bool = False
    capture_max_bytes: int = 64 * 2**20  # the capture and its rotated predecessor together

    @property
    def label(self) -> str:
        """`name`, or one made of the device's file name (never peer input)."""
        if self.name:
            return self.name
        base = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(self.device).name)[:32]
        return base or "serial"

    def validate(self) -> dict[str, str]:
        problems = {}
        if self.name and not _NAME.fullmatch(self.name):
            problems["name"] = "must be 1 to 32 of A-Z a-z 0-9 _ . -"
        if not self.device:
            problems["device"] = "must name a device path or a glob"
        if self.baudrate <= 0:
            problems["baudrate"] = "must be > 0"
        if not 0.01 <= self.heartbeat_interval <= 60:
            problems["heartbeat_interval"] = "must be within [0.01, 60] seconds"
        if not 1 <= self.missed_heartbeats <= 100:
            problems["missed_heartbeats"] = "must be within [1, 100]"
        if not 0 < self.reconnect_min <= self.reconnect_max:
            problems["reconnect_min"] = "must be > 0 and <= reconnect_max"
        if not 512 <= self.read_size <= 2**20:
            problems["read_size"] = "must be within [512, 1048576] bytes"
        if not 2**16 <= self.capture_max_bytes <= 2**34:
            problems["capture_max_bytes"] = "must be within [65536, 17179869184] bytes"
        elif self.capture_max_bytes < 4 * self.read_size:
            problems["capture_max_bytes"] = "must be at least 4 x read_size (one read is a record)"
        return problems


@dataclass(frozen=True)
class StoreSection:
    """[store]: durability, bounds and group commit."""

    synchronous: str = "FULL"
    max_buffer_bytes: int = 512 * 2**20
    min_free_bytes: int = 256 * 2**20
    high_water: float = 0.90
    low_water: float = 0.80
    low_priority_max: int = 1
    commit_max_events: int = 4096
    commit_delay_ms: float = 0.0
    queue_max_batches: int = 64
    max_cached_streams: int = 10_000
    # Bytes the storage may take in its life (capacity x P/E cycles / write amplification
    # of the card): status projects the years left at the agent's rate; 0: not known.
    flash_endurance_bytes: int = 0
    flash_warn_years: float = 5.0  # doctor warns below this projection
    # Unacknowledged events older than this (seconds, by the agent's clock when stored)
    # are worth nothing to the fleet: shed, reason "ttl". 0: never. ttl_low_seconds is
    # for the low-priority class (priority <= low_priority_max), ttl_seconds the rest.
    ttl_seconds: float = 0.0
    ttl_low_seconds: float = 0.0
    # When the buffer is full, per priority class (above / at or below low_priority_max):
    # "drop_oldest" sheds its oldest unacknowledged events (the ladder), "refuse_new" keeps
    # them and stops ACKing new events once nothing else can go (the controller holds them).
    full_policy: str = "drop_oldest"
    full_policy_low: str = "drop_oldest"

    def validate(self) -> dict[str, str]:
        problems = {}
        if not 16 <= self.max_cached_streams <= 1_000_000:
            problems["max_cached_streams"] = "must be within [16, 1000000] streams"
        if self.synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            problems["synchronous"] = (
                "must be FULL (default), EXTRA, or NORMAL (loses ACKed events on power cut)"
            )
        if self.max_buffer_bytes < 1 * 2**20:
            problems["max_buffer_bytes"] = "must be at least 1048576 (1 MiB)"
        if self.min_free_bytes < 0:
            problems["min_free_bytes"] = "must be >= 0"
        if not 0 < self.low_water < self.high_water < 1:
            problems["high_water"] = "need 0 < low_water < high_water < 1"
        if not 0 <= self.low_priority_max <= 7:
            problems["low_priority_max"] = "must be within [0, 7]"
        problems.update(
            {
                key: "must be 'drop_oldest' (default) or 'refuse_new'"
                for key in ("full_policy", "full_policy_low")
                if getattr(self, key) not in ("drop_oldest", "refuse_new")
            }
        )
        problems.update(
            {
                key: "must be 0 (never) or within (0, 315360000] seconds"
                for key in ("ttl_seconds", "ttl_low_seconds")
                if not 0 <= getattr(self, key) <= 10 * 365 * 86400
            }
        )
        if not 1 <= self.commit_max_events <= 100_000:
            problems["commit_max_events"] = "must be within [1, 100000]"
        if not 0 <= self.commit_delay_ms <= 1000:
            problems["commit_delay_ms"] = "must be within [0, 1000] milliseconds"
        if not 1 <= self.queue_max_batches <= 10_000:
            problems["queue_max_batches"] = "must be within [1, 10000]"
        if self.flash_endurance_bytes < 0:
            problems["flash_endurance_bytes"] = "must be >= 0 (0: not known)"
        if not 0 <= self.flash_warn_years <= 100:
            problems["flash_warn_years"] = "must be within [0, 100] years"
        return problems


@dataclass(frozen=True)
class UplinkSection:
    """[uplink]: the MQTT broker, batching, acknowledgements and the circuit breaker."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive: int = 30
    client_id: str = ""  # default: "ironfleet-<vehicle_id>"
    username: str = ""
    password_file: str = ""  # e.g. $CREDENTIALS_DIRECTORY/mqtt-password (LoadCredential=)
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    # Broker -> agent trust (docs/fleet-protocol.md): the fleet's Ed25519 public key (PEM)
    # that signs acks and commands, e.g. /run/credentials/ironfleet-agent.service/fleet-key.pub
    fleet_key_file: str = ""
    allow_unsigned: bool = False  # lab broker only: acks and commands taken unverified
    allow_plaintext_password: bool = False  # lab only: username/password without TLS
    ack_mode: str = "fleet"  # "fleet": collector acks; "broker": PUBACK (weaker)
    batch_max_events: int = 500
    batch_max_bytes: int = 256 * 1024
    batch_max_delay_ms: float = 200.0
    # What batches are published with (docs/fleet-protocol.md 2): "zlib" (default), "raw",
    # or "columnar" (fewest bytes: scarce links; collectors must know codec 2 first).
    codec: str = "zlib"
    compress: bool = True  # older key: false sends raw whatever `codec` says
    max_in_flight: int = 8
    # Bytes per second the uplink may publish, averaged (0: no limit): a slow or per-byte
    # billed radio. Live batches go first; the backlog takes what is left.
    max_bytes_per_second: int = 0
    # Bytes one contact window may carry (0: no quota): a window opens at the first send
    # after the previous one ended and lasts contact_seconds, reconnects inside it
    # included. For links billed per pass or per session (docs/operations.md, section 4).
    max_bytes_per_contact: int = 0
    contact_seconds: float = 3600.0
    ack_timeout: float = 15.0
    breaker_failure_threshold: int = 5
    breaker_recovery_timeout: float = 10.0
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0

    @property
    def wire_codec(self) -> str:
        """The codec batches go out with: `codec`, unless the older `compress = false`."""
        return self.codec if self.compress else "raw"

    def validate(self) -> dict[str, str]:
        checks = {
            "host": (bool(self.host), "must name the broker"),
            "port": (1 <= self.port <= 65535, "must be within [1, 65535]"),
            "keepalive": (5 <= self.keepalive <= 3600, "must be within [5, 3600] seconds"),
            "ack_mode": (
                self.ack_mode in ("fleet", "broker"),
                "must be 'fleet' (collector acks, default) or 'broker'",
            ),
            "batch_max_events": (1 <= self.batch_max_events <= 50_000, "must be in [1, 50000]"),
            "batch_max_bytes": (
                1024 <= self.batch_max_bytes <= 8 * 2**20,
                "must be within [1024, 8388608]",
            ),
            "batch_max_delay_ms": (
                0 <= self.batch_max_delay_ms <= 60_000,
                "must be within [0, 60000]",
            ),
            "codec": (
                self.codec in ("zlib", "raw", "columnar"),
                "must be 'zlib' (default), 'raw' or 'columnar'",
            ),
            "max_in_flight": (1 <= self.max_in_flight <= 1000, "must be within [1, 1000]"),
            "max_bytes_per_second": (
                self.max_bytes_per_second == 0 or 100 <= self.max_bytes_per_second <= 10**9,
                "must be 0 (no limit) or within [100, 1000000000]",
            ),
            "max_bytes_per_contact": (
                self.max_bytes_per_contact == 0 or 4096 <= self.max_bytes_per_contact <= 10**12,
                "must be 0 (no quota) or within [4096, 1000000000000]",
            ),
            "contact_seconds": (
                1 <= self.contact_seconds <= 7 * 86400,
                "must be within [1, 604800] seconds",
            ),
            "ack_timeout": (0.1 <= self.ack_timeout <= 3600, "must be in [0.1, 3600] seconds"),
            "breaker_failure_threshold": (
                1 <= self.breaker_failure_threshold <= 1000,
                "must be within [1, 1000]",
            ),
            "breaker_recovery_timeout": (
                0 < self.breaker_recovery_timeout <= 3600,
                "must be within (0, 3600] seconds",
            ),
            "reconnect_min": (
                0 < self.reconnect_min <= self.reconnect_max,
                "must be > 0 and <= reconnect_max",
            ),
            "tls": (
                self.tls or not (self.cert_file or self.key_file or self.ca_file),
                "must be true when ca_file, cert_file or key_file is set",
            ),
            "fleet_key_file": (
                not self.enabled or bool(self.fleet_key_file) != self.allow_unsigned,
                "must name the fleet's Ed25519 public key (PEM file) that signs acks and "
                "commands (or allow_unsigned = true, for a lab broker only)"
                if not self.allow_unsigned
                else "must be empty with allow_unsigned = true (choose one)",
            ),
            "username": (
                not self.enabled or not self.username or self.tls or self.allow_plaintext_password,
                "would send the MQTT password in clear: set tls = true, or "
                "allow_plaintext_password = true (trusted lab network only)",
            ),
        }
        return {key: why for key, (ok, why) in checks.items() if not ok}


@dataclass(frozen=True)
class MetricsSection:
    """[metrics]: Prometheus exposition on 127.0.0.1 and/or a node_exporter textfile."""

    enabled: bool = False  # opt-in: a listening port on every vehicle is a choice
    host: str = "127.0.0.1"
    port: int = 9108
    textfile: str = ""  # e.g. /var/lib/node_exporter/textfile/ironfleet.prom
    textfile_interval: float = 15.0

    def validate(self) -> dict[str, str]:
        checks = {
            "host": (self.host in ("127.0.0.1", "::1", "localhost"), "must be a loopback address"),
            "port": (1 <= self.port <= 65535, "must be within [1, 65535]"),
            "textfile_interval": (
                1 <= self.textfile_interval <= 3600,
                "must be within [1, 3600] seconds",
            ),
        }
        return {key: why for key, (ok, why) in checks.items() if not ok}


@dataclass(frozen=True)
class Config:
    """The whole configuration; `load` builds it, `validate` ran before you see it."""

    agent: AgentSection = field(default_factory=AgentSection)
    # One per controller: `[serial]`, or several `[[serial]]` entries.
    serials: tuple[SerialSection, ...] = (SerialSection(),)
    # Written as [[serial]] (even one entry): streams are stored under their port's name.
    # Decided by the syntax, not the count, so adding or removing a port renames nothing.
    streams_by_port: bool = False
    store: StoreSection = field(default_factory=StoreSection)
    uplink: UplinkSection = field(default_factory=UplinkSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    source: str = "<defaults>"

    @property
    def serial(self) -> SerialSection:
        """The first controller's port (the only one unless [[serial]] lists several)."""
        return self.serials[0]

    @property
    def database(self) -> Path:
        """The event store file."""
        return Path(self.agent.state_dir) / "agent.db"

    @property
    def live_file(self) -> Path | None:
        """The runtime copy of the live snapshot, or None ([agent] runtime_dir empty)."""
        return Path(self.agent.runtime_dir) / "live.json" if self.agent.runtime_dir else None


SECTIONS: dict[str, type] = {
    "agent": AgentSection,
    "serial": SerialSection,
    "store": StoreSection,
    "uplink": UplinkSection,
    "metrics": MetricsSection,
}


def _coerce(section: str, key: str, value: Any, expected: type, source: str) -> Any:
    where = f"{source}: {section} {key}"
    if expected is float and type(value) in (int, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value!r}")
        return float(value)
    if expected is int and type(value) is int:
        return value
    if expected is str and type(value) is str:
        return value
    if expected is bool and type(value) is bool:
        return value
    raise ConfigError(
        f"{where}: expected {expected.__name__}, got {type(value).__name__} {value!r}"
    )


def _build(name: str, cls: type, value: dict[str, Any], source: str, problems: list[str]) -> Any:
    """One section from its table; its problems appended, each naming `name` and the key."""
    hints = get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    mistyped = False
    for key, raw in value.items():
        if key not in known:
            listing = ", ".join(sorted(known))
            problems.append(f"{source}: {name} unknown key {key!r}; known keys: {listing}")
            continue
        try:
            kwargs[key] = _coerce(name, key, raw, hints[key], source)
        except ConfigError as exc:
            problems.append(str(exc))
            mistyped = True
    section = cls(**kwargs)
    # A mistyped key stands at its default here: a check of two keys would then
    # report a problem the file does not have.
    for key, problem in ({} if mistyped else section.validate()).items():
        problems.append(f"{source}: {name} {key} = {getattr(section, key)!r}: {problem}")
    return section


def _serials(value: Any, source: str, problems: list[str]) -> tuple[SerialSection, ...]:
    """`[serial]` (one controller) or `[[serial]]` (several, each with its own name)."""
    if isinstance(value, dict):
        return (_build("[serial]", SerialSection, value, source, problems),)
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        problems.append(f"{source}: [serial] must be a table, or [[serial]] entries")
        return (SerialSection(),)
    if len(value) > MAX_CONTROLLERS:
        problems.append(f"{source}: [[serial]] lists {len(value)} controllers; "
                        f"at most {MAX_CONTROLLERS}")  # fmt: skip
    entries = tuple(
        _build(f"[[serial]] #{i + 1}", SerialSection, v, source, problems)
        for i, v in enumerate(value)
    )
    for key in ("device", "label"):
        seen: dict[str, int] = {}
        for i, entry in enumerate(entries):
            first = seen.setdefault(getattr(entry, key), i)
            if first == i:
                continue
            where = f"{source}: [[serial]] #{i + 1}"
            if key == "device":
                problems.append(f"{where} device = {entry.device!r}: also the device of entry "
                                f"#{first + 1}; each controller needs its own port")  # fmt: skip
            elif entry.name:
                problems.append(f"{where} name = {entry.name!r}: also the name of entry "
                                f"#{first + 1}; each controller needs its own")  # fmt: skip
            elif entries[first].device != entry.device:
                problems.append(f"{where} name: {entry.label!r}, made of the device's file "
                                f"name, is also entry #{first + 1}'s; set name")  # fmt: skip
    return entries


def from_mapping(data: dict[str, Any], source: str = "<mapping>") -> Config:
    """Build and validate a Config from parsed TOML; errors name the key and `source`.

    Every problem is found in one pass: the ConfigError lists them one per line (most
    files have one), so `check-config` shows all of them at once, not the first."""
    problems: list[str] = []
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            problems.append(
                f"{source}: unknown section [{name}]; known sections: {', '.join(SECTIONS)}"
            )
            continue
        if name == "serial":
            sections["serials"] = _serials(value, source, problems)
            sections["streams_by_port"] = isinstance(value, list)
            continue
        if not isinstance(value, dict):
            problems.append(f"{source}: [{name}] must be a table")
            continue
        sections[name] = _build(f"[{name}]", SECTIONS[name], value, source, problems)
    serials, store = sections.get("serials", ()), sections.get("store", StoreSection())
    if len(serials) > store.queue_max_batches:
        problems.append(f"{source}: [store] queue_max_batches = {store.queue_max_batches}: "
                        f"below the {len(serials)} [[serial]] entries (each port needs a "
                        "share of the writer's queue)")  # fmt: skip
    if problems:
        raise ConfigError("\n".join(problems))
    config = Config(**sections, source=source)
    for name in SECTIONS:  # defaults are validated too, so a bad default cannot ship
        for section in config.serials if name == "serial" else (getattr(config, name),):
            for key, problem in section.validate().items():
                raise ConfigError(f"{source}: [{name}] {key}: {problem}")
    return config


def load(path: str | Path) -> Config:
    """Read and validate a TOML file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read configuration: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return from_mapping(data, str(p))
