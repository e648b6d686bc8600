"""Errors of the agent, classified by what the caller should do about them."""

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


class StoreCorrupt(StoreError):
    """The database file failed its integrity check."""


class UplinkError(AgentError):
    """The fleet link failed."""


class UplinkRejected(UplinkError):
    """The broker refused us (credentials, ACL): retrying will not help."""


# Transient errors are retried with backoff; permanent ones need a person.
TRANSIENT_ERRORS: tuple[type[AgentError], ...] = (CommitFailed, StoreFull, UplinkError)
PERMANENT_ERRORS: tuple[type[AgentError], ...] = (ConfigError, StoreCorrupt, UplinkRejected)
