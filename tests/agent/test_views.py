"""The daemon's condition, classified once (agent/views.py `daemon_view`) and printed the
same by status, breaker, link (`daemon_line`) and doctor (`check_daemon`): live, stuck,
gone, stopped cleanly, a machine rebooted since, or a copy from another host."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.clitext import daemon_line
from agent.config import from_mapping
from agent.doctor import Check, check_daemon, check_fleet_trust, check_uplink
from agent.fleet_auth import key_fingerprint, keygen, load_private_key
from agent.identity import boot_id, host_name
from agent.livestate import DaemonLive, LiveState
from agent.views import daemon_view

NOW = time.time()


def published(**values: object) -> LiveState:
    """The snapshot as the writer leaves it: this process, this host and boot, 0.5 s ago."""
    daemon = DaemonLive(pid=os.getpid(), heartbeat=NOW - 0.5, host=host_name(), boot_id=boot_id())
    return LiveState(daemon=dataclasses.replace(daemon, **values))  # type: ignore[arg-type]


CASES = [
    # (what changed, condition, live, line says, doctor status, doctor says)
    ({}, "live", True, "running, pid", "ok", "heartbeat"),
    ({"host": "truck-0042", "boot_id": "11111111-2222-3333-4444-555555555555"},
     "copy", False, "a COPY, not a live agent", "warn", "a copy, not a live agent"),
    # Same boot, another name (ProtectHostname=, a container, a renamed host): this machine.
    ({"host": "localhost"}, "live", True, "running, pid", "ok", "heartbeat"),
    ({"boot_id": "00000000-0000-0000-0000-000000000000"}, "rebooted", False,
     "NOT RUNNING since this machine rebooted", "fail", "not running since this machine"),
    ({"stopped_at": NOW - 3}, "stopped", False, "stopped cleanly", "fail",
     "stopped cleanly"),
    ({"heartbeat": NOW - 60}, "stuck", False, "but NOT PUBLISHING", "fail",
     "has not written its database"),
    ({"heartbeat": NOW - 60, "pid": 999999999}, "gone", False,
     "NOT PUBLISHING: last heartbeat", "fail", "stopped or stuck"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_one_condition_printed_alike(
    case: tuple[dict[str, object], str, bool, str, str, str],
) -> None:
    change, condition, live, line, status, says = case
    view = daemon_view(published(**change), NOW)
    assert view["condition"] == condition
    assert view["live"] is live
    # This very process has the published pid: only a live or stuck daemon may claim it.
    assert view["process_alive"] is (condition in ("live", "stuck"))
    assert line in daemon_line(view)
    check = check_daemon(view)
    assert (check.status, says in check.detail) == (status, True), check


def test_a_database_from_an_agent_that_published_no_host_reads_as_before() -> None:
    view = daemon_view(published(host="", boot_id=""), NOW)
    assert (view["condition"], view["live"]) == ("live", True)


def test_the_boot_id_is_this_boots() -> None:
    assert boot_id() == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert len(boot_id()) == 36


def _found(condition: str, uplink: str = "disconnected") -> dict[str, object]:
    fleet = {"broker": "10.0.0.5:8883", "uplink": uplink, "breaker": "open",
             "last_error": "connect failed: 10.0.0.5:8883: Connection refused (ECONNREFUSED)",
             "last_ack_age_s": 1985.0, "cursor": 5}  # fmt: skip
    return {"daemon": {"condition": condition}, "fleet": fleet, "waiting": 195_596,
            "oldest_waiting_at": NOW - 1985}  # fmt: skip


@pytest.mark.parametrize(
    ("condition", "uplink", "status", "action"),
    [
        ("live", "disconnected", "fail", "make 10.0.0.5:8883 reachable"),
        ("live", "connected", "fail", "is a collector subscribed"),
        ("stuck", "disconnected", "fail", "make 10.0.0.5:8883 reachable"),
        ("stopped", "disconnected", "fail", "the agent is not running"),
        ("rebooted", "disconnected", "fail", "the agent is not running"),
        ("copy", "disconnected", "skip", "run doctor there"),
    ],
)
def test_doctor_names_the_action_that_gets_events_to_the_fleet(
    condition: str, uplink: str, status: str, action: str
) -> None:
    check = check_uplink(None, _found(condition, uplink), NOW, 600.0)
    assert (check.status, action in check.detail) == (status, True), check


# -- doctor: the fleet's signing key ------------------------------------------------------


def _trust(key_file: str, fleet_key: str = "", rejected: dict[str, int] | None = None,
           live: bool = True) -> Check:  # fmt: skip
    config = from_mapping({"uplink": {"fleet_key_file": key_file}})
    found = {"daemon": {"live": live}, "fleet_key": fleet_key, "rejected": rejected or {}}
    return check_fleet_trust(config, found)


def test_doctor_shows_the_key_fingerprint_the_collector_prints(tmp_path: Path) -> None:
    collector = str(Path(sys.executable).with_name("ironfleet-collector"))
    made = subprocess.run([collector, "keygen", "--private", str(tmp_path / "fleet.key"),
                           "--public", str(tmp_path / "fleet.pub")],
                          capture_output=True, text=True, check=True)  # fmt: skip
    fingerprint = key_fingerprint(load_private_key(str(tmp_path / "fleet.key")))
    assert f"fingerprint {fingerprint}" in made.stdout
    check = _trust(str(tmp_path / "fleet.pub"), fleet_key=fingerprint)
    assert (check.status, fingerprint in check.detail) == ("ok", True), check
    assert fingerprint.startswith("sha256:")
    assert len(fingerprint) == len("sha256:") + 16


def test_doctor_fails_on_a_key_file_that_is_not_a_key(tmp_path: Path) -> None:
    (tmp_path / "fleet.pub").write_text("not a key\n")
    check = _trust(str(tmp_path / "fleet.pub"))
    assert check.status == "fail"
    assert "not a PEM public key" in check.detail
    assert "ironfleet-collector keygen" in check.detail


def test_doctor_warns_when_the_running_agent_uses_another_key(tmp_path: Path) -> None:
    keygen(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    check = _trust(str(tmp_path / "fleet.pub"), fleet_key="sha256:0123456789abcdef")
    assert check.status == "warn"
    assert "runs with key sha256:0123456789abcdef" in check.detail
    assert "restart" in check.detail


def test_doctor_warns_when_fleet_messages_fail_verification(tmp_path: Path) -> None:
    keygen(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    fingerprint = key_fingerprint(load_private_key(str(tmp_path / "fleet.key")))
    check = _trust(str(tmp_path / "fleet.pub"), fingerprint, {"bad_signature": 3, "unsigned": 2})
    assert check.status == "warn"
    assert "5 acks or commands failed verification" in check.detail


@pytest.mark.parametrize("live", [True, False])
def test_doctor_on_a_systemd_credential_it_cannot_read(live: bool) -> None:
    path = "/run/credentials/ironfleet-agent.service/fleet-key.pub"
    check = _trust(path, fleet_key="sha256:0123456789abcdef" if live else "", live=live)
    assert check.status == "warn"
    said = "the running agent loaded sha256:0123456789abcdef" if live else "not running"
    assert said in check.detail


def test_the_budget_line_says_what_the_backlog_needs() -> None:
    from agent.clitext import budget_text  # noqa: PLC0415

    row = {"bytes_per_second": 800.0, "bytes_per_contact": 100_000, "contact_bytes": 12_600,
           "contact_window_left_s": 3120.0, "bytes_per_event": 81.2,
           "bytes_per_event_basis": "as sent", "backlog_bytes": 2_400_000, "drain_s": 3000.0,
           "contact_windows_needed": 24}  # fmt: skip
    text = budget_text(row)
    assert text.startswith("800 B/s; 12.3 KiB of 97.7 KiB spent, window ends in 52 min;")
    assert text.endswith("50 min at the budget, 24 more contact windows")
    closed = budget_text({**row, "bytes_per_second": 0.0, "contact_window_left_s": 0.0,
                          "drain_s": None, "contact_windows_needed": 0})  # fmt: skip
    assert "no window open" in closed
    assert "at the budget" not in closed
    assert "contact windows" not in closed
