"""The CPU tier: the hot cache over the host pool.

Entries are :class:`MemoryObj` regions of the pool, adopted without a copy when a chunk is already in pool memory
(the store path gathers into the pool; disk and remote reads land in the pool), so promotion is free. The pool
calls :meth:`CpuTier.evict_for` when it runs out of room: unpinned entries that nobody is reading go, least
recently used first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import cast

import attrs

from kvpipe.keys import ChunkKey
from kvpipe.layouts.copy import copy_kv
from kvpipe.memory.eviction import EvictionPolicy
from kvpipe.memory.pool import HostPool, MemoryObj
from kvpipe.tiers.base import TierCounters, TierStats

__all__ = ["CpuTier"]

log = logging.getLogger(__name__)


@attrs.define(eq=False)
class CpuTier:
    """A dict of pool regions with an eviction policy and pin leases."""

    pool: HostPool
    policy: EvictionPolicy
    name: str = "cpu"
    _entries: dict[ChunkKey, MemoryObj] = attrs.field(factory=dict)
    _pins: dict[ChunkKey, float] = attrs.field(factory=dict)
    _bytes: int = 0
    _n: TierCounters = attrs.field(factory=TierCounters)
    _closed: bool = False

    def __attrs_post_init__(self) -> None:
        self.pool.evictor = self.evict_for

    # ----------------------------------------------------------------- the Tier contract
    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys are cached."""
        return [k in self._entries for k in keys]

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        """The cached chunks (one new reference each) or ``None``."""
        return self.get_many_nowait(keys)

    def get_many_nowait(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        """:meth:`get_many` without awaiting (the tier never does I/O)."""
        out: list[MemoryObj | None] = []
        for k in keys:
            obj = self._entries.get(k)
            if obj is None:
                self._n.misses += 1
                out.append(None)
            else:
                self._n.hits += 1
                self.policy.touch(k)
                out.append(obj.ref())
        return out

    def peek_many_nowait(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        """The cached chunks (one new reference each) or ``None``, for the cache's own use (writing a chunk behind
        again): not counted as hits or misses, recency unchanged."""
        out: list[MemoryObj | None] = []
        for k in keys:
            obj = self._entries.get(k)
            out.append(None if obj is None else obj.ref())
        return out

    async def put_many(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj]) -> int:
        """Cache ``objs``; pool regions are adopted (no copy), other tensors are copied into the pool."""
        return self.put_many_nowait(keys, objs)

    def put_many_nowait(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj]) -> int:
        """:meth:`put_many` without awaiting."""
        stored = 0
        for k, obj in zip(keys, objs, strict=True):
            if k in self._entries:
                self.policy.touch(k)
                stored += 1
                continue
            if obj.pool is self.pool:
                held = obj.ref()
            else:
                copy = self.pool.allocate(tuple(obj.tensor.shape), obj.tensor.dtype, obj.num_tokens)
                if copy is None:
                    self._n.put_failures += 1
                    continue
                copy_kv(copy.tensor, obj.tensor)
                held = copy
            self._entries[k] = held
            self._bytes += held.nbytes
            self.policy.insert(k)
            self._n.puts += 1
            stored += 1
        return stored

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        """Drop entries (readers holding a reference keep their region until they release it)."""
        return sum(self._drop(k) for k in keys)

    def statistics(self) -> TierStats:
        """A snapshot of the tier's counters."""
        return self._n.snapshot(self.name, len(self._entries), self._bytes, {"pinned": float(len(self._pins))})

    async def aclose(self) -> None:
        """Drop every entry; idempotent."""
        if self._closed:
            return
        self._closed = True
        for k in list(self._entries):
            self._drop(k)
        self._pins.clear()
        if self.pool.evictor == self.evict_for:
            self.pool.evictor = None

    # ----------------------------------------------------------------- pins and eviction
    def pin(self, keys: Sequence[ChunkKey], lease_secs: float) -> int:
        """Protect cached ``keys`` from eviction for ``lease_secs`` (renewing a running lease); returns how many
        were cached."""
        until = time.monotonic() + lease_secs
        n = 0
        for k in keys:
            if k in self._entries:
                self._pins[k] = until
                n += 1
        return n

    def unpin(self, keys: Sequence[ChunkKey]) -> int:
        """End the leases of ``keys``; returns how many were pinned."""
        return sum(self._pins.pop(k, None) is not None for k in keys)

    def pinned_keys(self, keys: Sequence[ChunkKey]) -> list[ChunkKey]:
        """Which of ``keys`` hold a pin now."""
        return [k for k in keys if k in self._pins]

    def local_keys(self) -> list[ChunkKey]:
        """Every cached key."""
        return list(self._entries)

    def evict_for(self, nbytes: int) -> bool:
        """Evict one entry that frees memory (unpinned or lease expired, not being read); ``False`` when none
        can go. Called by the pool when an allocation finds no room."""
        now = time.monotonic()
        for k in cast("list[ChunkKey]", list(self.policy.candidates())):  # the policy holds our keys
            until = self._pins.get(k)
            if until is not None:
                if until > now:
                    continue
                del self._pins[k]
            obj = self._entries.get(k)
            if obj is None or obj.refcount > 1:  # someone is reading it: evicting would free nothing
                continue
            self._drop(k)
            self._n.evictions += 1
            log.debug("cpu tier evicted %s (%d bytes) for %d bytes", k, obj.nbytes, nbytes)
            return True
        return False

    def _drop(self, key: ChunkKey) -> bool:
        obj = self._entries.pop(key, None)
        if obj is None:
            return False
        self._pins.pop(key, None)
        self.policy.remove(key)
        self._bytes -= obj.nbytes
        obj.release()
        return True

    def __len__(self) -> int:
        return len(self._entries)
