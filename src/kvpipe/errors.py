"""The one exception tree of kvpipe.

A cache miss is a value (``None``, ``False``, a hit count of 0), never an exception. Tier failures are caught at
one boundary (the pipeline), logged once, counted, and degraded to misses; these classes are what crosses that
boundary inside the library, and what user mistakes (config, URLs) raise out of it.
"""

from __future__ import annotations

__all__ = [
    "CapacityError",
    "ConfigError",
    "CorruptEntry",
    "KvpipeError",
    "PluginError",
    "ProtocolError",
    "TierError",
    "TierUnavailable",
]


class KvpipeError(Exception):
    """Base of every error kvpipe raises on purpose."""


class ConfigError(KvpipeError, ValueError):
    """A configuration value, URL or argument is invalid; the message names the key, the value and what was
    expected, in one line."""


class PluginError(KvpipeError):
    """A plugin failed to register, or two plugins registered the same name."""


class TierError(KvpipeError):
    """A storage tier failed an operation."""


class TierUnavailable(TierError):
    """The tier cannot be reached now (connection refused, reset, deadline passed, failover)."""


class CorruptEntry(TierError):
    """A stored entry failed validation: bad magic, foreign key, truncated payload, checksum mismatch."""


class ProtocolError(KvpipeError):
    """Bytes received from the network do not follow the expected wire protocol."""


class CapacityError(KvpipeError):
    """A request can never fit (for example one chunk larger than the whole pool)."""
