"""The documentation matches the code.

- docs/configuration.md lists every key of every config section with its default;
- systemd/agent.toml.example loads, mentions every key and shows the true defaults;
- docs/schema.md names every table and column of a freshly migrated database, and the
  `event_log` view;
- every ```sql block of docs/schema.md runs on that database opened read-only.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest

from agent.channels import Shared
from agent.config import SECTIONS, from_mapping, load
from agent.fleet_inbox import REASONS
from agent.livestate import DaemonLive, LiveState, encode
from agent.resilience import Event
from agent.resync import ResyncCounters
from agent.store import EventStore, connect
from firmware_bridge.errors import REJECT_REASONS
from firmware_bridge.link import AgentLink

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
SCHEMA = ROOT / "docs" / "schema.md"
EXAMPLE = ROOT / "systemd" / "agent.toml.example"
AGENT = str(Path(sys.executable).with_name("ironfleet-agent"))

# The only keys the example sets to a value of its own (placeholders to replace).
PLACEHOLDERS = {("agent", "vehicle_id"), ("serial", "device"), ("uplink", "fleet_key_file")}

KEY_LINE = re.compile(r"^(#\s*)?([a-z_][a-z0-9_]*)\s*=\s*(.+)$")
SECTION_LINE = re.compile(r"^\[([a-z_]+)\]\s*$")
SQL_BLOCK = re.compile(r"^```sql\n(.*?)^```", re.MULTILINE | re.DOTALL)


def toml_value(value: object) -> str:
    """A default as written in TOML: integers without underscores, floats as repr."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"no TOML rendering for {type(value).__name__}")


def defaults() -> Iterator[tuple[str, str, object]]:
    """(section, key, default) of every configuration key."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f.name, getattr(cls(), f.name)


# -- markdown helpers -------------------------------------------------------------------


def headed_section(text: str, heading: re.Pattern[str]) -> str:
    """The lines under the one heading matching `heading`, up to the next heading of the
    same or a higher level; fenced code is skipped when looking for headings."""
    lines = text.splitlines()
    fenced = False
    start: int | None = None
    level = 0
    for i, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not line.startswith("#"):
            continue
        depth = len(line) - len(line.lstrip("#"))
        if start is not None and depth <= level:
            return "\n".join(lines[start:i])
        if start is None and heading.search(line):
            start, level = i + 1, depth
    assert start is not None, f"no heading matching {heading.pattern!r}"
    return "\n".join(lines[start:])


def table_rows(text: str) -> list[list[str]]:
    """Cells of the rows of the first markdown table in `text`, separator left out."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            if rows:
                break
            continue
        if not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def named_rows(text: str) -> dict[str, list[str]]:
    """Rows of the first table keyed by their first cell when it is one `name`."""
    out: dict[str, list[str]] = {}
    for cells in table_rows(text):
        match = re.fullmatch(r"`([A-Za-z_][A-Za-z0-9_.]*)`", cells[0])
        if match:
            assert match.group(1) not in out, f"{match.group(1)} documented twice"
            out[match.group(1)] = cells
    return out


# -- (a) docs/configuration.md ---------------------------------------------------------


def test_toml_rendering_round_trips() -> None:
    for section, key, default in defaults():
        parsed = tomllib.loads(f"v = {toml_value(default)}")["v"]
        assert parsed == default, f"[{section}] {key}"
        assert type(parsed) is type(default), f"[{section}] {key}"


@pytest.mark.parametrize("section", list(SECTIONS))
def test_configuration_lists_every_key_with_its_default(section: str) -> None:
    text = headed_section(CONFIGURATION.read_text(), re.compile(rf"^## .*`\[{section}\]`"))
    rows = named_rows(text)
    header = table_rows(text)[0]
    assert header[:3] == ["key", "type", "default"], header
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    assert set(rows) == set(fields), f"[{section}]: documented keys differ from the code"
    instance = SECTIONS[section]()
    for key, cells in rows.items():
        wanted = f"`{toml_value(getattr(instance, key))}`"
        assert cells[2] == wanted, f"[{section}] {key}: default {cells[2]}, code says {wanted}"


# -- (b) systemd/agent.toml.example ----------------------------------------------------


def example_keys() -> list[tuple[str, str, bool, int]]:
    """(section, key, commented out, line index) of every key line of the example."""
    found = []
    section = ""
    for i, line in enumerate(EXAMPLE.read_text().splitlines()):
        if match := SECTION_LINE.match(line):
            section = match.group(1)
        elif (match := KEY_LINE.match(line)) and section in SECTIONS:
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            if match.group(2) in fields:
                found.append((section, match.group(2), match.group(1) is not None, i))
    return found


def assert_defaults_except_placeholders(config: object, where: str) -> None:
    for section, key, default in defaults():
        if (section, key) not in PLACEHOLDERS:
            value = getattr(getattr(config, section), key)
            assert value == default, f"{where}: [{section}] {key} = {value!r}, not {default!r}"


def test_example_loads_to_the_defaults_except_placeholders() -> None:
    config = load(EXAMPLE)
    assert_defaults_except_placeholders(config, "as shipped")
    data = tomllib.loads(EXAMPLE.read_text())
    for section, key in PLACEHOLDERS:
        assert key in data[section], f"the example should set [{section}] {key}"


def test_example_mentions_every_key_once_with_a_comment() -> None:
    lines = EXAMPLE.read_text().splitlines()
    keys = example_keys()
    seen = [(section, key) for section, key, _, _ in keys]
    assert sorted(seen) == sorted((s, k) for s, k, _ in defaults())
    for section, key, commented, i in keys:
        assert commented == ((section, key) not in PLACEHOLDERS), f"[{section}] {key}"
        above = lines[i - 1]
        assert above.startswith("#"), f"[{section}] {key} needs a comment line above it"
        assert not KEY_LINE.match(above), f"[{section}] {key}: the line above is a key"


def test_example_commented_values_are_the_defaults() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for _, _, commented, i in example_keys():
        if commented:
            lines[i] = lines[i].lstrip("#").lstrip()
    config = from_mapping(tomllib.loads("\n".join(lines)), "uncommented example")
    assert_defaults_except_placeholders(config, "uncommented")


def test_example_passes_check_config() -> None:
    result = subprocess.run(
        [AGENT, "check-config", "--config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert ": ok " in result.stdout


# -- (c), (d) docs/schema.md -----------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """An event as the link hands it to the store."""

    event: Event
    time_quality: int = 3
    controller_id: str = "ecu0"


def arrival(stream: str, seq: int, priority: int = 2) -> Arrival:
    payload = msgpack.packb({"rpm": 2000 + seq, "ok": True}, use_bin_type=True)
    event = Event(
        stream, seq, boot_epoch=7, ts=1717171717.25 + seq, kind="sample", priority=priority,
        payload=payload,
    )  # fmt: skip
    return Arrival(event)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    """A freshly migrated store holding a few events, an open gap and published state."""
    path = tmp_path / "a.db"
    store = EventStore(path)
    store.append([arrival("ecu1/engine.rpm", 1), arrival("ecu1/engine.rpm", 2)])
    store.append([arrival("ecu1/engine.rpm", 5), arrival("ecu0/gps", 1, priority=0)])
    store.publish(encode(LiveState(daemon=DaemonLive(pid=4242, heartbeat=1717171717.25))))
    store.close()
    return path


def schema_objects(path: Path) -> dict[str, tuple[str, list[str]]]:
    """name -> (type, columns) of every table and view, SQLite's own tables left out."""
    conn = sqlite3.connect(path)
    try:
        names = conn.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite%' ORDER BY name"
        ).fetchall()
        return {
            name: (kind, [row[1] for row in conn.execute(f"PRAGMA table_info('{name}')")])
            for name, kind in names
        }
    finally:
        conn.close()


def test_schema_names_every_table_view_and_column(database: Path) -> None:
    objects = schema_objects(database)
    assert objects["event_log"][0] == "view"
    assert {"events", "streams", "stream_epochs", "_migrations"} <= set(objects)
    text = SCHEMA.read_text()
    for name, (kind, columns) in objects.items():
        level = "###" if kind == "table" else "##"
        section = headed_section(text, re.compile(rf"^{level} .*`{re.escape(name)}`"))
        rows = named_rows(section)
        missing = [c for c in columns if c not in rows]
        assert not missing, f"docs/schema.md: {kind} {name}: columns {missing} not described"
        extra = sorted(set(rows) - set(columns))
        assert not extra, f"docs/schema.md: {kind} {name}: {extra} are not columns"


def test_schema_documents_no_table_that_does_not_exist(database: Path) -> None:
    objects = schema_objects(database)
    tables = headed_section(SCHEMA.read_text(), re.compile(r"^## \d+\. Tables"))
    documented = re.findall(r"^### `([A-Za-z_]+)`\s*$", tables, re.MULTILINE)
    assert sorted(documented) == sorted(n for n, (k, _) in objects.items() if k == "table")


def sql_blocks() -> list[str]:
    return [block.strip() for block in SQL_BLOCK.findall(SCHEMA.read_text())]


def test_schema_has_the_useful_queries() -> None:
    assert len(sql_blocks()) >= 5


@pytest.mark.parametrize("sql", sql_blocks(), ids=lambda sql: " ".join(sql.split())[:40])
def test_schema_query_runs_read_only(database: Path, sql: str) -> None:
    assert sqlite3.complete_statement(sql), "one complete statement per block"
    conn = connect(database, readonly=True)
    try:
        rows = conn.execute(sql).fetchall()
    finally:
        conn.close()
    assert isinstance(rows, list)


def test_every_counter_a_view_shows_is_explained(tmp_path: Path) -> None:
    """Each name in the live snapshot's counter bags (what `status`, `link`, `breaker` and
    the metrics show) is explained, as `name`, in operations.md, schema.md or (the refusal
    reasons) fleet-protocol.md: a new counter cannot ship unexplained."""
    docs = "".join(
        (ROOT / "docs" / name).read_text()
        for name in ("operations.md", "schema.md", "fleet-protocol.md")
    )
    store = EventStore(tmp_path / "a.db")
    bags = {
        "store": set(store.stats()),
        "daemon.counters": set(Shared().counters),
        "uplink.counters": {f.name for f in dataclasses.fields(ResyncCounters)},
        "uplink.rejected": set(REASONS),
        "link.counters": set(AgentLink(agent_id="x").counters),
        "link.rejects": set(REJECT_REASONS),
    }
    store.close()
    missing = {bag: sorted(k for k in keys if f"`{k}`" not in docs) for bag, keys in bags.items()}
    assert not any(missing.values()), missing
