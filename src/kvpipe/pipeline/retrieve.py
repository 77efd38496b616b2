"""Retrieve stages: read (from the tier that holds each chunk) → scatter (into the output) → promote (to CPU)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from kvpipe.layouts.copy import copy_kv
from kvpipe.memory.pool import MemoryObj
from kvpipe.pipeline.guard import TierGuard
from kvpipe.pipeline.stages import Batch, StageBase
from kvpipe.tiers.cpu import CpuTier

__all__ = ["PromoteStage", "ReadStage", "ScatterStage"]


@attrs.define(eq=False)
class ReadStage(StageBase):
    """Reads each chunk from the tier that ``locate`` found it in (``batch.tiers[i]``), one ``get_many`` per
    tier per batch. A chunk gone from that tier by now is asked for in the tiers below it, in order (``guards`` is
    in tier order, CPU first): the CPU tier's LRU may have made room for this very request's promotions of earlier
    chunks, or a disk entry gone bad may still be whole in the remote. A chunk no tier gives back, or gives back
    bad, is a miss (``objs[i]`` stays ``None``)."""

    guards: dict[str, TierGuard]
    name: str = "read"

    async def process(self, batch: Batch) -> Batch:
        order = list(self.guards)
        located = list(batch.tiers)
        by_tier: dict[str, list[int]] = {}
        for i, t in enumerate(located):
            if t is not None:
                by_tier.setdefault(t, []).append(i)
        for tier_name, idx in by_tier.items():
            await self._read(batch, tier_name, idx)
        gone = [i for i, t in enumerate(located) if t is not None and batch.objs[i] is None]
        if gone:
            start = {i: order.index(located[i]) + 1 for i in gone}  # type: ignore[arg-type]
            for pos in range(min(start.values()), len(order)):
                idx = [i for i in gone if start[i] <= pos and batch.objs[i] is None]
                if idx:
                    await self._read(batch, order[pos], idx)
        return batch

    async def _read(self, batch: Batch, tier_name: str, idx: list[int]) -> None:
        """Chunks ``idx`` of ``batch`` from tier ``tier_name``: ``objs[i]``/``tiers[i]`` set for each one found."""
        keys = [batch.keys[i] for i in idx]
        got: Sequence[MemoryObj | None] = await self.guards[tier_name].call("get_many", [None] * len(idx), keys)
        for i, obj in zip(idx, got, strict=True):
            if obj is not None and obj.num_tokens != batch.spans[i][1] - batch.spans[i][0]:
                obj.release()  # a chunk of another length under this key cannot be ours
                obj = None
            batch.objs[i] = obj
            batch.tiers[i] = tier_name if obj is not None else None


@attrs.define(eq=False)
class ScatterStage(StageBase):
    """Copies chunks into the output tensor ``[layers, 2|1, total_tokens, ...]``: the caller's ``out`` (e.g. the
    engine's own buffer: no allocation, no page faults) or one allocated on the first chunk. Stops at the first
    missing chunk: what follows a gap is not a prefix hit."""

    total_tokens: int
    out: torch.Tensor | None = None
    contiguous_end: int = 0
    broken: bool = False
    name: str = "scatter"

    async def process(self, batch: Batch) -> Batch:
        for i, obj in enumerate(batch.objs):
            if self.broken or obj is None:
                self.broken = True
                continue
            start, end = batch.spans[i]
            src = obj.tensor
            if self.out is None:
                shape = list(src.shape)
                shape[2] = self.total_tokens
                self.out = torch.empty(shape, dtype=src.dtype)
            if src.shape[:2] != self.out.shape[:2] or src.shape[3:] != self.out.shape[3:] or \
                    src.dtype != self.out.dtype:
                self.broken = True  # a chunk of another model layout under this key: never hand it back
                continue
            copy_kv(self.out[:, :, start:end], src)
            self.contiguous_end = end
        batch.kv = self.out
        return batch


@attrs.define(eq=False)
class PromoteStage(StageBase):
    """Adopts chunks read from slower tiers into the CPU tier (they already live in pool memory), then releases
    the batch's references."""

    cpu: CpuTier | None
    name: str = "promote"

    async def process(self, batch: Batch) -> Batch:
        if self.cpu is not None:
            idx = [i for i, o in enumerate(batch.objs) if o is not None and batch.tiers[i] != "cpu"]
            if idx:
                self.cpu.put_many_nowait([batch.keys[i] for i in idx], [batch.objs[i] for i in idx])  # type: ignore[misc]
        batch.release()
        return batch
