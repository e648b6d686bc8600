"""Fuzzing with atheris: frame decoding and the technician CLI's arguments.

- every file of tests/chaos/corpus/{frames,cli} is replayed in-process through the same
  oracle the fuzzer runs (`check` in fuzz_frames.py and fuzz_cli.py): a fast,
  deterministic regression test. A crasher of a bug still open is named
  crash-<known bug> and expected to fail (xfail strict: fixing the bug makes it pass,
  which fails the run until the bug is removed from KNOWN_BUGS);
- each harness runs under libFuzzer as a subprocess on a copy of its corpus: 12 s per
  target in CI, IRONFLEET_FUZZ_SECONDS (default 300) with IRONFLEET_LONG=1 (make chaos).
  It must exit 0 having executed a meaningful number of inputs; a crash fails the test
  with the crasher's path;
- the oracle can fail: a decoder with a deliberate bug patched in is caught by it.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cobs import cobs

# Imported before the harnesses so their atheris.instrument_imports() leaves the code
# under test uninstrumented in this process.
from agent import cli, cliaccess
from agent.store import connect
from firmware_bridge import frames
from firmware_bridge.errors import FrameCorrupt
from firmware_bridge.protocol import CRC_BYTES

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
LONG = bool(os.environ.get("IRONFLEET_LONG"))
# CI: 12 s per target keeps the whole file near 40 s (start-up and replay included).
FUZZ_SECONDS = int(os.environ.get("IRONFLEET_FUZZ_SECONDS", "300")) if LONG else 12
MIN_EXECS_PER_SECOND = 20  # a run well below this did not really fuzz (~300/s measured)
MAX_CORPUS_FILES = 200
MAX_CORPUS_BYTES = 2**20
README = "README"
TARGETS = {"frames": "fuzz frame decoding (atheris)", "cli": "fuzz CLI arguments (atheris)"}


class KnownBugStillOpen(AssertionError):
    """A crash-<bug> corpus file still reproduces its open bug (the expected failure)."""


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


fuzz_frames = _load("fuzz_frames")
fuzz_cli = _load("fuzz_cli")
HARNESSES = {"frames": fuzz_frames, "cli": fuzz_cli}


def corpus_files(target: str) -> list[Path]:
    """The inputs of one target's corpus (its README excluded)."""
    return sorted(p for p in (CORPUS / target).iterdir() if p.is_file() and p.name != README)


def _params(target: str) -> list[Any]:
    """One test per corpus file; crash-<open bug> files are expected to reproduce it."""
    bugs = {bug.name: bug for bug in HARNESSES[target].KNOWN_BUGS}
    params = []
    for path in corpus_files(target):
        bug = bugs.get(path.name.removeprefix("crash-"))
        marks = [pytest.mark.xfail(strict=True, raises=KnownBugStillOpen,
                                   reason=bug.reason)] if bug else []  # fmt: skip
        params.append(pytest.param(path, marks=marks, id=path.name))
    return params


def _replay(target: str, violation: AssertionError, path: Path) -> None:
    """Turn the oracle's verdict on a known crasher into the xfail's exception."""
    name = HARNESSES[target].known_bug(violation.__cause__)
    if name is not None and path.name == f"crash-{name}":
        raise KnownBugStillOpen(f"{path.name}: {violation}") from violation
    raise violation


# -- corpus replay ---------------------------------------------------------------------------


def test_corpus_is_present_and_small() -> None:
    files: list[Path] = []
    for target in TARGETS:
        assert corpus_files(target), f"corpus/{target} is empty"
        assert (CORPUS / target / README).is_file(), f"corpus/{target} has no README"
        files += corpus_files(target)
    assert len(files) < MAX_CORPUS_FILES, "minimise the corpus with -merge=1"
    assert sum(p.stat().st_size for p in files) < MAX_CORPUS_BYTES


@pytest.mark.parametrize("path", _params("frames"))
def test_frames_corpus(path: Path) -> None:
    try:
        fuzz_frames.check(path.read_bytes())
    except fuzz_frames.OracleViolation as exc:
        _replay("frames", exc, path)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The CLI harness's world: a live agent database and its configurations."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(cli.DB_ENV, raising=False)
        w = fuzz_cli.make_world(tmp_path_factory.mktemp("cli-world"))
        yield w
        w.close()


@pytest.mark.parametrize("path", _params("cli"))
def test_cli_corpus(world: Any, path: Path) -> None:
    try:
        fuzz_cli.check(world, path.read_bytes())
    except fuzz_cli.OracleViolation as exc:
        _replay("cli", exc, path)


# -- the oracle can fail ---------------------------------------------------------------------


def test_frames_oracle_catches_a_decoder_that_skips_the_crc(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unseal_without_crc(chunk: bytes) -> bytes:
        try:
            raw: bytes = cobs.decode(chunk)
        except cobs.DecodeError as exc:
            raise FrameCorrupt("cobs", str(exc)) from None
        if len(raw) <= CRC_BYTES:
            raise FrameCorrupt("crc", "no room for a CRC")
        return raw[:-CRC_BYTES]  # the trailer is never compared

    data = (CORPUS / "frames" / "hostile-bad-crc").read_bytes()
    fuzz_frames.check(data)
    monkeypatch.setattr(frames, "unseal", unseal_without_crc)
    with pytest.raises(fuzz_frames.OracleViolation, match="reference: crc"):
        fuzz_frames.check(data)


def test_frames_oracle_catches_a_decoder_that_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    real = frames.decode_one

    def fragile(chunk: bytes) -> Any:
        if len(chunk) > 300:  # a length bug, as an off-by-one in a COBS loop would give
            raise IndexError("index out of range")
        return real(chunk)

    monkeypatch.setattr(frames, "decode_one", fragile)
    with pytest.raises(fuzz_frames.OracleViolation, match="IndexError"):
        fuzz_frames.check((CORPUS / "frames" / "sealed-at-cap").read_bytes())


def test_cli_oracle_catches_a_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cli.DB_ENV, raising=False)
    w = fuzz_cli.make_world(tmp_path)
    try:
        data = (CORPUS / "cli" / "query-write").read_bytes()
        assert fuzz_cli.check(w, data).code == 1  # refused: read-only
        # The deliberate bug: the CLI's connection is an ordinary read-write one.
        monkeypatch.setattr(cliaccess, "connect", lambda path, **_: connect(path))
        with pytest.raises(fuzz_cli.OracleViolation, match="committed to the database"):
            fuzz_cli.check(w, data)
    finally:
        w.close()


# -- atheris under libFuzzer -----------------------------------------------------------------


@pytest.mark.timeout(FUZZ_SECONDS + 120)
@pytest.mark.parametrize("target", list(TARGETS))
def test_fuzz(target: str, tmp_path: Path, chaos_report: Any) -> None:
    corpus, artifacts = tmp_path / "corpus", tmp_path / "artifacts"
    shutil.copytree(CORPUS / target, corpus, ignore=shutil.ignore_patterns(README))
    artifacts.mkdir()
    env = {k: v for k, v in os.environ.items() if k != cli.DB_ENV}
    env["IRONFLEET_FUZZ_WORKDIR"] = str(tmp_path / "world")
    harness = HERE / f"fuzz_{target}.py"
    proc = subprocess.run(
        [sys.executable, str(harness), f"-max_total_time={FUZZ_SECONDS}", "-timeout=20",
         "-rss_limit_mb=2048", "-print_final_stats=1", f"-artifact_prefix={artifacts}/",
         str(corpus)],
        capture_output=True, text=True, env=env, timeout=FUZZ_SECONDS + 90, check=False,
    )  # fmt: skip
    found = sorted(artifacts.iterdir())
    failure = (
        f"fuzz_{target} exited {proc.returncode}; crashers: {[str(p) for p in found]}\n"
        f"Reproduce: python {harness.relative_to(HERE.parents[1])} CRASHER. Copy the crasher "
        f"into tests/chaos/corpus/{target}/crash-<what> so it stays a regression test.\n"
        + proc.stderr[-4000:]
    )
    assert not found, failure
    assert proc.returncode == 0, failure
    stats = fuzz_stats(proc.stderr)
    assert stats["executed"] >= MIN_EXECS_PER_SECOND * FUZZ_SECONDS, stats
    chaos_report.record(TARGETS[target], injected=stats["executed"])
    known = re.findall(r"^KNOWN-BUG (\S+):", proc.stderr, re.MULTILINE)
    print(f"fuzz_{target}: {stats}; open bugs hit: {known or 'none'}")


def fuzz_stats(stderr: str) -> dict[str, int]:
    """Executions, rate, coverage and features from libFuzzer's final report."""
    done = re.findall(r"^#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/", stderr, re.MULTILINE)
    executed = re.search(r"^stat::number_of_executed_units:\s+(\d+)", stderr, re.MULTILINE)
    rate = re.search(r"^stat::average_exec_per_sec:\s+(\d+)", stderr, re.MULTILINE)
    assert done, f"no '#N DONE' line from libFuzzer:\n{stderr[-2000:]}"
    assert executed, f"no final stats (-print_final_stats=1):\n{stderr[-2000:]}"
    assert rate is not None
    _, cov, ft, corp = (int(x) for x in done[-1])
    return {"executed": int(executed.group(1)), "per_second": int(rate.group(1)),
            "coverage": cov, "features": ft, "corpus": corp}  # fmt: skip
