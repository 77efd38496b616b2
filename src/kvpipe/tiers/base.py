"""The Tier contract every storage tier (built-in or plugin) follows, and what a tier factory receives."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import attrs

from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import HostPool, MemoryObj
from kvpipe.serde.base import Serde

if TYPE_CHECKING:
    from kvpipe.config import Config

__all__ = ["Tier", "TierContext", "TierCounters", "TierStats"]


@attrs.frozen
class TierStats:
    """A snapshot of one tier's counters."""

    name: str
    chunks: int
    bytes: int
    hits: int
    misses: int
    puts: int
    put_failures: int
    corrupt: int
    evictions: int
    available: bool = True
    extra: dict[str, float] = attrs.field(factory=dict)


@attrs.define
class TierCounters:
    """The counters every local tier keeps, and the :class:`TierStats` snapshot of them."""

    hits: int = 0
    misses: int = 0
    puts: int = 0
    put_failures: int = 0
    corrupt: int = 0
    evictions: int = 0

    def snapshot(self, name: str, chunks: int, nbytes: int, extra: dict[str, float]) -> TierStats:
        """These counters with a tier's name, size and extra figures."""
        return TierStats(name, chunks, nbytes, self.hits, self.misses, self.puts, self.put_failures, self.corrupt,
                         self.evictions, extra=extra)


@attrs.frozen
class TierContext:
    """What a tier factory gets: the effective config, the host pool (for staging reads), and the serde to use
    for entries stored as bytes."""

    config: Config
    pool: HostPool
    serde: Serde


@runtime_checkable
class Tier(Protocol):
    """An async chunk store. Misses are values (``False``/``None``), never exceptions.

    ``get_many`` returns, for each key, a :class:`MemoryObj` holding the decoded chunk tensor (the caller owns one
    reference and releases it) or ``None``. A corrupt, truncated or foreign entry is a miss and is deleted.
    ``put_many`` stores each object (copying or encoding what it needs; the caller keeps its reference) and returns
    how many were stored; "no room" is a smaller count, not an exception. A tier that cannot be reached raises
    :class:`~kvpipe.errors.TierUnavailable`, which the pipeline turns into misses.
    """

    name: str

    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys are present."""
        ...

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        """The chunks under ``keys`` (``None`` for a miss)."""
        ...

    async def put_many(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj]) -> int:
        """Store ``objs`` under ``keys``; return the number stored."""
        ...

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        """Delete ``keys``; return the number that existed."""
        ...

    def statistics(self) -> TierStats:
        """A snapshot of the tier's counters."""
        ...

    async def aclose(self) -> None:
        """Release every resource; idempotent."""
        ...
