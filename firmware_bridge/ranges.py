"""Helpers for sets of link sequence numbers expressed as [lo, hi] ranges."""

from __future__ import annotations

from collections.abc import Iterable


def to_ranges(numbers: Iterable[int], limit: int) -> tuple[tuple[int, int], ...]:
    """Sorted, disjoint, non-adjacent inclusive ranges covering `numbers`; at most `limit`.

    The lowest ranges are kept when there are more: they are the ones blocking progress.
    """
    out: list[tuple[int, int]] = []
    for n in sorted(set(numbers)):
        if out and n == out[-1][1] + 1:
            out[-1] = (out[-1][0], n)
        else:
            if len(out) == limit:
                break
            out.append((n, n))
    return tuple(out)


def expand(ranges: Iterable[tuple[int, int]], cap: int) -> list[int]:
    """Every number in `ranges`, at most `cap` of them (a peer sets the bounds)."""
    out: list[int] = []
    for lo, hi in ranges:
        for n in range(lo, hi + 1):
            if len(out) >= cap:
                return out
            out.append(n)
    return out
