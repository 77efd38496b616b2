"""kvpipe: a KV-cache layer for LLM inference engines.

Stores the KV cache of every chunk of tokens in tiers (CPU pool, disk, remote stores) and gives it back, so an
engine skips prefill of text it has seen before.
"""

from __future__ import annotations

from kvpipe.api import Cache, CacheStats, KVCache, RetrieveResult, open_cache
from kvpipe.config import Config
from kvpipe.errors import (
    CapacityError,
    ConfigError,
    CorruptEntry,
    KvpipeError,
    PluginError,
    ProtocolError,
    TierError,
    TierUnavailable,
)
from kvpipe.keys import ChunkKey, KeyPrefix

__version__ = "0.1.0"

__all__ = [
    "Cache",
    "CacheStats",
    "CapacityError",
    "ChunkKey",
    "Config",
    "ConfigError",
    "CorruptEntry",
    "KVCache",
    "KeyPrefix",
    "KvpipeError",
    "PluginError",
    "ProtocolError",
    "RetrieveResult",
    "TierError",
    "TierUnavailable",
    "__version__",
    "open_cache",
]
