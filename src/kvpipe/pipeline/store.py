"""Store stages: dedupe → gather (engine KV → pool) → write (CPU tier now, slower tiers write-behind).

A chunk is not new, and is neither copied nor queued again, when the CPU tier holds it (``tiers[i] = "cpu"``) or a
write queue still holds it for a slower tier (``"pending"``: with no CPU tier, ``local_cpu: false``, or after the
CPU tier evicted it). Storing a prompt again while its writes are in flight so costs no copy and no second write."""

from __future__ import annotations

import attrs

from kvpipe.keys import ChunkKey
from kvpipe.layouts.copy import copy_kv
from kvpipe.memory.pool import HostPool, MemoryObj
from kvpipe.pipeline.stages import Batch, StageBase
from kvpipe.pipeline.write_behind import PendingWrites, WriteBehind
from kvpipe.tiers.cpu import CpuTier

__all__ = ["DedupeStage", "GatherStage", "WriteStage"]


@attrs.define(eq=False)
class DedupeStage(StageBase):
    """Marks chunks the CPU tier already holds (``tiers[i] = "cpu"``) or a write queue still holds
    (``"pending"``) so they are neither copied nor rewritten."""

    cpu: CpuTier | None
    pending: PendingWrites | None = None
    name: str = "dedupe"

    async def process(self, batch: Batch) -> Batch:
        if self.cpu is not None:
            for i, present in enumerate(await self.cpu.contains_many(batch.keys)):
                if present:
                    batch.tiers[i] = "cpu"
        _mark_pending(batch, self.pending, [i for i, t in enumerate(batch.tiers) if t is None])
        return batch


def _mark_pending(batch: Batch, pending: PendingWrites | None, idx: list[int]) -> list[int]:
    """Mark ``"pending"`` the chunks among ``idx`` that a write queue holds; returns the others."""
    if pending is None or not idx:
        return idx
    held = pending.holds_nowait([batch.keys[i] for i in idx])
    for i, h in zip(idx, held, strict=True):
        if h:
            batch.tiers[i] = "pending"
    return [i for i, h in zip(idx, held, strict=True) if not h]


@attrs.define(eq=False)
class GatherStage(StageBase):
    """Copies each new chunk's KV from the engine tensor into pool memory. A full pool skips the chunk (counted
    in ``batch.info["skipped"]``); it never waits."""

    pool: HostPool
    name: str = "gather"

    async def process(self, batch: Batch) -> Batch:
        kv = batch.kv
        assert kv is not None  # the store path always sets it
        skipped = 0
        for i, (start, end) in enumerate(batch.spans):
            if batch.tiers[i] is not None:
                continue
            src = kv[:, :, start:end]
            obj = self.pool.allocate(tuple(src.shape), src.dtype, end - start)
            if obj is None:
                skipped += 1
                continue
            copy_kv(obj.tensor, src)
            batch.objs[i] = obj
        batch.info["skipped"] = batch.info.get("skipped", 0) + skipped
        return batch


@attrs.define(eq=False)
class WriteStage(StageBase):
    """Puts gathered chunks into the CPU tier (adopting pool memory: no copy) and queues them for the slower
    tiers; releases the batch's references."""

    cpu: CpuTier | None
    behind: list[WriteBehind]
    pending: PendingWrites | None = None
    name: str = "write"

    async def process(self, batch: Batch) -> Batch:
        idx = [i for i, o in enumerate(batch.objs) if o is not None]
        if idx and self.cpu is not None:
            # A concurrent store of the same prefix may have cached these chunks since DedupeStage looked: they
            # are not new (not counted, not written behind twice).
            present = await self.cpu.contains_many([batch.keys[i] for i in idx])
            for i, p in zip(idx, present, strict=True):
                if p:
                    batch.tiers[i] = "cpu"
            idx = [i for i, p in zip(idx, present, strict=True) if not p]
        # ... or queued them (from here to the queueing below nothing awaits: no store can slip in between)
        idx = _mark_pending(batch, self.pending, idx)
        if idx:
            keys = [batch.keys[i] for i in idx]
            objs = [batch.objs[i] for i in idx]
            stored = 0
            if self.cpu is not None:
                stored = self.cpu.put_many_nowait(keys, objs)  # type: ignore[arg-type]
            queued = [wb.submit_nowait(keys, objs) for wb in self.behind]  # type: ignore[arg-type]
            if stored or any(queued):
                for i in idx:
                    batch.tiers[i] = "new"
        self._readopt(batch)
        self._resubmit(batch)
        batch.release()
        return batch

    def _readopt(self, batch: Batch) -> None:
        """Put back into the CPU tier the chunks found only in a write queue (the CPU tier evicted them since):
        the queue's memory is adopted, no copy, as a retrieve would promote them."""
        if self.cpu is None or self.pending is None:
            return
        found = [(batch.keys[i], self.pending.peek_nowait(batch.keys[i]))
                 for i, t in enumerate(batch.tiers) if t == "pending"]
        have = [(k, o) for k, o in found if o is not None]
        try:
            if have:
                self.cpu.put_many_nowait([k for k, _ in have], [o for _, o in have])
        finally:
            for _, o in have:
                o.release()

    def _resubmit(self, batch: Batch) -> None:
        """Queue again, for each slower tier, the chunks this store found in the CPU tier or in another tier's
        write queue whose earlier write to that tier was dropped or failed (see
        :mod:`kvpipe.pipeline.write_behind`): they are not new, but they have not reached that tier."""
        cached = [i for i, t in enumerate(batch.tiers) if t in ("cpu", "pending")]
        if not cached:
            return
        keys = [batch.keys[i] for i in cached]
        for wb in self.behind:
            if not getattr(wb.guard.tier, "available", True):
                continue  # a remote that is down drops writes at once: the next store after it is back sends them
            todo = wb.unwritten(keys)
            if not todo:
                continue
            objs = [self._held(keys[j], batch.tiers[cached[j]]) for j in todo]
            have = [(keys[j], o) for j, o in zip(todo, objs, strict=True) if o is not None]
            try:
                if have:
                    wb.submit_nowait([k for k, _ in have], [o for _, o in have])
            finally:
                for _, o in have:
                    o.release()

    def _held(self, key: ChunkKey, where: str | None) -> MemoryObj | None:
        """The memory holding a chunk found in the CPU tier or a write queue, with a reference for the caller."""
        if where == "cpu" and self.cpu is not None:
            return self.cpu.peek_many_nowait([key])[0]
        return self.pending.peek_nowait(key) if self.pending is not None else None
