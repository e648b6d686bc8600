"""The delivery cursor: acked runs in any order give the contiguous prefix, never more."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.resilience.cursor import AckedRun, ClassedCursor, DeliveryCursor, Position, is_held


def partition(total: int, cuts: list[int]) -> list[tuple[int, int]]:
    """Rows 1..total cut into contiguous runs at `cuts`."""
    edges = sorted({c for c in cuts if 1 <= c < total})
    starts = [1, *(c + 1 for c in edges)]
    ends = [*edges, total]
    return list(zip(starts, ends, strict=True))


def runs_with_positions(bounds: list[tuple[int, int]]) -> list[AckedRun]:
    # Stream "s<k>" holds the rows congruent to k mod 3; row r is seq r of epoch 1.
    out = []
    for first, last in bounds:
        positions: dict[str, Position] = {}
        for row in range(first, last + 1):
            positions[f"s{row % 3}"] = (1, row)
        out.append(AckedRun(first, last, positions))
    return out


histories = st.tuples(
    st.integers(1, 200), st.lists(st.integers(1, 199), max_size=40), st.randoms(), st.floats(0, 1)
)


@settings(max_examples=1000)
@given(histories)
def test_any_order_gives_the_contiguous_prefix_and_never_moves_back(
    history: tuple[int, list[int], random.Random, float],
) -> None:
    total, cuts, rnd, dup_share = history
    runs = runs_with_positions(partition(total, cuts))
    order = runs + [r for r in runs if rnd.random() < dup_share]  # some acked twice
    rnd.shuffle(order)
    cursor = DeliveryCursor()
    acked: set[int] = set()
    checkpoints: dict[str, Position] = {}
    for run in order:
        before = cursor.delivered
        moved = cursor.ack(run)
        acked.update(range(run.first, run.last + 1))
        prefix = 0
        while prefix + 1 in acked:
            prefix += 1
        assert cursor.delivered == prefix  # exactly the contiguous prefix
        assert cursor.delivered >= before
        if moved is None:
            assert cursor.delivered == before
        else:
            assert moved[0] == cursor.delivered > before
            for stream, pos in moved[1].items():
                assert pos[1] <= cursor.delivered  # nothing beyond the cursor
                checkpoints[stream] = max(checkpoints.get(stream, pos), pos)
    assert cursor.delivered == total
    assert cursor.pending == 0
    expected = {f"s{r % 3}": (1, r) for r in range(max(1, total - 2), total + 1)}
    assert checkpoints == expected


def test_a_run_ahead_of_a_gap_waits_then_joins() -> None:
    cursor = DeliveryCursor(10)
    assert cursor.ack(AckedRun(21, 30, {"a": (1, 30)})) is None
    assert cursor.pending == 1
    assert cursor.ack(AckedRun(11, 20, {"a": (1, 20), "b": (2, 5)})) == (
        30,
        {"a": (1, 30), "b": (2, 5)},
    )
    assert cursor.ack(AckedRun(11, 20, {"a": (1, 20)})) is None  # a duplicate ack
    assert cursor.delivered == 30


def test_restore_never_lowers_and_drops_covered_runs() -> None:
    cursor = DeliveryCursor(5)
    cursor.ack(AckedRun(50, 60, {}))
    cursor.restore(3)
    assert cursor.delivered == 5
    cursor.restore(70)
    assert (cursor.delivered, cursor.pending) == (70, 0)


def test_pending_runs_are_bounded() -> None:
    cursor = DeliveryCursor(0, max_pending=8)
    for k in range(100):
        cursor.ack(AckedRun(10 * k + 2, 10 * k + 10, {}))  # row 10k+1 never acked
    assert cursor.pending == 8
    with pytest.raises(ValueError, match="max_pending"):
        DeliveryCursor(max_pending=0)


def test_a_cursor_jumping_to_the_highest_ack_is_caught() -> None:
    """The mutant the property exists for: delivered = highest row acked so far."""

    class Jumping(DeliveryCursor):
        def ack(self, run: AckedRun) -> tuple[int, dict[str, Position]] | None:
            if run.last <= self.delivered:
                return None
            self.delivered = run.last
            return run.last, dict(run.positions)

    rnd = random.Random(3)
    caught = 0
    for _ in range(100):
        runs = runs_with_positions(partition(50, [rnd.randrange(1, 50) for _ in range(5)]))
        rnd.shuffle(runs)
        cursor, acked = Jumping(), set()
        for run in runs:
            cursor.ack(run)
            acked.update(range(run.first, run.last + 1))
            if any(r not in acked for r in range(1, cursor.delivered + 1)):
                caught += 1
                break
    assert caught > 50


# -- the classed cursor: the backlog drains by priority class ---------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 60),
    st.lists(st.integers(0, 3), min_size=60, max_size=60),
    st.lists(st.tuples(st.integers(1, 60), st.integers(0, 30), st.sampled_from([0, 1, 2, 3, None])),
             max_size=40),
    st.randoms(use_true_random=False),
)  # fmt: skip
def test_classed_cursor_delivers_exactly_the_rows_every_class_covers(
    total: int,
    classes: list[int],
    runs: list[tuple[int, int, int | None]],
    order: random.Random,
) -> None:
    """Independent definition: each class's frontier is the longest prefix of rowids that
    runs of that class or of every class span; `delivered` is the lowest frontier; and
    every row at or below it is spanned by a run of its own class (or of every class)."""
    acked = [(first, first + width, cls) for first, width, cls in runs]
    order.shuffle(acked)
    cursor = ClassedCursor(0, classes=4)
    reported = 0
    for first, last, cls in acked:
        moved = cursor.ack(AckedRun(first, last, {}), cls)
        if moved is not None:
            assert moved[0] > reported
            reported = moved[0]

    def frontier(c: int) -> int:
        f = 0
        while any(lo <= f + 1 <= hi and k in (None, c) for lo, hi, k in acked):
            f += 1
        return f

    assert cursor.delivered == min(frontier(c) for c in range(4))
    assert reported == cursor.delivered
    for row in range(1, min(cursor.delivered, total) + 1):
        cls = classes[row - 1]
        assert any(lo <= row <= hi and k in (None, cls) for lo, hi, k in acked), row


def test_classed_cursor_positions_wait_for_every_class() -> None:
    cursor = ClassedCursor(0, classes=2)
    assert cursor.ack(AckedRun(1, 10, {"hi": (1, 5)}), 1) is None  # class 0 not there yet
    moved = cursor.ack(AckedRun(1, 10, {"lo": (1, 5)}), 0)
    assert moved == (10, {"hi": (1, 5), "lo": (1, 5)})
    assert cursor.ack(AckedRun(11, 12, {"live": (1, 1)}), None) == (12, {"live": (1, 1)})
    assert cursor.frontier(0) == cursor.frontier(1) == cursor.delivered == 12


def test_runs_that_touch_wait_as_one_so_no_cap_drops_them() -> None:
    """10,000 adjacent live runs acked ahead of a backlog, with a cap of 4 waiting runs:
    they join into one, and the backlog's ack passes them all (a cap counting each run
    dropped the oldest and left a hole the cursor waited on)."""
    cursor = ClassedCursor(0, classes=2, max_pending=4)
    for row in range(101, 10_101):
        assert cursor.ack(AckedRun(row, row, {"live": (1, row)})) is None
    assert cursor.pending == 2  # one joined run per class
    assert cursor.ack(AckedRun(1, 100, {"old": (1, 100)}), 1) is None
    moved = cursor.ack(AckedRun(1, 100, {}), 0)
    assert moved == (10_100, {"live": (1, 10_100), "old": (1, 100)})


def test_classed_frontiers_restore_per_class_and_never_lower() -> None:
    """What the store persists (`frontiers`) restores each class on its own: a class
    drained ahead stays ahead after a restart, `delivered` stays the lowest."""
    cursor = ClassedCursor(10)
    cursor.ack(AckedRun(11, 50, {"s": (1, 5)}), 3)
    assert cursor.frontiers == (10, 10, 10, 50, 10, 10, 10, 10)
    assert cursor.delivered == 10
    again = ClassedCursor(10)
    again.restore(10, cursor.frontiers)
    assert again.frontiers == cursor.frontiers
    again.restore(20, (5,) * 8)  # a lower persisted frontier never lowers one
    assert again.frontiers == (20, 20, 20, 50, 20, 20, 20, 20)
    assert [is_held(r, 3, 20, again.frontiers) for r in (20, 50, 51)] == [True, True, False]
    assert [is_held(r, 9, 20, again.frontiers) for r in (20, 21)] == [True, False]  # class 7
