"""Write-behind to a slow tier (disk, remote): a bounded queue and one worker task per tier.

``submit_nowait`` never blocks the store path: when the queue is full the write is dropped and counted. The
worker holds a reference on each memory object until it is written, so the pool region cannot be reused under
a write in flight.

A chunk whose write was dropped, or failed (the tier was down, or took fewer than it was given), is remembered as
*unwritten* (the newest ``UNWRITTEN_MAX`` of them). Such a chunk may still be in the CPU tier, where a later store
of the same tokens finds it and would skip it: the store path asks :meth:`WriteBehind.unwritten` and submits those
chunks again, so storing a prompt again makes it reach the slower tiers after an overload or an outage, instead of
the chunk living in CPU memory alone until it is evicted.

A chunk queued for a slower tier and not yet written there is still readable: :class:`PendingWrites` serves it
from the memory the queue holds, so a retrieve right after a store hits even when the CPU tier has evicted the
chunk or there is no CPU tier (``local_cpu: false``), instead of missing until the write lands.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import MemoryObj
from kvpipe.pipeline.guard import TierGuard

__all__ = ["PendingWrites", "WriteBehind"]

log = logging.getLogger(__name__)

_Item = tuple[list[ChunkKey], list[MemoryObj]]

UNWRITTEN_MAX = 1 << 16  # unwritten chunks remembered per tier (older ones are forgotten: a miss later, no harm)


@attrs.define(eq=False)
class WriteBehind:
    """A bounded write queue in front of one tier."""

    guard: TierGuard
    queue_size: int
    _send: MemoryObjectSendStream[_Item] = attrs.field(init=False)
    _receive: MemoryObjectReceiveStream[_Item] = attrs.field(init=False)
    _pending: int = 0
    _idle: anyio.Event = attrs.field(factory=anyio.Event)
    queued_chunks: int = 0
    written_chunks: int = 0
    dropped_chunks: int = 0
    _unwritten: OrderedDict[ChunkKey, None] = attrs.field(factory=OrderedDict)
    _queued: dict[ChunkKey, MemoryObj] = attrs.field(factory=dict)  # queued or being written, by key

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[_Item](self.queue_size)
        self._idle.set()

    def submit_nowait(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj]) -> bool:
        """Queue a write (taking a reference on each object); ``False`` (dropped, counted) when the queue is full
        or closed."""
        held = [o.ref() for o in objs]
        try:
            self._send.send_nowait((list(keys), held))
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            for o in held:
                o.release()
            self.dropped_chunks += len(held)
            self._remember(keys)
            log.debug("%s write queue full: dropped %d chunks", self.guard.tier.name, len(held))
            return False
        for k, o in zip(keys, held, strict=True):
            self._unwritten.pop(k, None)
            self._queued[k] = o
        self._pending += 1
        self.queued_chunks += len(held)
        if self._idle.is_set():
            self._idle = anyio.Event()
        return True

    async def run(self) -> None:
        """The worker: write queued batches until the queue is closed."""
        async with self._receive:
            async for keys, objs in self._receive:
                try:
                    n = await self.guard.call("put_many", 0, keys, objs)
                    self.written_chunks += n
                    if n < len(keys):  # which ones the tier took is not known: all may be written again
                        self._remember(keys)
                finally:
                    for k, o in zip(keys, objs, strict=True):
                        if self._queued.get(k) is o:
                            del self._queued[k]
                        o.release()
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

    def _remember(self, keys: Sequence[ChunkKey]) -> None:
        for k in keys:
            self._unwritten[k] = None
            self._unwritten.move_to_end(k)
        while len(self._unwritten) > UNWRITTEN_MAX:
            self._unwritten.popitem(last=False)

    def unwritten(self, keys: Sequence[ChunkKey]) -> list[int]:
        """The indices of ``keys`` whose last write to this tier was dropped or failed."""
        if not self._unwritten:
            return []
        return [i for i, k in enumerate(keys) if k in self._unwritten]

    def queued(self, key: ChunkKey) -> MemoryObj | None:
        """The chunk queued (or being written) under ``key``, without a reference taken; ``None`` if none."""
        return self._queued.get(key)

    async def flush(self) -> None:
        """Wait until every queued write is done."""
        await self._idle.wait()

    def close(self) -> None:
        """Stop accepting writes; the worker finishes what is queued and returns."""
        self._send.close()


@attrs.define(eq=False)
class PendingWrites:
    """The chunks the write-behind queues hold, read like a tier (``contains_many``/``get_many``; the retrieve
    path asks it after the CPU tier and before disk and remote). What it hands out is the very memory a store
    gathered, so it is the KV that went in; a write that completes or fails meanwhile only makes it a miss here,
    and the reader asks the tiers below."""

    behind: list[WriteBehind]
    name: str = "pending"
    hits: int = 0

    def _find(self, key: ChunkKey) -> MemoryObj | None:
        for wb in self.behind:
            obj = wb.queued(key)
            if obj is not None:
                return obj
        return None

    def holds_nowait(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys a write queue holds (no await: the store path's check and its queueing are one step)."""
        return [self._find(k) is not None for k in keys]

    def peek_nowait(self, key: ChunkKey) -> MemoryObj | None:
        """The queued chunk with a reference for the caller (not counted as a hit), ``None`` if none."""
        obj = self._find(key)
        return obj.ref() if obj is not None else None

    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys a write queue holds."""
        return self.holds_nowait(keys)

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        """The queued chunks (each with a reference for the caller), ``None`` for the others."""
        out = [self.peek_nowait(k) for k in keys]
        self.hits += sum(o is not None for o in out)
        return out
