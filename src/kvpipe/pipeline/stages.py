"""The pipeline framework: batches of chunks flowing through stages joined by bounded anyio streams.

A request's chunks are cut into sub-batches (``BATCH_CHUNKS`` chunks each) so that stages overlap: the disk read
of one sub-batch runs in a worker thread while the previous one is scattered into the output. Streams hold at
most one batch between two stages, so memory stays bounded whatever the request size.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import attrs
import torch
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from kvpipe.hashing import TokenSpan
from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import MemoryObj

__all__ = ["BATCH_CHUNKS", "Batch", "Stage", "StageBase", "run_stages", "split_batches"]

log = logging.getLogger(__name__)

BATCH_CHUNKS = 8


@attrs.define(eq=False)
class Batch:
    """Some consecutive chunks of one request, as they move through a pipeline."""

    req_id: str
    first: int  # index of the first chunk in the request
    keys: list[ChunkKey]
    spans: list[TokenSpan]
    objs: list[MemoryObj | None]
    tiers: list[str | None]  # where each chunk came from (retrieve) or went (store)
    kv: torch.Tensor | None = None  # store: the engine's KV; retrieve: the output tensor
    info: dict[str, Any] = attrs.field(factory=dict)

    def release(self) -> None:
        """Release every memory object the batch still holds."""
        for i, obj in enumerate(self.objs):
            if obj is not None:
                obj.release()
                self.objs[i] = None


class Stage(Protocol):
    """One step of a pipeline: receives batches, sends batches on."""

    name: str

    async def run(self, receive: ObjectReceiveStream[Batch], send: ObjectSendStream[Batch]) -> None:
        """Process every batch from ``receive`` and send it on; close ``send`` when ``receive`` ends."""
        ...


class StageBase:
    """A stage that maps each batch with :meth:`process` (override :meth:`run` to split or merge)."""

    name = "stage"

    async def process(self, batch: Batch) -> Batch:
        """Work on one batch."""
        return batch

    async def run(self, receive: ObjectReceiveStream[Batch], send: ObjectSendStream[Batch]) -> None:
        async with receive, send:
            async for batch in receive:
                await send.send(await self.process(batch))


def split_batches(req_id: str, keys: Sequence[ChunkKey], spans: Sequence[TokenSpan],
                  kv: torch.Tensor | None, size: int = BATCH_CHUNKS) -> list[Batch]:
    """Cut a request's chunks into batches of ``size``."""
    out = []
    for i in range(0, len(keys), size):
        n = min(size, len(keys) - i)
        out.append(Batch(req_id, i, list(keys[i : i + n]), list(spans[i : i + n]), [None] * n, [None] * n, kv))
    return out


async def run_stages(stages: Sequence[Stage], batches: Sequence[Batch]) -> list[Batch]:
    """Feed ``batches`` through ``stages`` (each stage one task, joined by streams of one batch) and return the
    batches that came out, in order. If a stage fails, every batch's memory objects are released and the error
    propagates."""
    if not stages:
        return list(batches)
    out: list[Batch] = []
    t0 = time.perf_counter()
    try:
        async with anyio.create_task_group() as tg:
            send, receive = anyio.create_memory_object_stream[Batch](1)

            async def feed(s: ObjectSendStream[Batch]) -> None:
                async with s:
                    for b in batches:
                        await s.send(b)

            tg.start_soon(feed, send)
            for stage in stages:
                nsend, nreceive = anyio.create_memory_object_stream[Batch](1)
                tg.start_soon(stage.run, receive, nsend, name=f"kvpipe-stage-{stage.name}")
                receive = nreceive
            async with receive:
                async for b in receive:
                    out.append(b)
    except BaseException:
        for b in batches:
            b.release()
        raise
    log.debug("pipeline %s: %d batches in %.3f ms", "/".join(s.name for s in stages), len(batches),
              (time.perf_counter() - t0) * 1e3)
    return out
