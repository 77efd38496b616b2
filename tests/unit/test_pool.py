"""The host pool: allocate/free/coalesce, ref counts, the evictor, a full pinned pool returning None, capacity
errors and the hugepages fallback."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from kvpipe import CapacityError, ChunkKey
from kvpipe.memory import pool as pool_mod
from kvpipe.memory.eviction import LruPolicy
from kvpipe.memory.pool import ALIGN, MemoryObj, create_pool
from kvpipe.tiers.cpu import CpuTier

KIB = 1024


def _key(i: int) -> ChunkKey:
    return ChunkKey("kvpipe", "m", 1, 0, f"{i:064x}", "float32")


def test_allocate_views_pool_memory() -> None:
    pool = create_pool(64 * KIB)
    obj = pool.allocate((2, 2, 16, 2, 4), torch.float32, 16)
    assert obj is not None
    assert obj.tensor.shape == (2, 2, 16, 2, 4) and obj.tensor.dtype == torch.float32
    assert obj.nbytes == 2 * 2 * 16 * 2 * 4 * 4
    assert obj.num_tokens == 16 and obj.refcount == 1
    obj.tensor.fill_(3.0)
    region = pool.buffer[obj.offset : obj.offset + obj.nbytes].view(torch.float32)
    assert torch.all(region == 3.0)  # the tensor is pool memory, not a copy
    assert len(obj.byte_view) == obj.nbytes
    assert bytes(obj.byte_view) == obj.tensor.view(-1).view(torch.uint8).numpy().tobytes()
    assert (obj.shape, obj.dtype) == ((2, 2, 16, 2, 4), torch.float32)  # known without a torch call
    detached = MemoryObj.detached(torch.ones(3, 5, dtype=torch.float16), 3)
    assert (detached.shape, detached.dtype) == ((3, 5), torch.float16)
    assert pool.used == obj.nbytes and pool.statistics().allocated_objects == 1
    obj.release()
    assert pool.used == 0 and pool.statistics().allocated_objects == 0


def test_sizes_are_aligned_and_capacity_rounded() -> None:
    pool = create_pool(1000)
    assert pool.capacity % ALIGN == 0 and pool.capacity >= 1000
    obj = pool.allocate((3,), torch.uint8, 1)
    assert obj is not None and pool.used == ALIGN
    other = pool.allocate((3,), torch.uint8, 1)
    assert other is not None and other.offset % ALIGN == 0 and other.offset != obj.offset


def test_free_coalesces_into_one_region() -> None:
    pool = create_pool(16 * KIB)
    objs = [pool.allocate((4 * KIB,), torch.uint8, 1) for _ in range(4)]
    assert all(o is not None for o in objs)
    assert pool.allocate((1,), torch.uint8, 1) is None  # full, no evictor
    # Free out of order: 1, 3, then 0 (merges right), then 2 (merges both sides).
    for i in (1, 3, 0, 2):
        objs[i].release()  # type: ignore[union-attr]
    assert pool.used == 0
    whole = pool.allocate((16 * KIB,), torch.uint8, 1)
    assert whole is not None and whole.offset == 0  # one region again: the full capacity fits


def test_first_fit_reuses_a_freed_hole() -> None:
    pool = create_pool(12 * KIB)
    a, b, c = (pool.allocate((4 * KIB,), torch.uint8, 1) for _ in range(3))
    assert a and b and c
    b.release()
    d = pool.allocate((2 * KIB,), torch.uint8, 1)
    e = pool.allocate((2 * KIB,), torch.uint8, 1)
    assert d is not None and e is not None
    assert {d.offset, e.offset} == {4 * KIB, 6 * KIB}


def test_refcounts() -> None:
    pool = create_pool(8 * KIB)
    obj = pool.allocate((4 * KIB,), torch.uint8, 1)
    assert obj is not None
    assert obj.ref() is obj and obj.refcount == 2
    obj.release()
    assert pool.used == 4 * KIB  # still held
    obj.release()
    assert pool.used == 0
    with pytest.raises(RuntimeError):
        obj.release()
    with pytest.raises(RuntimeError):
        obj.ref()


def test_detached_object_is_outside_any_pool() -> None:
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # not contiguous
    obj = MemoryObj.detached(t, 4)
    assert obj.pool is None and obj.tensor.is_contiguous() and torch.equal(obj.tensor, t)
    assert obj.nbytes == 48
    obj.release()  # no pool: nothing to free, no error


def test_evictor_is_called_until_it_gives_up() -> None:
    pool = create_pool(8 * KIB)
    held = [pool.allocate((4 * KIB,), torch.uint8, 1) for _ in range(2)]
    calls: list[int] = []

    def evictor(nbytes: int) -> bool:
        calls.append(nbytes)
        if held:
            held.pop().release()  # type: ignore[union-attr]
            return True
        return False

    pool.evictor = evictor
    obj = pool.allocate((6 * KIB,), torch.uint8, 1)  # needs both regions freed
    assert obj is not None
    assert calls == [6 * KIB, 6 * KIB]
    assert pool.statistics().evictions == 2
    calls.clear()
    assert pool.allocate((4 * KIB,), torch.uint8, 1) is None  # nothing left to evict
    assert calls == [4 * KIB]
    assert pool.statistics().alloc_failures == 1


def test_capacity_error_for_a_chunk_bigger_than_the_pool() -> None:
    pool = create_pool(4 * KIB)
    with pytest.raises(CapacityError, match="does not fit"):
        pool.allocate((4 * KIB + 1,), torch.uint8, 1)
    with pytest.raises(CapacityError):
        pool.allocate((2, 2, 256, 8, 128), torch.float16, 256)


def test_full_pool_with_everything_pinned_returns_none() -> None:
    """The allocation gives up (None) instead of waiting for memory that pins keep; it runs in a thread so that a
    hang fails the test instead of the run."""
    pool = create_pool(64 * KIB)
    cpu = CpuTier(pool, LruPolicy())
    keys = []
    for i in range(16):  # exactly fills the pool (a fill-until-None loop would just evict: the tier makes room)
        obj = pool.allocate((4 * KIB,), torch.uint8, 1)
        assert obj is not None
        k = _key(i)
        assert cpu.put_many_nowait([k], [obj]) == 1
        obj.release()  # the tier holds the only reference
        keys.append(k)
    assert pool.used == pool.capacity and cpu.statistics().evictions == 0
    assert cpu.pin(keys, lease_secs=3600) == 16
    result: list[MemoryObj | str | None] = []
    t = threading.Thread(target=lambda: result.append(pool.allocate((4 * KIB,), torch.uint8, 1)), daemon=True)
    t.start()
    t.join(timeout=60)  # generous: the assertion is that it returns None at all
    assert not t.is_alive(), "allocation on a full pinned pool did not return"
    assert result == [None]
    assert len(cpu) == 16  # nothing pinned was evicted
    assert pool.statistics().alloc_failures >= 1
    # Unpinning one entry makes room again (LRU: the oldest unpinned goes).
    cpu.unpin(keys[5:6])
    obj = pool.allocate((4 * KIB,), torch.uint8, 1)
    assert obj is not None
    assert cpu.statistics().evictions == 1
    assert keys[5] not in cpu._entries and keys[0] in cpu._entries


def test_entries_being_read_are_not_evicted() -> None:
    pool = create_pool(8 * KIB)
    cpu = CpuTier(pool, LruPolicy())
    for i in range(2):
        obj = pool.allocate((4 * KIB,), torch.uint8, 1)
        assert obj is not None
        cpu.put_many_nowait([_key(i)], [obj])
        obj.release()
    [reader] = cpu.get_many_nowait([_key(0)])  # a reader holds the LRU entry
    assert reader is not None
    assert pool.allocate((4 * KIB,), torch.uint8, 1) is not None  # evicts key 1, not key 0
    assert _key(0) in cpu._entries and _key(1) not in cpu._entries
    assert pool.allocate((4 * KIB,), torch.uint8, 1) is None  # key 0 is still being read
    reader.release()


def _hugepages_free() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("HugePages_Free:"):
            return int(line.split()[1])
    return 0


def test_hugepages_fall_back_with_one_warning(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    if _hugepages_free() >= 2:
        pytest.skip("this machine has hugepages reserved: no fallback to observe")
    monkeypatch.setattr(pool_mod, "_warned_hugepages", False)
    with caplog.at_level(logging.WARNING, logger="kvpipe.memory.pool"):
        pools = [create_pool(4 << 20, hugepages=True) for _ in range(2)]
    assert all(not p.hugepages for p in pools)
    warnings = [r for r in caplog.records if r.name == "kvpipe.memory.pool" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "hugepages" in warnings[0].getMessage()
    obj = pools[0].allocate((1 << 20,), torch.uint8, 1)  # the fallback pool works
    assert obj is not None


def test_statistics_snapshot() -> None:
    pool = create_pool(8 * KIB)
    s = pool.statistics()
    assert (s.capacity, s.used, s.allocated_objects, s.alloc_failures) == (8 * KIB, 0, 0, 0)
    assert s.pinned == torch.cuda.is_available()
    assert s.hugepages is False


def test_prefault_makes_pages_resident_and_keeps_contents() -> None:
    """The background prefault (madvise MADV_POPULATE_WRITE) raises the pool's resident pages and never changes a
    byte written before or while it runs."""
    import resource
    import threading

    import torch

    from kvpipe.memory.pool import create_pool

    def rss_kb() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * (resource.getpagesize() // 1024)

    before = rss_kb()
    pool = create_pool(256 << 20, prefault=True)
    obj = pool.allocate((1024,), torch.float32, 1)
    assert obj is not None
    obj.tensor.copy_(torch.arange(1024, dtype=torch.float32))
    assert pool.wait_resident()
    assert not any(t.name == "kvpipe-pool-prefault" for t in threading.enumerate())
    assert rss_kb() - before > 200 * 1024  # ~256 MiB became resident
    assert torch.equal(obj.tensor, torch.arange(1024, dtype=torch.float32))
    assert create_pool(ALIGN).wait_resident(0)  # nothing to wait for without prefault


def test_prefault_runs_at_idle_priority() -> None:
    """The prefault thread takes only idle CPU (SCHED_IDLE): at start-up it must not slow the engine's first
    requests."""
    import os

    buf = torch.empty(4 << 20, dtype=torch.uint8)
    policy: list[int] = []

    def run() -> None:
        pool_mod._prefault(buf, threading.Event())
        policy.append(os.sched_getscheduler(0))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert policy == [os.SCHED_IDLE]
    assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the caller's own thread is untouched


def test_byte_view_and_lazy_tensor_are_the_same_memory() -> None:
    """The byte view of a fresh region is made without torch and is the memory its tensor views later."""
    pool = create_pool(64 * KIB)
    obj = pool.allocate((1, 2, 8, 1, 4), torch.float16, 8)
    assert obj is not None
    src = torch.arange(64, dtype=torch.float16).view(1, 2, 8, 1, 4)
    obj.byte_view[:] = memoryview(src.view(-1).view(torch.uint8).numpy())  # written before any tensor exists
    assert torch.equal(obj.tensor, src)
    obj.tensor.mul_(2)
    assert bytes(obj.byte_view) == bytes(memoryview((src * 2).view(-1).view(torch.uint8).numpy()))
    obj.release()


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0] if "[" in text else None


def _thp_eligible(addr: int) -> bool | None:
    """The ``THPeligible`` flag of the mapping holding ``addr`` (``/proc/self/smaps``), ``None`` if not shown."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and line.startswith("THPeligible:"):
            return line.split()[1] == "1"
    return None


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent hugepages are off here")
def test_a_large_pool_asks_for_transparent_hugepages() -> None:
    """Under THP's "madvise" mode (this machine's) only memory that asks gets 2 MiB pages; torch.empty's does
    not. Eligibility is the kernel's per-mapping flag, so the check does not depend on free huge pages."""
    pool = create_pool(64 << 20)
    try:
        eligible = _thp_eligible(pool.buffer.data_ptr())
        if eligible is None:
            pytest.skip("this kernel does not report THPeligible")
        assert eligible
    finally:
        pool.close()


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent hugepages are off here")
@pytest.mark.parametrize("env_value", [None, "false"])
async def test_the_cache_pool_asks_for_transparent_hugepages_unless_told_not_to(env_value: str | None) -> None:
    """``KVPIPE_LOCAL_CPU_TRANSPARENT_HUGEPAGES=false`` (an operator seeing compaction stalls) leaves the pool on
    regular pages; the default asks. The statistics say which, and the kernel's own flag for the mapping agrees
    (under "always" every anonymous mapping is eligible, so only the asked-for case is checked there)."""
    from kvpipe import Config
    from kvpipe.api import open_cache

    env = {"KVPIPE_MAX_LOCAL_CPU_SIZE": "0.0625", "KVPIPE_LOCAL_CPU_PREFAULT": "false"}
    if env_value is not None:
        env["KVPIPE_LOCAL_CPU_TRANSPARENT_HUGEPAGES"] = env_value
    config = Config.load(env=env)
    assert config.local_cpu_transparent_hugepages is (env_value is None)
    async with open_cache(config) as cache:
        stats = cache.statistics().pool
        assert stats.transparent_hugepages is (env_value is None and not stats.pinned)
        eligible = _thp_eligible(cache.pool.buffer.data_ptr())
        if eligible is None:
            pytest.skip("this kernel does not report THPeligible")
        if stats.transparent_hugepages or _thp_mode() == "madvise":
            assert eligible is stats.transparent_hugepages
