"""Example kvpipe plugin, found through the ``kvpipe`` entry-point group.

- ``dict://NAME``: an in-process tier holding encoded entries (header + payload bytes) in a dict shared by every
  tier of the same NAME in the process, validated on every read like any byte tier. Useful in tests of code that
  wants a "remote" without a server.
- ``count_bytes``: a store-and-retrieve stage that counts chunks and bytes flowing through (enable it with
  ``extra_stages: [count_bytes]``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from kvpipe.plugin_api import (
    HEADER_SIZE,
    Batch,
    ChunkKey,
    CorruptEntry,
    EntryHeader,
    MemoryObj,
    StageBase,
    TierContext,
    TierStats,
    hookimpl,
)

STORES: dict[str, dict[str, bytes]] = {}
COUNTS: dict[str, int] = {"chunks": 0, "bytes": 0}


@attrs.define(eq=False)
class DictTier:
    """Entries as bytes in a process-wide dict (``STORES[name]``)."""

    store: dict[str, bytes]
    ctx: TierContext
    name: str = "dict"
    hits: int = 0
    misses: int = 0
    puts: int = 0
    corrupt: int = 0

    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        return [str(k) in self.store for k in keys]

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        out: list[MemoryObj | None] = []
        for k in keys:
            data = self.store.get(str(k))
            obj = None
            if data is not None:
                try:
                    hdr = EntryHeader.from_bytes(data)
                    hdr.check_key(k)
                    payload = memoryview(data)[HEADER_SIZE:]
                    hdr.check_payload(payload, len(payload))
                    obj = self.ctx.pool.allocate(hdr.shape, hdr.dtype, hdr.num_tokens)
                    if obj is not None:
                        self.ctx.serde.decode_into(payload, obj.tensor)
                except CorruptEntry:
                    if obj is not None:
                        obj.release()
                        obj = None
                    self.corrupt += 1
                    del self.store[str(k)]
            if obj is None:
                self.misses += 1
            else:
                self.hits += 1
            out.append(obj)
        return out

    async def put_many(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj]) -> int:
        for k, o in zip(keys, objs, strict=True):
            payload = self.ctx.serde.encode(o.tensor)
            n = memoryview(payload).nbytes
            hdr = EntryHeader.for_payload(k, self.ctx.serde.name, o.tensor, o.num_tokens, payload, n)
            self.store[str(k)] = hdr.to_bytes() + bytes(payload)
            self.puts += 1
        return len(keys)

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        return sum(self.store.pop(str(k), None) is not None for k in keys)

    def statistics(self) -> TierStats:
        return TierStats(self.name, len(self.store), sum(map(len, self.store.values())), self.hits, self.misses,
                         self.puts, 0, self.corrupt, 0)

    async def aclose(self) -> None:
        return None


async def open_dict_tier(url: str, ctx: TierContext) -> DictTier:
    """``dict://NAME`` → the tier over ``STORES[NAME]``."""
    name = url.split("://", 1)[1].strip("/") or "default"
    return DictTier(STORES.setdefault(name, {}), ctx)


@attrs.define(eq=False)
class CountBytes(StageBase):
    """Counts the chunks and bytes of the KV flowing through a pipeline."""

    name: str = "count_bytes"

    async def process(self, batch: Batch) -> Batch:
        for s, e in batch.spans:
            if batch.kv is not None:
                COUNTS["chunks"] += 1
                per_token = batch.kv[:, :, :1].numel() * batch.kv.element_size()
                COUNTS["bytes"] += per_token * (e - s)
        return batch


@hookimpl
def kvpipe_register_tiers(registry: Any) -> None:
    """``dict://``."""
    registry.add("dict", open_dict_tier)


@hookimpl
def kvpipe_register_stages(registry: Any) -> None:
    """``count_bytes`` in the store pipeline."""
    registry.add("count_bytes", lambda config: CountBytes(), pipeline="store")
