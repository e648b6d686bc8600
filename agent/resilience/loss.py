"""The loss ledger: how many received events can no longer reach the fleet, and why.

The incident was measured as a loss ratio (1 event kept of 847). The agent's own figure
must move when loss happens, so it counts the events themselves, never streams:

- `shed`: events removed from the buffer before the fleet acknowledged them, by reason
  (`compact_low_priority`, `drop_oldest`, `salvage_lost`, ...), from the `shed` table;
- `gap_lost`: sequence numbers a controller skipped whose gap tracking was given up
  (MAX_GAP_PIECES): a late retransmit of those is no longer recognised, so they count as
  lost; gaps still open are not (the controller may still send them);
- `received`: events stored since the buffer began (a retransmit counts once).

ratio = lost / (received + salvage_lost + gap_lost): salvage losses and skipped sequence
numbers never reached `received` (a salvage rebuilds it from what it kept), so they join
the denominator, and the ratio stays within [0, 1] for any history. Pure arithmetic: the
store feeds it, metrics and the CLI read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

SALVAGE_LOST: Final = "salvage_lost"


@dataclass
class LossLedger:
    """Running totals of events received and lost; every count is exact (Python ints)."""

    received: int = 0
    shed: dict[str, int] = field(default_factory=dict)
    gap_lost: int = 0

    def on_stored(self, events: int) -> None:
        self.received += events

    def on_shed(self, reason: str, events: int) -> None:
        if events:
            self.shed[reason] = self.shed.get(reason, 0) + events

    def on_gap_lost(self, missing: int) -> None:
        self.gap_lost += missing

    @property
    def lost(self) -> int:
        """Events that can no longer reach the fleet."""
        return sum(self.shed.values()) + self.gap_lost

    @property
    def ratio(self) -> float:
        """Share of events that can no longer reach the fleet (0.0 with none seen)."""
        total = self.received + self.shed.get(SALVAGE_LOST, 0) + self.gap_lost
        return min(1.0, self.lost / total) if total else 0.0

    def as_dict(self) -> dict[str, int | float]:
        """Flat figures for the published snapshot (`loss_*` keys)."""
        out: dict[str, int | float] = {
            "loss_received": self.received,
            "loss_gap_lost": self.gap_lost,
            "loss_lost": self.lost,
            "loss_ratio": self.ratio,
        }
        for reason, count in sorted(self.shed.items()):
            out[f"loss_shed_{reason}"] = count
        return out
