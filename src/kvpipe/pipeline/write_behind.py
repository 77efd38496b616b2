"""Write-behind to a slow tier (disk, remote): a bounded queue and one worker task per tier.

``submit_nowait`` never blocks the store path: when the queue is full the write is dropped and counted. The
worker holds a reference on each memory object until it is written, so the pool region cannot be reused under
a write in flight.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import anyio
import attrs
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import MemoryObj
from kvpipe.pipeline.guard import TierGuard

__all__ = ["WriteBehind"]

log = logging.getLogger(__name__)

_Item = tuple[list[ChunkKey], list[MemoryObj]]


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
            log.debug("%s write queue full: dropped %d chunks", self.guard.tier.name, len(held))
            return False
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
                finally:
                    for o in objs:
                        o.release()
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

    async def flush(self) -> None:
        """Wait until every queued write is done."""
        await self._idle.wait()

    def close(self) -> None:
        """Stop accepting writes; the worker finishes what is queued and returns."""
        self._send.close()
