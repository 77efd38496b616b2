"""Store stages: dedupe → gather (engine KV → pool) → write (CPU tier now, slower tiers write-behind)."""

from __future__ import annotations

import attrs

from kvpipe.layouts.copy import copy_kv
from kvpipe.memory.pool import HostPool
from kvpipe.pipeline.stages import Batch, StageBase
from kvpipe.pipeline.write_behind import WriteBehind
from kvpipe.tiers.cpu import CpuTier

__all__ = ["DedupeStage", "GatherStage", "WriteStage"]


@attrs.define(eq=False)
class DedupeStage(StageBase):
    """Marks chunks the CPU tier already holds (``tiers[i] = "cpu"``) so they are neither copied nor rewritten."""

    cpu: CpuTier | None
    name: str = "dedupe"

    async def process(self, batch: Batch) -> Batch:
        if self.cpu is not None:
            for i, present in enumerate(await self.cpu.contains_many(batch.keys)):
                if present:
                    batch.tiers[i] = "cpu"
        return batch


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
        if self.cpu is not None:
            self._resubmit(batch)
        batch.release()
        return batch

    def _resubmit(self, batch: Batch) -> None:
        """Queue again, for each slower tier, the chunks this store found in the CPU tier whose earlier write to
        that tier was dropped or failed (see :mod:`kvpipe.pipeline.write_behind`): they are not new, but they
        have not reached that tier."""
        cached = [i for i, t in enumerate(batch.tiers) if t == "cpu"]
        if not cached:
            return
        keys = [batch.keys[i] for i in cached]
        for wb in self.behind:
            if not getattr(wb.guard.tier, "available", True):
                continue  # a remote that is down drops writes at once: the next store after it is back sends them
            todo = wb.unwritten(keys)
            if not todo:
                continue
            objs = self.cpu.peek_many_nowait([keys[j] for j in todo])  # type: ignore[union-attr]
            have = [(keys[j], o) for j, o in zip(todo, objs, strict=True) if o is not None]
            try:
                if have:
                    wb.submit_nowait([k for k, _ in have], [o for _, o in have])
            finally:
                for _, o in have:
                    o.release()
