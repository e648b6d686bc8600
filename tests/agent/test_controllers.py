"""Several controllers in one agent ([[serial]]): each port has its own thread, link,
reconnect and share of the writer's queue; streams are stored under their port's name,
so controllers using the same stream names (or the same HELLO id) never collide; a port that floods
garbage or is unplugged never costs the others an event. Real ptys, real simulators,
the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import MAX_CONTROLLERS, from_mapping
from agent.errors import ConfigError

from simharness import AgentProcess, Sim, TruthReader, assert_zero_loss, live, stored_events
from support import wait_for

StartSim = Callable[..., Sim]
StartAgent = Callable[..., AgentProcess]
IRONFLEET = str(Path(sys.executable).with_name("ironfleet"))
EVENTS = 1200  # per controller


def sim_on(start_sim: StartSim, tmp_path: Path, name: str, *args: str, controllers: int = 1) -> Sim:
    """A simulator whose ptys are `<name><k>` in their own directory, sending bare stream
    names (`s000`...): the same names as every other controller here."""
    return start_sim("--link-dir", str(tmp_path / name), "--link-name", f"{name}{{index}}",
                     "--controller-id", name, "--bare-streams", "--streams", "4",
                     "--rate", "400", "--events", str(EVENTS), *args,
                     controllers=controllers)  # fmt: skip


def links_text(agent: AgentProcess) -> str:
    """The published links and the agent's log tail: what a failure needs to be read."""
    links = [(k.name, k.state, k.controller, k.port, dict(k.counters), dict(k.rejects))
             for k in live(agent.db).controllers]  # fmt: skip
    return f"links {links}; log: {agent.log.read_text()[-2000:]}"


def test_four_controllers_one_flooding_one_unplugged_lose_nothing(
    start_sim: StartSim, start_agent: StartAgent, tmp_path: Path
) -> None:
    """Four controllers on four ptys, all sending streams named s000-s003: two healthy,
    one bursting garbage (4 KiB every 20 ms), one unplugged for 0.4 s every 1.2 s. Every
    event each controller saw ACKed is stored once, under its own controller's id;
    status and doctor name all four."""
    healthy = sim_on(start_sim, tmp_path, "ok", controllers=2)
    noisy = sim_on(start_sim, tmp_path, "noisy", "--garbage-every", "0.02",
                   "--garbage-bytes", "4096")  # fmt: skip
    plug = sim_on(start_sim, tmp_path, "plug", "--unplug-every", "1.2", "--unplug-for", "0.4")
    sims = [healthy, noisy, plug]
    devices = [d for s in sims for d in s.devices.values()]
    agent = start_agent(devices).start()
    seen: set[str] = set()  # controllers whose link was up in a published snapshot

    def all_seen() -> bool:
        if agent.started():
            seen.update(k.controller for k in live(agent.db).controllers if k.state == "up")
        return seen >= {"ok0", "ok1", "noisy0", "plug0"}

    wait_for(all_seen, 30, "every controller's link up", detail=lambda: links_text(agent))
    for sim in sims:
        assert sim.proc.wait(timeout=120) == 0, "a simulator did not finish"
    truths = [TruthReader(s.truth_path, ports={c: c for c in s.devices}) for s in sims]
    verdicts = [assert_zero_loss(t, agent.db) for t in truths]
    acked = sum(v.acked for v in verdicts)
    assert acked == 4 * EVENTS  # every event of all four, ACKed
    stored = stored_events(agent.db)
    assert len(stored) == acked
    names = {stream.split("/")[0] for stream, _, _ in stored}
    assert names == {"ok0", "ok1", "noisy0", "plug0"}
    assert {stream.split("/")[1] for stream, _, _ in stored} == {"s000", "s001", "s002", "s003"}

    assert plug.summary()["unplugs"] >= 1, "the plug controller was never unplugged"
    assert healthy.summary()["unplugs"] == 0
    snapshot = live(agent.db)
    links = {k.name: k for k in snapshot.controllers}
    assert set(links) == {"ok0", "ok1", "noisy0", "plug0"}
    assert links["noisy0"].rejects.get("cobs", 0) + links["noisy0"].rejects.get("crc", 0) > 0
    assert (
        links["plug0"].counters.get("link_downs", 0)
        + links["plug0"].counters.get("controller_reboots", 0)
        >= 0
    )
    assert sum(k.rejects.get("cobs", 0) + k.rejects.get("crc", 0)
               for name, k in links.items() if name != "noisy0") == 0  # fmt: skip
    status = json.loads(subprocess.run(
        [IRONFLEET, "--config", str(agent.config), "status", "--json"],
        capture_output=True, text=True, check=True,
    ).stdout)  # fmt: skip
    assert [c["name"] for c in status["controllers"]] == ["ok0", "ok1", "noisy0", "plug0"]
    doctor = subprocess.run([IRONFLEET, "--config", str(agent.config), "doctor", "--json"],
                            check=False, capture_output=True, text=True)  # fmt: skip
    checks = {c["name"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert {f"device {n}" for n in links} <= set(checks)
    assert agent.terminate() == 0


def test_two_ports_announcing_one_controller_id_are_kept_apart(
    start_sim: StartSim, start_agent: StartAgent, tmp_path: Path
) -> None:
    """Two ports whose controllers both say they are `twin0` (a cloned serial number) and
    send the same stream names: each is stored under its port's name, with its own boot
    epochs, and nothing of either is lost or taken for the other's duplicate."""
    first = sim_on(start_sim, tmp_path, "twin")
    second = start_sim("--link-dir", str(tmp_path / "other"), "--link-name", "other{index}",
                       "--controller-id", "twin", "--bare-streams", "--rate", "400",
                       "--events", str(EVENTS), "--seed", "2")  # fmt: skip
    agent = start_agent([*first.devices.values(), *second.devices.values()]).start()
    for sim in (first, second):
        assert sim.proc.wait(timeout=120) == 0, "a simulator did not finish"
    truths = [TruthReader(first.truth_path, ports={"twin0": "twin0"}),
              TruthReader(second.truth_path, ports={"twin0": "other0"})]  # fmt: skip
    assert [assert_zero_loss(t, agent.db).acked for t in truths] == [EVENTS, EVENTS]
    stored = stored_events(agent.db)
    assert len(stored) == 2 * EVENTS
    assert {stream.split("/")[0] for stream, _, _ in stored} == {"twin0", "other0"}
    assert agent.terminate() == 0


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ([{"device": "/dev/a"}, {"device": "/dev/a"}], "#2 device = '/dev/a': also the device"),
        ([{"device": "/x/tty0"}, {"device": "/y/tty0"}], "#2 name: 'tty0', made of the device"),
        ([{"name": "e", "device": "/a"}, {"name": "e", "device": "/b"}], "#2 name = 'e': also"),
        ([{"name": "bad name"}], "#1 name = 'bad name': must be 1 to 32"),
        ([{"device": f"/dev/t{i}"} for i in range(MAX_CONTROLLERS + 1)], "at most 8"),
        ([{"baud": 9600}], "[[serial]] #1 unknown key 'baud'"),
        ([], "must be a table, or [[serial]] entries"),
    ],
)
def test_serial_entries_are_checked_and_named(
    entries: list[dict[str, object]], needle: str
) -> None:
    with pytest.raises(ConfigError) as err:
        from_mapping({"serial": entries, "uplink": {"allow_unsigned": True}}, "a.toml")
    assert needle in str(err.value)
    assert str(err.value).startswith("a.toml: ")


def test_one_table_or_several_entries() -> None:
    one = from_mapping({"serial": {"device": "/dev/ttyUSB0"}, "uplink": {"allow_unsigned": True}})
    assert [s.label for s in one.serials] == ["ttyUSB0"]
    assert not one.streams_by_port  # [serial]: streams stored as sent
    entry = from_mapping(
        {"serial": [{"device": "/dev/ttyUSB0"}], "uplink": {"allow_unsigned": True}}
    )
    assert entry.streams_by_port  # [[serial]], even one entry: under the port's name
    several = from_mapping({"serial": [{"device": "/dev/serial/by-id/usb-IF_*-if00"},
                                       {"name": "nav", "device": "/dev/ttyUSB1"}],
                            "uplink": {"allow_unsigned": True}})  # fmt: skip
    assert [s.label for s in several.serials] == ["usb-IF__-if00", "nav"]
    assert several.serial is several.serials[0]
