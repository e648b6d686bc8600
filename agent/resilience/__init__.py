"""Pure resilience core: replay, dedup, sequencing with gaps, the delivery cursor, the
loss ledger, checkpoints, circuit breaker and backoff.

Nothing here does I/O or reads the wall clock; time is passed in (or injected as a clock),
so every rule is tested by stepping a fake clock. The names below are the public API that
the rest of the agent and outside checkers import.
"""

from agent.resilience.backoff import Backoff
from agent.resilience.breaker import BreakerSnapshot, BreakerState, CircuitBreaker
from agent.resilience.checkpoint import CheckpointManager
from agent.resilience.dedup import dedup_key, deduplicate
from agent.resilience.event import Event
from agent.resilience.replay import content_key, replay

__all__ = [
    "Backoff",
    "BreakerSnapshot",
    "BreakerState",
    "CheckpointManager",
    "CircuitBreaker",
    "Event",
    "content_key",
    "dedup_key",
    "deduplicate",
    "replay",
]
