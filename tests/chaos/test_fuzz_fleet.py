"""Fuzzing the broker -> agent trust boundary: fleet documents and the ack/cmd handlers.

- every file of tests/chaos/corpus/fleet is replayed through the oracle of
  tests/chaos/fuzz_fleet.py (`check`): the decoders are total and typed, the handlers
  never raise (without the last-resort guard) and nothing unsigned moves the cursor;
- a hypothesis test feeds the same oracle arbitrary msgpack documents shaped like acks,
  commands, batches and statuses, JSON, random bytes and zlib bombs;
- the oracle can fail: a decoder with a deliberate bug, and an inbox that skips the
  signature check, are both caught;
- the harness runs under libFuzzer for 12 s (IRONFLEET_FUZZ_SECONDS with IRONFLEET_LONG=1),
  as tests/chaos/test_fuzz.py runs the frame and CLI fuzzers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Imported before the harness so its atheris.instrument_imports() leaves them as they are.
from agent import fleet, fleet_inbox, resync  # noqa: F401 - imported before instrumenting

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "fleet"
LONG = bool(os.environ.get("IRONFLEET_LONG"))
FUZZ_SECONDS = int(os.environ.get("IRONFLEET_FUZZ_SECONDS", "300")) if LONG else 12
MIN_EXECS_PER_SECOND = 20  # well below what a quiet machine does (~1,500/s measured)
MAX_CORPUS_BYTES = 2**20


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_fleet", HERE / "fuzz_fleet.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_fleet"] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


fuzz_fleet = _load()


@pytest.fixture(autouse=True)
def fresh_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test gets its own store and FleetSync (the harness keeps one per process)."""
    monkeypatch.setattr(fuzz_fleet, "_WORLD", fuzz_fleet.World(tmp_path / "world"))
    yield
    fuzz_fleet._WORLD.close()


def corpus_files() -> list[Path]:
    return sorted(p for p in CORPUS.iterdir() if p.is_file() and p.name != "README")


def test_corpus_is_present_and_small() -> None:
    assert (CORPUS / "README").is_file()
    assert len(corpus_files()) >= 20
    assert sum(p.stat().st_size for p in corpus_files()) < MAX_CORPUS_BYTES


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_fleet_corpus(path: Path) -> None:
    values = fuzz_fleet.check(path.read_bytes())
    if path.name.startswith("hostile-"):
        assert values == [], f"{path.name} decoded as {values}"


def test_issue_12_inputs_are_refused_by_the_decoders() -> None:
    """The documents that stopped the agent (finding 1) are FleetMessageErrors now."""
    for name in ("hostile-ping-id-x", "hostile-ack-batch-inf", "hostile-ack-batch-bool"):
        payload = fuzz_fleet.payload_of((CORPUS / name).read_bytes())
        for decode in (fleet.Ack.decode, fleet.Command.decode):
            with pytest.raises(fleet.FleetMessageError):
                decode(payload)


# -- hypothesis: structured hostile documents ------------------------------------------------

KEYS = ["batch", "type", "stored", "duplicates", "digest", "issued", "sig", "op", "id",
        "vehicle", "historical", "events", "state"]  # fmt: skip
scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats() | st.text(max_size=8) | st.binary(max_size=70)
    | st.sampled_from(["ping", "replay", "events", "state", "online"])
)  # fmt: skip
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=9) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=4),
    max_leaves=30,
)  # fmt: skip
documents = st.dictionaries(st.sampled_from(KEYS), values, max_size=8)


def _envelope(doc: object, codec: int) -> bytes:
    body = msgpack.packb(doc, use_bin_type=True)
    if codec == 1:
        body = zlib.compress(body)
    return bytes(msgpack.packb([1, codec, body], use_bin_type=True))


payloads = st.one_of(
    st.tuples(documents, st.sampled_from([0, 1])).map(lambda dc: _envelope(*dc)),
    st.tuples(values, st.sampled_from([0, 1, 2, True, 1.0])).map(
        lambda vc: bytes(msgpack.packb([1, vc[1], msgpack.packb(vc[0])]))
    ),
    documents.map(lambda d: json.dumps(d, default=repr).encode()),
    st.binary(max_size=300),
    st.integers(min_value=1, max_value=20).map(
        lambda mib: _envelope({"x": b"\x00" * 1024}, 1)[:3] + zlib.compress(b"\x00" * (mib * 2**20))
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(payload=payloads)
def test_decoders_total_and_handlers_never_raise(payload: bytes) -> None:
    fuzz_fleet.check_decoders(payload)
    fuzz_fleet.world().feed(payload)


@settings(max_examples=100, deadline=None)
@given(
    batch=st.integers(min_value=0, max_value=2**63 - 1),
    stored=st.integers(min_value=0, max_value=100_000),
    kind=st.sampled_from(["state", "events"]),
)
def test_a_well_formed_ack_round_trips(batch: int, stored: int, kind: str) -> None:
    ack = fleet.Ack(batch, kind, stored, 0, b"d" * 32, 5, b"s" * 64)
    assert fleet.Ack.decode(ack.encode()) == ack


# -- the oracle can fail ---------------------------------------------------------------------


def test_oracle_catches_a_decoder_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def fragile(cls: Any, data: bytes) -> Any:
        doc = msgpack.unpackb(msgpack.unpackb(data)[2])
        return cls(doc["op"], int(doc.get("id", 0)))  # the bug of issue 12, finding 1

    data = (CORPUS / "hostile-ping-id-x").read_bytes()
    fuzz_fleet.check(data)
    monkeypatch.setattr(fleet.Command, "decode", classmethod(fragile))
    with pytest.raises(fuzz_fleet.OracleViolation, match="ValueError"):
        fuzz_fleet.check(data)


def test_oracle_catches_an_inbox_that_trusts_unsigned_acks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    world = fuzz_fleet.world()
    sent = world.transport_payloads()
    assert sent, "the world has batches in flight"
    batch = fleet.Batch.decode(sent[-1])
    ack = fleet.Ack(batch.batch_id, batch.kind, len(batch.events), 0).encode()
    fuzz_fleet.check(b"\x00" + ack)  # refused: unsigned
    monkeypatch.setattr(fleet_inbox.FleetInbox, "_ack_refusal", lambda self, ack: None)
    acks = [fleet.Batch.decode(p) for p in sent]
    inputs = [b"\x00" + fleet.Ack(b.batch_id, b.kind, 1, 0).encode() for b in acks]

    def feed_all() -> None:
        for data in inputs:
            fuzz_fleet.check(data)

    with pytest.raises(fuzz_fleet.OracleViolation, match="moved the cursor"):
        feed_all()


# -- atheris under libFuzzer -----------------------------------------------------------------


@pytest.mark.timeout(FUZZ_SECONDS + 120)
def test_fuzz_fleet(tmp_path: Path) -> None:
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    shutil.copytree(CORPUS, corpus, ignore=shutil.ignore_patterns("README"))
    artifacts.mkdir()
    env = {**os.environ, "IRONFLEET_FUZZ_WORKDIR": str(tmp_path / "world")}
    harness = HERE / "fuzz_fleet.py"
    proc = subprocess.run(
        [sys.executable, str(harness), f"-max_total_time={FUZZ_SECONDS}", "-timeout=20",
         "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
         str(corpus)],
        capture_output=True, text=True, env=env, timeout=FUZZ_SECONDS + 90, check=False,
    )  # fmt: skip
    found = sorted(artifacts.iterdir())
    failure = (
        f"fuzz_fleet exited {proc.returncode}; crashers: {[str(p) for p in found]}\n"
        f"Reproduce: python tests/chaos/fuzz_fleet.py CRASHER; copy it into "
        f"tests/chaos/corpus/fleet/ so it stays a regression test.\n" + proc.stderr[-4000:]
    )
    assert not found, failure
    assert proc.returncode == 0, failure
    executed = re.search(r"^stat::number_of_executed_units:\s+(\d+)", proc.stderr, re.MULTILINE)
    assert executed, f"no final stats:\n{proc.stderr[-2000:]}"
    assert int(executed.group(1)) >= MIN_EXECS_PER_SECOND * FUZZ_SECONDS, executed.group(0)
    print(f"fuzz_fleet: {executed.group(0)}")
