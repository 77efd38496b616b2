"""Many concurrent stores and retrieves of overlapping prefixes on one cache: no lost and no wrong chunk."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

import kvpipe
from fixtures_core import CHUNK, shared_prefix_docs, small_config

# Four "documents" sharing a common 2-chunk system prompt; each task stores and retrieves a prefix of one.
DOCS, KVS = shared_prefix_docs(4, own_chunks=4)


@pytest.mark.parametrize("disk", [False, True], ids=["cpu", "cpu+disk"])
async def test_concurrent_overlapping_prefixes(tmp_path: Path, disk: bool) -> None:
    cfg = small_config(tmp_path, disk=disk, max_local_cpu_size=0.064)  # room for everything: nothing evicted
    errors: list[str] = []

    async def worker(task: int) -> None:
        for step in range(6):
            d = (task + step) % 4
            n = CHUNK * (2 + (task * 7 + step) % 5)  # 2..6 chunks: overlapping prefixes of one document
            tokens, kv = DOCS[d][:n], KVS[d][:, :, :n]
            stored = await cache.store(tokens, kv)
            if not 0 <= stored <= n:
                errors.append(f"task {task}: stored {stored} of {n}")
            res = await cache.retrieve(tokens)
            # Our own store finished: every chunk of this prefix is cached (by us or a concurrent task).
            if res.num_tokens != n:
                errors.append(f"task {task} step {step}: retrieved {res.num_tokens} of {n}")
            elif not torch.equal(res.kv, kv):
                errors.append(f"task {task} step {step}: wrong KV for doc {d} prefix {n}")
            await anyio.sleep(0)

    async with kvpipe.open_cache(cfg) as cache:
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for t in range(32):
                    tg.start_soon(worker, t)
        assert errors == []
        # Each distinct chunk is stored once: 2 shared + 4 x 4 own chunks.
        stats = cache.statistics()
        assert stats.tiers["cpu"].chunks == 2 + 4 * 4
        assert stats.stored_tokens == (2 + 4 * 4) * CHUNK
        assert stats.tier_errors == 0
        if disk:
            await cache.flush()
            assert len(list((tmp_path / "disk").glob("*.kvpe"))) == 2 + 4 * 4
    if disk:  # everything that reached disk is right, read by a fresh cache
        async with kvpipe.open_cache(cfg) as cache:
            for d in range(4):
                res = await cache.retrieve(DOCS[d])
                assert res.num_tokens == 6 * CHUNK
                assert res.hits_by_tier == ({"disk": 6 * CHUNK} if d == 0 else {"cpu": 2 * CHUNK, "disk": 4 * CHUNK})
                assert torch.equal(res.kv, KVS[d])


async def test_concurrent_cold_reads_from_disk_share_chunks(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True, max_local_cpu_size=0.064)
    async with kvpipe.open_cache(cfg) as cache:
        for d in range(4):
            await cache.store(DOCS[d], KVS[d])
        await cache.flush()
    async with kvpipe.open_cache(cfg) as cache:
        bad: list[int] = []

        async def reader(task: int) -> None:
            d = task % 4
            if task % 3 == 0:
                await cache.prefetch(DOCS[d])
            res = await cache.retrieve(DOCS[d])
            if res.num_tokens != 6 * CHUNK or not torch.equal(res.kv, KVS[d]):
                bad.append(task)

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for t in range(32):
                    tg.start_soon(reader, t)
        assert bad == []
        assert cache.statistics().tiers["cpu"].chunks == 2 + 4 * 4
