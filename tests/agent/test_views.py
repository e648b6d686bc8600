"""The daemon's condition, classified once (agent/views.py `daemon_view`) and printed the
same by status, breaker, link (`daemon_line`) and doctor (`check_daemon`): live, stuck,
gone, stopped cleanly, a machine rebooted since, or a copy from another host."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from agent.clitext import daemon_line
from agent.doctor import check_daemon, check_uplink
from agent.identity import boot_id, host_name
from agent.views import daemon_view

NOW = time.time()


def published(**values: object) -> dict[str, tuple[str, float]]:
    """agent_state as the writer leaves it: this process, this host and boot, 0.5 s ago."""
    state = {
        "daemon.pid": str(os.getpid()),
        "daemon.heartbeat": f"{NOW - 0.5:.3f}",
        "daemon.stopped_at": "",
        "daemon.host": host_name(),
        "daemon.boot_id": boot_id(),
        "daemon.alarm": "",
    }
    state.update({k.replace("_", ".", 1): str(v) for k, v in values.items()})
    return {key: (value, NOW - 0.5) for key, value in state.items()}


CASES = [
    # (what changed, condition, live, line says, doctor status, doctor says)
    ({}, "live", True, "running, pid", "ok", "heartbeat"),
    ({"daemon_host": "truck-0042", "daemon_boot_id": "11111111-2222-3333-4444-555555555555"},
     "copy", False, "a COPY, not a live agent", "warn", "a copy, not a live agent"),
    # Same boot, another name (ProtectHostname=, a container, a renamed host): this machine.
    ({"daemon_host": "localhost"}, "live", True, "running, pid", "ok", "heartbeat"),
    ({"daemon_boot_id": "00000000-0000-0000-0000-000000000000"}, "rebooted", False,
     "NOT RUNNING since this machine rebooted", "fail", "not running since this machine"),
    ({"daemon_stopped_at": f"{NOW - 3:.3f}"}, "stopped", False, "stopped cleanly", "fail",
     "stopped cleanly"),
    ({"daemon_heartbeat": f"{NOW - 60:.3f}"}, "stuck", False, "but NOT PUBLISHING", "fail",
     "has not written its database"),
    ({"daemon_heartbeat": f"{NOW - 60:.3f}", "daemon_pid": "999999999"}, "gone", False,
     "NOT PUBLISHING: last heartbeat", "fail", "stopped or stuck"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_one_condition_printed_alike(case: tuple[dict[str, str], str, bool, str, str, str]) -> None:
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
    state = published()
    del state["daemon.host"], state["daemon.boot_id"]
    view = daemon_view(state, NOW)
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
