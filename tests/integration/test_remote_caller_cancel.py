"""A caller that gives up (its own deadline, an aborted request) in the middle of a call.

First on the remote tier alone, on every remote kind: real servers, chunks of 64 KiB to 1 MiB so that many calls
are cut off while a payload is on the wire, and deadlines from "at the first await" to a few milliseconds. Every
chunk that comes back is the one stored under its key, byte for byte; a connection left with half a reply on it is
never handed to the next call; the tier is never marked down or counted as timed out (the remote did nothing
wrong); afterwards every chunk is stored and read back whole.

Then through the whole cache (``kvpipe.open_cache``: a CPU pool too small to hold the working set, a disk tier or
none, a real Redis or ``lm://`` server), with stores, retrieves (into an engine's buffer or not), prefetches and
lookups cut off at random: every retrieve gives the right KV for the prefix it reports, nothing counts as a tier
error, and once written behind every document reads back whole."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import anyio
import pytest
import torch
from remote_fixtures import REMOTE_KINDS, chunk_tensor, key, make_ctx, open_tier, release_all, url_for

import kvpipe
from fixtures_core import CHUNK, shared_prefix_docs, small_config
from kvpipe.memory.pool import MemoryObj

N_KEYS = 16
WORKERS = 6
OPS = 30
# None: no deadline of the caller's; 0: cancelled at the call's first await; the rest cut calls off mid-way.
CALLER_DEADLINES = (None, 0.0, 0.0002, 0.0005, 0.001, 0.002, 0.005)


def _shape(i: int) -> tuple[int, ...]:
    return (2, 2, 64 * (1 + i % 8), 4, 16)  # 64 KiB .. 512 KiB of float32, a different shape per key


def _obj(i: int) -> MemoryObj:
    return MemoryObj.detached(chunk_tensor(i, _shape(i)), _shape(i)[2])


def _same(got: MemoryObj, i: int) -> bool:
    want = chunk_tensor(i, _shape(i))
    return tuple(got.tensor.shape) == tuple(want.shape) and torch.equal(got.tensor, want)


@pytest.mark.parametrize("kind", REMOTE_KINDS)
async def test_callers_giving_up_mid_call_cost_no_wrong_chunk_and_no_outage(
        kind: str, request: pytest.FixtureRequest, key_model: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="kvpipe")
    tier = await open_tier(url_for(kind, request), make_ctx(timeout=10.0, pool_bytes=128 << 20))
    keys = [key(key_model, i) for i in range(N_KEYS)]
    seen = {"cancelled": 0, "hits": 0, "wrong": 0}

    async def worker(w: int) -> None:
        rng = random.Random(1000 * w + 7)
        for _ in range(OPS):
            idx = rng.sample(range(N_KEYS), rng.randint(1, 4))
            deadline = rng.choice(CALLER_DEADLINES)
            got: list[MemoryObj | None] = []
            with anyio.CancelScope() if deadline is None else anyio.move_on_after(deadline) as scope:
                if rng.random() < 0.4:
                    await tier.put_many([keys[i] for i in idx], [_obj(i) for i in idx])
                else:
                    got = await tier.get_many([keys[i] for i in idx])
            seen["cancelled"] += scope.cancelled_caught
            for i, g in zip(idx, got, strict=False):
                if g is not None:
                    seen["hits"] += 1
                    seen["wrong"] += not _same(g, i)
            release_all(got)

    try:
        async with anyio.create_task_group() as tg:
            for w in range(WORKERS):
                tg.start_soon(worker, w)
        assert seen["wrong"] == 0, f"{seen['wrong']} chunks came back with another chunk's bytes"
        assert seen["cancelled"] > 0 and seen["hits"] > 0, seen
        s = tier.statistics()
        assert tier.available
        assert s.extra["down_events"] == 0 and s.extra["timeouts"] == 0 and s.extra["errors"] == 0, s.extra
        assert "is down" not in caplog.text and "failed" not in caplog.text, caplog.text
        # Nothing left behind: every chunk stored again reads back whole.
        assert await tier.put_many(keys, [_obj(i) for i in range(N_KEYS)]) == N_KEYS
        got = await tier.get_many(keys)
        try:
            assert [g is not None and _same(g, i) for i, g in enumerate(got)] == [True] * N_KEYS
        finally:
            release_all(got)
    finally:
        await tier.aclose()


# Six documents sharing a 2-chunk system prompt (the shared prefix's KV is the same in each, as a model's would be).
DOCS, KVS = shared_prefix_docs(6, own_chunks=6)


@pytest.mark.parametrize("disk", [False, True], ids=["cpu+remote", "cpu+disk+remote"])
@pytest.mark.parametrize("kind", ["redis", "lm"])
async def test_the_cache_under_callers_giving_up(kind: str, disk: bool, request: pytest.FixtureRequest,
                                                 tmp_path: Path, key_model: str) -> None:
    # 48 KiB of pool for 38 distinct 4 KiB chunks: reads come from the lower tiers, promotions evict all the time
    cfg = small_config(tmp_path, disk=disk, max_local_cpu_size=0.00005, model_name=key_model,
                       remote_url=url_for(kind, request))
    seen = {"cancelled": 0, "hits": 0, "wrong": 0}
    async with kvpipe.open_cache(cfg) as cache:

        async def worker(w: int) -> None:
            rng = random.Random(100 * w + 3)
            for _ in range(40):
                d, n = rng.randrange(6), CHUNK * rng.randint(1, 8)
                tokens, kv = DOCS[d][:n], KVS[d][:, :, :n]
                deadline = rng.choice(CALLER_DEADLINES)
                with anyio.CancelScope() if deadline is None else anyio.move_on_after(deadline) as scope:
                    op = rng.random()
                    if op < 0.35:
                        await cache.store(tokens, kv)
                    elif op < 0.8:
                        out = torch.full((kv.shape[0], 2, n + 3, *kv.shape[3:]), float("nan")) if op < 0.6 else None
                        res = await cache.retrieve(tokens, out=out)
                        if res.num_tokens:
                            seen["hits"] += 1
                            seen["wrong"] += not torch.equal(res.kv, kv[:, :, : res.num_tokens])
                    elif op < 0.9:
                        await cache.prefetch(tokens)
                    else:
                        assert 0 <= await cache.lookup(tokens) <= n
                seen["cancelled"] += scope.cancelled_caught

        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(worker, w)
        assert seen["wrong"] == 0, f"{seen['wrong']} retrieves gave KV of other tokens"
        assert seen["cancelled"] > 0 and seen["hits"] > 0, seen
        s = cache.statistics()
        assert s.tier_errors == 0 and s.tiers["remote"].extra["down_events"] == 0, s.as_dict()
        # Afterwards: every document stored once more, and (once written behind) read back whole. A write-behind
        # dropped under the random phase's load is written again by these stores (the chunk may be in CPU alone).
        for d in range(6):
            await cache.store(DOCS[d], KVS[d])
            await cache.flush()
        for d in range(6):
            res = await cache.retrieve(DOCS[d])
            if res.num_tokens != 8 * CHUNK:
                st = cache.statistics()
                why = {"dropped_writes": st.dropped_writes, **{f"{n}.{k}": v for n, t in st.tiers.items()
                                                                for k, v in (("puts", t.puts),
                                                                             ("put_failures", t.put_failures),
                                                                             ("evictions", t.evictions),
                                                                             ("chunks", t.chunks))}}
                raise AssertionError(f"doc {d}: {res.num_tokens} tokens {res.hits_by_tier}; {why}")
            assert torch.equal(res.kv, KVS[d])
