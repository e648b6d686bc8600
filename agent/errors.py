"""Errors of the agent, classified by what the caller should do about them.

Only errors something raises and something else catches by class live here: a failed
uplink is a state of the uplink thread (its breaker and `last_error`), not an exception,
and a damaged database is quarantined and salvaged at start (agent/salvage.py)."""

from __future__ import annotations


class AgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(AgentError):
    """A configuration file is unreadable or a key has a bad value; names key and file."""


class StoreError(AgentError):
    """The event store could not do what was asked."""


class StoreFull(StoreError):
    """Nothing more can be stored without losing data the policy protects.

    The caller stops ACKing: the controller keeps its ring buffer and retransmits later.
    """


class CommitFailed(StoreError):
    """A transaction did not commit (I/O error, disk full); nothing in it is durable."""
