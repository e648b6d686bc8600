"""Flash wear at run time (agent/flashwear.py): rate, bytes per event and years left from
samples of the process's own write counter; and the daemon publishing them."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import from_mapping
from agent.doctor import check_flash
from agent.flashwear import MAX_SAMPLES, WINDOW, YEAR, FlashWear, process_write_bytes


def test_figures_over_the_window() -> None:
    wear = FlashWear()
    assert wear.figures() == {}
    wear.sample(0.0, 1_000, 0)
    assert wear.figures() == {"flash_write_bytes": 1_000}  # one sample spans no time
    wear.sample(10.0, 1_000 + 40_000, 100)
    assert wear.figures(endurance_bytes=int(4_000 * YEAR)) == {
        "flash_write_bytes": 41_000,  # the process's count, start-up writes included
        "flash_write_bytes_per_s": 4_000.0,
        "flash_bytes_per_event": 400.0,
        "flash_years_left": 1.0,
    }


def test_old_samples_leave_the_window_but_the_total_stays() -> None:
    wear = FlashWear()
    wear.sample(0.0, 0, 0)
    wear.sample(1.0, 1_000_000, 10)  # a burst at start (recovery, a checkpoint)
    for t in range(2, int(WINDOW) + 100):
        wear.sample(float(t), 1_000_000 + 100 * (t - 1), 10 + (t - 1))
    got = wear.figures()
    assert got["flash_bytes_per_event"] == 100.0  # the burst is out of the window
    assert got["flash_write_bytes"] == 1_000_000 + 100 * (int(WINDOW) + 98)
    assert len(wear._samples) <= MAX_SAMPLES


def test_nothing_counted_nothing_claimed() -> None:
    wear = FlashWear()
    wear.sample(0.0, None, 0)
    wear.sample(5.0, None, 50)
    assert wear.figures(endurance_bytes=10**12) == {}
    wear.sample(6.0, 500, 60)
    wear.sample(7.0, 500, 70)  # nothing written: no rate, so no projection
    assert "flash_years_left" not in wear.figures(endurance_bytes=10**12)


def test_process_write_bytes_reads_the_kernel_counter(tmp_path: Path) -> None:
    assert isinstance(process_write_bytes(), int)
    fake = tmp_path / "io"
    fake.write_text("rchar: 1\nwrite_bytes: 4096\ncancelled_write_bytes: 0\n")
    assert process_write_bytes(fake) == 4096
    fake.write_text("rchar: 1\n")
    assert process_write_bytes(fake) is None
    assert process_write_bytes(tmp_path / "missing") is None


@pytest.mark.parametrize(("years", "status"), [(2.0, "warn"), (40.0, "ok")])
def test_doctor_warns_below_the_configured_life(years: float, status: str) -> None:
    config = from_mapping({"store": {"flash_endurance_bytes": 10**14, "flash_warn_years": 5.0},
                           "uplink": {"enabled": False}})  # fmt: skip
    flash = {"write_bytes": 1, "write_bytes_per_s": 1000.0, "bytes_per_event": 300.0,
             "years_left": years}  # fmt: skip
    check = check_flash(config, flash)
    assert check is not None
    assert check.status == status
    assert f"{years:.1f} years" in check.detail
    assert "300 B per event" in check.detail
    no_budget = {**flash, "years_left": None}
    assert check_flash(config, no_budget) is None  # nothing to judge: no line
