"""The public API for plugin authors: everything a tier, serde, stage or eviction plugin needs, in one place.

Plugins import from here (and from ``kvpipe``), never from kvpipe's internal modules, so those can change.
"""

from __future__ import annotations

from kvpipe.connectors.base import Connector, ReadInto
from kvpipe.errors import CorruptEntry, TierError, TierUnavailable
from kvpipe.hookspecs import hookimpl
from kvpipe.keys import ChunkKey
from kvpipe.memory.eviction import EvictionPolicy
from kvpipe.memory.pool import HostPool, MemoryObj
from kvpipe.pipeline.stages import Batch, Stage, StageBase
from kvpipe.serde.base import Serde
from kvpipe.serde.entry import HEADER_SIZE, EntryHeader
from kvpipe.tiers.base import Tier, TierContext, TierStats

__all__ = [
    "HEADER_SIZE",
    "Batch",
    "ChunkKey",
    "Connector",
    "CorruptEntry",
    "EntryHeader",
    "EvictionPolicy",
    "HostPool",
    "MemoryObj",
    "ReadInto",
    "Serde",
    "Stage",
    "StageBase",
    "Tier",
    "TierContext",
    "TierError",
    "TierStats",
    "TierUnavailable",
    "hookimpl",
]
