"""The Debian package (issue 15): built by packaging/build-deb.sh, installed for real with
dpkg, then checked the way a vehicle runs it; upgraded with a changed configuration,
rolled back, removed and purged. Needs root (as CI has); leaves the machine as found.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from support import scaled

ROOT = Path(__file__).parents[2]
BUILD = ROOT / "packaging" / "build-deb.sh"
EXAMPLE = ROOT / "systemd" / "agent.toml.example"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
NEXT = f"{VERSION}.post1"  # later than VERSION for pip and for dpkg alike
PYVER = f"{sys.version_info.major}.{sys.version_info.minor}"
INTERPRETER = f"/usr/bin/python{PYVER}"
PACKAGE = "ironfleet-agent"
USER = "ironfleet"
CONFIG = Path("/etc/ironfleet/agent.toml")
STATE = Path("/var/lib/ironfleet")
LIB = Path("/opt/ironfleet/lib")
UNIT = Path("/lib/systemd/system/ironfleet-agent.service")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/ironfleet-agent.service")
COMMANDS = {  # entry point -> its --version line (click's wording for the CLI)
    "ironfleet": "ironfleet, version {}",
    "ironfleet-agent": "ironfleet-agent {}",
    "ironfleet-collector": "ironfleet-collector {}",
    "ironfleet-sim": "ironfleet-sim {}",
}
# Modules that need a distribution the package does not ship (vehicles never run them).
OPTIONAL = {"fleet.pgstore": "psycopg"}  # the fleet-side collector on PostgreSQL
# Imports every module of the agent with the package's files alone (run with -IS); prints
# how many imported and, per line, "module missing" for those missing a distribution.
IMPORT_ALL = """
import importlib, pkgutil, site
site.addsitedir("/opt/ironfleet/lib")
import agent, firmware_bridge
count = 0
for package in (agent, firmware_bridge):
    for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as exc:
            print(module.name, exc.name)
        else:
            count += 1
print(count)
"""


@dataclass(frozen=True)
class Debs:
    """The package at pyproject's version and at a later one (an upgrade)."""

    current: Path
    later: Path


def run(*cmd: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command to completion, output captured as text; never raises on failure."""
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, check=False, **kwargs
    )


def as_user(name: str) -> dict[str, Any]:
    """subprocess arguments that run a command as `name` with all its groups."""
    gid = pwd.getpwnam(name).pw_gid
    return {"user": name, "group": gid, "extra_groups": os.getgrouplist(name, gid)}


def dpkg(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """dpkg with no terminal: a conffile question would fail the call, not hang it."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return run("dpkg", *args, stdin=subprocess.DEVNULL, env=env)


def status() -> str:
    """dpkg's status of the package ("" when dpkg knows nothing of it)."""
    return run("dpkg-query", "-W", "-f=${Status}", PACKAGE).stdout


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> Debs:
    """Both packages, built once for the module by the script `make deb` runs."""
    if os.geteuid() != 0:
        pytest.fail("test_package.py installs a Debian package: run the tests as root (CI does)")
    out = tmp_path_factory.mktemp("dist")
    start = time.monotonic()
    builds = [  # both at once: most of a build is waiting on pip and the disk
        subprocess.Popen(
            [BUILD],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHON": sys.executable, "OUT": str(out), "VERSION": version},
        )
        for version in ("", NEXT)
    ]
    built = []
    for build in builds:
        stdout, stderr = build.communicate(timeout=240)
        assert build.returncode == 0, stdout + stderr
        built.append(Path(stdout.splitlines()[-1]))
    sizes = ", ".join(f"{deb.name} {deb.stat().st_size / 1e6:.1f} MB" for deb in built)
    print(f"built {sizes} in {time.monotonic() - start:.1f} s")
    return Debs(*built)


@pytest.fixture
def installed(debs: Debs) -> Iterator[Debs]:
    """The current package installed with `dpkg -i`; at teardown purged, and the test's
    state files, and the user the package created, removed."""
    assert status() in ("", "unknown ok not-installed"), (
        f"{PACKAGE} is installed here already; this test installs and purges it: "
        f"dpkg -P {PACKAGE} first"
    )
    had_user = _exists(pwd.getpwnam, USER)
    had_state = STATE.exists()
    _install_dependencies(debs.current)
    try:
        start = time.monotonic()
        res = dpkg("-i", debs.current)
        assert res.returncode == 0, res.stdout + res.stderr
        print(f"dpkg -i: {time.monotonic() - start:.2f} s")
        yield debs
    finally:
        if status():
            dpkg("-P", PACKAGE)
        if had_state:
            (STATE / "test-package.db").unlink(missing_ok=True)
        else:
            shutil.rmtree(STATE, ignore_errors=True)
        if not had_user and _exists(pwd.getpwnam, USER):
            run("userdel", USER)
        if not had_user and _exists(grp.getgrnam, USER):
            run("groupdel", USER)


def test_package_contents(debs: Debs) -> None:
    """Control fields, the one conffile, the shipped files equal to the tree's; the state
    directory is never the package's (dpkg must never remove buffered events)."""
    fields = run("dpkg-deb", "-f", debs.current, "Package", "Version", "Architecture", "Depends")
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert fields.stdout.splitlines() == [
        f"Package: {PACKAGE}",
        f"Version: {VERSION}",
        f"Architecture: {arch}",
        f"Depends: python{PYVER}, systemd",
    ]
    with tarfile.open(fileobj=io.BytesIO(_tar(debs.current, "--ctrl-tarfile"))) as control:
        conffiles = control.extractfile("./conffiles")
        assert conffiles is not None
        assert conffiles.read().decode() == f"{CONFIG}\n"
    with tarfile.open(fileobj=io.BytesIO(_tar(debs.current, "--fsys-tarfile"))) as files:
        _check_files(files)


def test_make_deb_runs_the_build_script() -> None:
    """The tests build with the script; `make deb` must be that same script."""
    make = run("make", "-n", "-C", ROOT, "deb")
    assert make.returncode == 0, make.stderr
    assert "PYTHON=.venv/bin/python packaging/build-deb.sh" in make.stdout.splitlines()


def test_installed_package_runs(installed: Debs) -> None:
    """What a technician meets after `dpkg -i`, before editing anything."""
    verify = run("systemd-analyze", "verify", UNIT)
    assert verify.returncode == 0, verify.stderr
    assert UNIT.name not in verify.stderr, verify.stderr  # warnings exit 0 too
    for name, line in COMMANDS.items():
        res = run(f"/usr/bin/{name}", "--version")
        assert (res.returncode, res.stdout.strip(), res.stderr) == (0, line.format(VERSION), "")
    # Every module of the agent imports with the package's interpreter and files alone.
    imports = run(INTERPRETER, "-IS", "-c", IMPORT_ALL)
    assert (imports.returncode, imports.stderr) == (0, ""), imports.stderr
    *missing, count = imports.stdout.splitlines()
    assert int(count) > 50
    assert all(OPTIONAL.get(m) == name for m, name in map(str.split, missing)), missing

    user = pwd.getpwnam(USER)
    assert (user.pw_dir, user.pw_shell) == (str(STATE), "/usr/sbin/nologin")
    assert USER in grp.getgrnam("dialout").gr_mem
    folder = CONFIG.parent.stat()
    assert (folder.st_uid, folder.st_gid, stat.S_IMODE(folder.st_mode)) == (
        0, user.pw_gid, 0o750,
    )  # fmt: skip
    assert CONFIG.read_bytes() == EXAMPLE.read_bytes()
    assert run("systemctl", "is-enabled", UNIT.name).stdout.strip() == "disabled"

    # The shipped example passes check-config with warnings only: the controller is not
    # plugged in here (the agent waits for it), and the broker it names may not listen
    # (the agent buffers); its fleet key is a credential of the running unit, not checked.
    device = tomllib.loads(EXAMPLE.read_text())["serial"]["device"]
    ok = f"{CONFIG}: ok (database {STATE}/agent.db, device {device})"
    for user_kwargs in ({}, as_user(USER)):  # root; the agent's user, through the group
        res = run("/usr/bin/ironfleet-agent", "check-config", "--config", CONFIG, **user_kwargs)
        assert (res.returncode, res.stdout.strip()) == (0, ok), res.stderr
        warnings = res.stderr.splitlines()
        assert warnings[0].startswith(f"ironfleet-agent: warning: {device}: [serial] device: ")
        assert all(w.startswith("ironfleet-agent: warning: ") for w in warnings), warnings
        assert all("[serial]" in w or "[uplink] broker" in w for w in warnings), warnings
    other = run("/usr/bin/ironfleet-agent", "check-config", "--config", CONFIG, **as_user("nobody"))
    assert other.returncode == 2
    assert f"{CONFIG}: cannot read configuration: Permission denied" in other.stderr

    # Every file is as shipped, and running all the above wrote nothing beside them.
    verified = dpkg("-V", PACKAGE)
    assert (verified.returncode, verified.stdout) == (0, ""), verified.stdout
    listed = set(dpkg("-L", PACKAGE).stdout.splitlines())
    extra = [p for p in map(str, Path("/opt/ironfleet").rglob("*")) if p not in listed]
    assert extra == []


def test_installed_agent_stores_events(installed: Debs) -> None:
    """The packaged daemon and simulator, run as the package's user: every event the
    controller sends is committed and acknowledged, and SIGTERM stops it with 0."""
    user = pwd.getpwnam(USER)
    work = Path(tempfile.mkdtemp(prefix="ironfleet-package-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        os.chown(work, user.pw_uid, user.pw_gid)
        as_agent = {**as_user(USER), "umask": 0o027}  # the unit's UMask=
        sim = subprocess.Popen(
            ["/usr/bin/ironfleet-sim", "--link-dir", str(work / "dev"), "--events", "300",
             "--rate", "2000", "--streams", "3", "--seed", "1"],
            stdout=subprocess.PIPE, text=True, **as_agent,
        )  # fmt: skip
        procs.append(sim)
        assert sim.stdout is not None
        device = sim.stdout.readline().split()[2]
        config = work / "agent.toml"
        config.write_text(
            f'[agent]\nvehicle_id = "package-test"\nstate_dir = "{work / "state"}"\n'
            f'[serial]\ndevice = "{device}"\n[store]\nmin_free_bytes = 0\n'
            "[uplink]\nenabled = false\n"
        )
        (work / "state").mkdir(mode=0o750)
        os.chown(work / "state", user.pw_uid, user.pw_gid)
        agent = subprocess.Popen(
            ["/usr/bin/ironfleet-agent", "run", "--config", str(config)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            **as_agent,
        )  # fmt: skip
        procs.append(agent)
        # The simulator exits once every event it sent was ACKed, i.e. committed.
        assert sim.wait(timeout=scaled(30)) == 0
        agent.send_signal(signal.SIGTERM)
        output = agent.communicate(timeout=scaled(20))[0]
        assert agent.returncode == 0, output
        assert f"version={VERSION}" in output
        db = work / "state" / "agent.db"
        conn = sqlite3.connect(db.as_uri() + "?mode=ro", uri=True)
        try:
            assert conn.execute("SELECT count(*) FROM events").fetchone() == (300,)
        finally:
            conn.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(work)


def test_upgrade_keeps_a_changed_config_and_rolls_back(installed: Debs) -> None:
    """A newer package replaces the code, never an edited configuration nor the state;
    the older package installed over it is the rollback."""
    edited = EXAMPLE.read_text().replace('"truck-0042"', '"truck-0099"')
    assert edited != EXAMPLE.read_text()
    CONFIG.write_text(edited)
    data = _put_state_file()

    res = dpkg("-i", installed.later)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Unpacking {PACKAGE} ({NEXT}) over ({VERSION})" in res.stdout
    assert CONFIG.read_text() == edited
    assert sorted(p.name for p in CONFIG.parent.iterdir()) == ["agent.toml"]  # no .dpkg-*
    res = run("/usr/bin/ironfleet-agent", "--version")
    assert res.stdout.strip() == f"ironfleet-agent {NEXT}"
    assert [p.name for p in LIB.glob("ironfleet_agent-*")] == [f"ironfleet_agent-{NEXT}.dist-info"]
    assert dpkg("-V", PACKAGE).stdout.splitlines() == [f"??5?????? c {CONFIG}"]
    assert (STATE / "test-package.db").read_bytes() == data
    check = run("/usr/bin/ironfleet-agent", "check-config", "--config", CONFIG, **as_user(USER))
    assert check.returncode == 0, check.stderr
    # Root checks for the unit's user: the state directory it owns is not refused.
    check = run("/usr/bin/ironfleet-agent", "check-config", "--config", CONFIG)
    assert check.returncode == 0, check.stderr
    assert "ironfleet-agent: refused:" not in check.stderr

    res = dpkg("-i", installed.current)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"downgrading {PACKAGE} from {NEXT} to {VERSION}" in res.stderr
    res = run("/usr/bin/ironfleet-agent", "--version")
    assert res.stdout.strip() == f"ironfleet-agent {VERSION}"
    assert [p.name for p in LIB.glob("ironfleet_agent-*")] == [
        f"ironfleet_agent-{VERSION}.dist-info"
    ]
    assert CONFIG.read_text() == edited
    assert (STATE / "test-package.db").read_bytes() == data


def test_remove_keeps_config_and_state_and_purge_keeps_state(installed: Debs) -> None:
    """`dpkg -r` removes the code only; `dpkg -P` the configuration and the unit's
    enablement too; neither touches the buffered events in /var/lib/ironfleet, nor the
    user that owns them."""
    CONFIG.write_text(EXAMPLE.read_text() + "# edited on the vehicle\n")
    data = _put_state_file()
    assert run("systemctl", "enable", UNIT.name).returncode == 0
    assert WANTS.is_symlink()

    res = dpkg("-r", PACKAGE)
    assert res.returncode == 0, res.stdout + res.stderr
    assert status() == "deinstall ok config-files"
    for gone in (*(Path("/usr/bin", n) for n in COMMANDS), UNIT, Path("/opt/ironfleet")):
        assert not gone.exists(), gone
    assert CONFIG.read_text().endswith("# edited on the vehicle\n")
    assert (STATE / "test-package.db").read_bytes() == data
    assert WANTS.is_symlink()  # a reinstall comes back enabled

    res = dpkg("-P", PACKAGE)
    assert res.returncode == 0, res.stdout + res.stderr
    assert status() == ""
    assert not CONFIG.parent.exists()
    assert not WANTS.is_symlink()
    assert (STATE / "test-package.db").read_bytes() == data
    assert pwd.getpwnam(USER).pw_dir == str(STATE)


def _put_state_file() -> bytes:
    """A file in the state directory, as systemd's StateDirectory= would own it."""
    user = pwd.getpwnam(USER)
    STATE.mkdir(mode=0o750, exist_ok=True)
    os.chown(STATE, user.pw_uid, user.pw_gid)
    data = os.urandom(4096)
    path = STATE / "test-package.db"
    path.write_bytes(data)
    os.chown(path, user.pw_uid, user.pw_gid)
    return data


def _check_files(files: tarfile.TarFile) -> None:
    names = set(files.getnames())
    assert not [n for n in names if n.startswith("./var")]
    for shipped, source in (
        (f".{UNIT}", "systemd/ironfleet-agent.service"),
        ("./usr/lib/sysusers.d/ironfleet.conf", "systemd/ironfleet.sysusers.conf"),
        (f".{CONFIG}", "systemd/agent.toml.example"),
        ("./usr/share/doc/ironfleet-agent/examples/99-ironfleet.rules",
         "systemd/99-ironfleet.rules"),
        ("./usr/share/doc/ironfleet-agent/examples/mosquitto-acl.example",
         "systemd/mosquitto-acl.example"),
        ("./usr/share/doc/ironfleet-agent/install.md", "docs/install.md"),
    ):  # fmt: skip
        member = files.extractfile(shipped)
        assert member is not None, shipped
        assert member.read() == (ROOT / source).read_bytes(), shipped
    for name in COMMANDS:
        info = files.getmember(f"./usr/bin/{name}")
        assert (info.uid, info.gid, stat.S_IMODE(info.mode)) == (0, 0, 0o755)
    completion = files.extractfile("./usr/share/bash-completion/completions/ironfleet")
    assert completion is not None
    assert b"complete -o nosort -F _ironfleet_completion ironfleet" in completion.read()
    wrapper = files.extractfile("./usr/bin/ironfleet-agent")
    assert wrapper is not None
    assert wrapper.readline() == f"#!{INTERPRETER} -IS\n".encode()
    # Byte-code is shipped (the agent cannot write it under ProtectSystem=strict).
    sources = {n for n in names if n.startswith("./opt/ironfleet/lib/agent/") and n.endswith(".py")}
    assert len(sources) > 20
    for source in sources:
        folder, module = source.rsplit("/", 1)
        assert f"{folder}/__pycache__/{module[:-3]}.cpython-{PYVER.replace('.', '')}.pyc" in names


def _tar(deb: Path, which: str) -> bytes:
    res = subprocess.run(["dpkg-deb", which, str(deb)], capture_output=True, check=True)
    return res.stdout


def _install_dependencies(deb: Path) -> None:
    """The package's Depends, with apt-get when missing, as `make system-deps` does."""
    depends = run("dpkg-deb", "-f", deb, "Depends").stdout
    names = [re.sub(r"\s*\(.*\)", "", d).strip() for d in depends.split(",")]
    missing = [
        n for n in names
        if run("dpkg-query", "-W", "-f=${Status}", n).stdout != "install ok installed"
    ]  # fmt: skip
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        res = run("apt-get", "update", "-qq")
        assert res.returncode == 0, res.stderr
        res = run("apt-get", "install", "-y", "-qq", *missing, env=env)
        assert res.returncode == 0, f"apt-get install {' '.join(missing)}: {res.stderr}"


def _exists(lookup: Callable[[str], object], name: str) -> bool:
    try:
        lookup(name)
    except KeyError:
        return False
    return True
