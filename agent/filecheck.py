"""Checks at start on the files the agent trusts: state, configuration, credentials.

The rules (docs/operations.md, "File checks at start"; why in docs/decisions.md):
- state dir, `agent.db`, `agent.db-wal`, `agent.db-shm`: never a symlink (SQLite would
  follow it and write our tables into whatever it points at, or create a file there),
  a directory or regular file, owned by the agent's user, no group or other write.
  Readable by others is a warning (the unit's 0750 keeps them to the group).
- configuration file, `ca_file`, `cert_file`, `fleet_key_file`: owned by root or the
  agent, not writable by others (whoever can write them can redirect the uplink or swap
  the key that signs acks); group-writable is a warning.
- `password_file`, `key_file` (secrets): owned by root or the agent, neither readable
  nor writable by group or others.

Every finding names the file, the problem and the fix. `refusals` are the findings that
stop `ironfleet-agent run`; `check-config` prints them all. A file that does not exist
is not checked here (the code that reads it says so, and the database is created).
"""

from __future__ import annotations

import glob
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from agent.config import Config
from agent.errors import AgentError

STATE_SUFFIXES = ("", "-wal", "-shm")  # the database and the files SQLite keeps beside it
SYSTEMD_CREDENTIALS = "/run/credentials/"  # LoadCredential= files: there while the unit runs


class UnsafeFile(AgentError):
    """A state, configuration or credential file fails a check; names the file and fix."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem with one file: fatal ones refuse the start, the rest are warnings."""

    path: str
    problem: str
    fix: str
    fatal: bool

    def __str__(self) -> str:
        level = "refused" if self.fatal else "warning"
        return f"{level}: {self.path}: {self.problem}; fix: {self.fix}"


def check_all(config: Config, *, euid: int | None = None) -> list[Finding]:
    """Every finding for the state files, the configuration file and the credentials."""
    uid = os.geteuid() if euid is None else euid
    findings = check_state(Path(config.agent.state_dir), config.database, euid=uid)
    if config.source != "<defaults>":
        findings += check_config_file(Path(config.source), euid=uid)
    up = config.uplink
    for key, value, secret in (
        ("password_file", up.password_file, True),
        ("key_file", up.key_file, True),
        ("ca_file", up.ca_file, False),
        ("cert_file", up.cert_file, False),
        ("fleet_key_file", up.fleet_key_file, False),
    ):
        if value:
            findings += check_trusted(Path(value), f"[uplink] {key}", secret=secret, euid=uid)
    return findings


def check_present(config: Config) -> list[Finding]:
    """`check-config` only: the files the configuration names exist now. A credential the
    uplink needs is refused (it would fail at every connect); a serial device that is not
    there is a warning (the agent waits for it: cable, power, udev). Paths under
    SYSTEMD_CREDENTIALS exist only inside the running unit (LoadCredential=): not checked."""
    findings = []
    up = config.uplink
    if up.enabled:
        for key, value in (
            ("password_file", up.password_file), ("key_file", up.key_file),
            ("ca_file", up.ca_file), ("cert_file", up.cert_file),
            ("fleet_key_file", up.fleet_key_file),
        ):  # fmt: skip
            if value and not value.startswith(SYSTEMD_CREDENTIALS):
                findings += _present_file(value, f"[uplink] {key}")
    key = config.agent.signing_key_file
    if key and not key.startswith(SYSTEMD_CREDENTIALS):
        findings += _present_file(key, "[agent] signing_key_file")
    for s in config.serials:
        if not glob.glob(s.device):
            where = "[serial]" if len(config.serials) == 1 else f"[[serial]] {s.label}"
            findings.append(Finding(s.device, f"{where} device: nothing there now", "check "
                                    "the cable, the controller's power and the udev rule; "
                                    "the agent waits for it", fatal=False))  # fmt: skip
    return findings


def _present_file(path: str, what: str) -> list[Finding]:
    try:
        st = os.stat(path)
    except PermissionError:
        return [Finding(path, f"{what}: cannot check (permission denied)", "run check-config "
                        "as root or as the agent's user", fatal=False)]  # fmt: skip
    except OSError:
        return [Finding(path, f"{what} does not exist", "create it or fix the path", fatal=True)]
    if not stat.S_ISREG(st.st_mode):
        return [Finding(path, f"{what} is not a regular file", "fix the path", fatal=True)]
    return []


def refusals(findings: list[Finding]) -> list[Finding]:
    """The fatal findings."""
    return [f for f in findings if f.fatal]


def refuse_unsafe(config: Config) -> list[Finding]:
    """Raise `UnsafeFile` (first refusal, and how many more) or return the warnings."""
    findings = check_all(config)
    fatal = refusals(findings)
    if fatal:
        more = f" (and {len(fatal) - 1} more: run ironfleet-agent check-config)"
        raise UnsafeFile(str(fatal[0]) + (more if len(fatal) > 1 else ""))
    return findings


def check_state(state_dir: Path, database: Path, *, euid: int) -> list[Finding]:
    """Findings for the state directory and the database files in it."""
    found: list[Finding] = []
    st = _lstat(state_dir)
    if st is not None:
        found += _owned_private(state_dir, st, euid, directory=True)
    for suffix in STATE_SUFFIXES:
        path = Path(f"{database}{suffix}")
        st = _lstat(path)
        if st is not None:
            found += _owned_private(path, st, euid, directory=False)
            if not suffix and stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                found.append(
                    Finding(
                        str(path),
                        f"has {st.st_nlink} hard links (another name shares it)",
                        f"remove the other links (find / -samefile {path})",
                        False,
                    )
                )
    return found


def check_config_file(path: Path, *, euid: int) -> list[Finding]:
    """Findings for the configuration file (symlinks are followed: it is only read)."""
    return check_trusted(path, "configuration file", secret=False, euid=euid)


def check_trusted(path: Path, what: str, *, secret: bool, euid: int) -> list[Finding]:
    """Findings for a file the agent reads and trusts; `secret`: not readable by others."""
    try:
        st = path.stat()
    except OSError:
        return []
    where = f"{path} ({what})"
    found: list[Finding] = []
    if st.st_uid not in (0, euid):
        found.append(
            Finding(
                where,
                f"is owned by uid {st.st_uid}, not root or the agent (uid {euid})",
                f"chown root {path}",
                True,
            )
        )
    mode = stat.S_IMODE(st.st_mode)
    if secret and mode & 0o077:
        found.append(
            Finding(
                where,
                f"mode {mode:04o} lets group or others read or write a secret",
                f"chmod 0600 {path} (or deliver it with LoadCredential=)",
                True,
            )
        )
    elif mode & stat.S_IWOTH:
        found.append(
            Finding(
                where,
                f"mode {mode:04o} is writable by others",
                f"chmod o-w {path} (0644 or 0640)",
                True,
            )
        )
    elif mode & stat.S_IWGRP:
        found.append(
            Finding(where, f"mode {mode:04o} is writable by its group", f"chmod g-w {path}", False)
        )
    return found


def stat_before_open(database: Path) -> os.stat_result | None:
    """lstat the database right before it is opened; refuse a symlink or a non-file."""
    st = _lstat(database)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(str(_not_plain(database, st)))
    return st


def verify_opened(database: Path, before: os.stat_result | None) -> None:
    """After SQLite opened `database`: the name still is the plain file we checked, and
    the file this process holds open is that one (/proc/self/fd), never a target."""
    st = _lstat(database)
    if st is None or not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(str(_not_plain(database, st)) if st else f"{database}: vanished at open")
    if before is not None and (before.st_dev, before.st_ino) != (st.st_dev, st.st_ino):
        raise UnsafeFile(
            f"{database}: was replaced while it was being opened; fix: find who "
            "writes to the state directory (it must be the agent's alone)"
        )
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        return  # not Linux: the lstat checks above are all we can do
    for fd in fds.iterdir():
        try:
            held = fd.stat()
        except OSError:
            continue
        if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
            return
    raise UnsafeFile(
        f"{database}: the file SQLite opened is not the one at this path; fix: "
        "make the state directory the agent's alone (no links into it)"
    )


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _not_plain(path: Path, st: os.stat_result) -> Finding:
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        dangling = "" if path.exists() else " (dangling)"
        return Finding(
            str(path),
            f"is a symlink to {target}{dangling}; the agent never follows links in its state",
            f"remove the link (rm {path}); put the state directory where "
            "it belongs with [agent] state_dir instead",
            True,
        )
    kind = "directory" if stat.S_ISDIR(st.st_mode) else "special file"
    return Finding(
        str(path), f"is a {kind}, not a regular file", f"move it away (mv {path} {path}.bad)", True
    )


def _owned_private(path: Path, st: os.stat_result, euid: int, *, directory: bool) -> list[Finding]:
    if stat.S_ISLNK(st.st_mode) or (
        not stat.S_ISDIR(st.st_mode) if directory else not stat.S_ISREG(st.st_mode)
    ):
        if directory and not stat.S_ISLNK(st.st_mode):
            return [
                Finding(
                    str(path),
                    "is not a directory",
                    f"move it away (mv {path} {path}.bad) or set [agent] state_dir",
                    True,
                )
            ]
        return [_not_plain(path, st)]
    found: list[Finding] = []
    if st.st_uid != euid:
        found.append(
            Finding(
                str(path),
                f"is owned by uid {st.st_uid}, not the agent (uid {euid})",
                f"chown {euid} {path} (systemd's StateDirectory= does it)",
                True,
            )
        )
    mode = stat.S_IMODE(st.st_mode)
    good = "0750" if directory else "0640"
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "others" if mode & stat.S_IWOTH else "its group"
        found.append(
            Finding(
                str(path),
                f"mode {mode:04o} is writable by {who}",
                f"chmod {good} {path} (StateDirectoryMode=0750, UMask=0027)",
                True,
            )
        )
    elif mode & stat.S_IROTH:
        found.append(
            Finding(
                str(path),
                f"mode {mode:04o} is readable by others",
                f"chmod {good} {path} (technicians read through the group)",
                False,
            )
        )
    return found
