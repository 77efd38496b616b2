"""Eviction policies (LRU, FIFO), the CPU tier's LRU under pressure and pin leases, and the disk tier's LRU under
``max_local_disk_size``."""

from __future__ import annotations

from pathlib import Path

import torch

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config
from kvpipe import ChunkKey
from kvpipe.memory.eviction import FifoPolicy, LruPolicy
from kvpipe.memory.pool import create_pool
from kvpipe.tiers.cpu import CpuTier

KIB = 1024


def _key(i: int) -> ChunkKey:
    return ChunkKey("kvpipe", "m", 1, 0, f"{i:064x}", "float32")


def test_lru_order() -> None:
    p = LruPolicy()
    for k in "abcd":
        p.insert(k)
    p.touch("a")
    p.touch("zzz")  # unknown: ignored
    assert list(p.candidates()) == ["b", "c", "d", "a"]
    p.insert("b")  # re-insert refreshes
    assert list(p.candidates()) == ["c", "d", "a", "b"]
    p.remove("d")
    p.remove("nope")
    assert list(p.candidates()) == ["c", "a", "b"]


def test_candidates_is_a_snapshot() -> None:
    p = LruPolicy()
    for k in range(5):
        p.insert(k)
    for k in p.candidates():
        p.remove(k)  # no "dict changed size during iteration"
    assert list(p.candidates()) == []


def test_fifo_ignores_reads() -> None:
    p = FifoPolicy()
    for k in "abc":
        p.insert(k)
    p.touch("a")
    assert list(p.candidates()) == ["a", "b", "c"]


def _filled_tier(policy: LruPolicy, n: int = 3) -> CpuTier:
    pool = create_pool(n * 4 * KIB)
    cpu = CpuTier(pool, policy)
    for i in range(n):
        obj = pool.allocate((4 * KIB,), torch.uint8, 1)
        assert obj is not None
        cpu.put_many_nowait([_key(i)], [obj])
        obj.release()
    return cpu


def test_cpu_tier_evicts_least_recently_used() -> None:
    cpu = _filled_tier(LruPolicy())
    [got] = cpu.get_many_nowait([_key(0)])  # key 0 becomes the most recent
    assert got is not None
    got.release()
    obj = cpu.pool.allocate((4 * KIB,), torch.uint8, 1)
    assert obj is not None
    assert _key(1) not in cpu._entries and _key(0) in cpu._entries
    assert cpu.statistics().evictions == 1


def test_cpu_tier_fifo_evicts_oldest_even_if_read() -> None:
    cpu = _filled_tier(FifoPolicy())
    [got] = cpu.get_many_nowait([_key(0)])
    assert got is not None
    got.release()
    assert cpu.pool.allocate((4 * KIB,), torch.uint8, 1) is not None
    assert _key(0) not in cpu._entries


def test_expired_pin_lease_does_not_protect() -> None:
    cpu = _filled_tier(LruPolicy())
    assert cpu.pin([_key(0)], lease_secs=-1.0) == 1  # a lease that has already run out
    assert cpu.pin([_key(1)], lease_secs=3600) == 1
    assert cpu.pin([_key(99)], lease_secs=3600) == 0  # not cached: nothing to pin
    assert cpu.pool.allocate((4 * KIB,), torch.uint8, 1) is not None
    assert _key(0) not in cpu._entries  # expired: evicted first (LRU)
    assert cpu.pool.allocate((4 * KIB,), torch.uint8, 1) is not None
    assert _key(1) in cpu._entries and _key(2) not in cpu._entries  # pinned one skipped
    assert cpu.statistics().extra["pinned"] == 1.0


async def test_cache_policy_fifo_through_config() -> None:
    chunk_bytes = 2 * 2 * CHUNK * 2 * 4 * 4
    cfg = small_config(cache_policy="FIFO", max_local_cpu_size=2 * chunk_bytes / 1e9)
    a, b, c = (make_tokens(CHUNK, seed=s) for s in range(3))
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(a, make_kv(CHUNK, seed=0))
        await cache.store(b, make_kv(CHUNK, seed=1))
        await cache.retrieve(a)  # FIFO: reading a does not save it
        await cache.store(c, make_kv(CHUNK, seed=2))
        assert await cache.lookup(a) == 0 and await cache.lookup(b) == CHUNK


async def test_disk_tier_lru_under_max_local_disk_size(tmp_path: Path) -> None:
    entry = 80 + 2 * 2 * CHUNK * 2 * 4 * 4
    cfg = small_config(tmp_path, disk=True, max_local_disk_size=3.5 * entry / 1e9)  # room for 3 entries
    docs = [make_tokens(CHUNK, seed=s) for s in range(5)]
    async with kvpipe.open_cache(cfg) as cache:
        for i, toks in enumerate(docs):
            await cache.store(toks, make_kv(CHUNK, seed=i))
            await cache.flush()
        stats = cache.statistics().tiers["disk"]
        assert stats.chunks == 3 and stats.evictions == 2 and stats.bytes <= 3.5 * entry
    assert len(list((tmp_path / "disk").glob("*.kvpe"))) == 3
    async with kvpipe.open_cache(cfg) as cache:  # the newest three survive, on disk
        assert [await cache.lookup(t) for t in docs] == [0, 0, CHUNK, CHUNK, CHUNK]
