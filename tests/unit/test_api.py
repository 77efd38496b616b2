"""The async API through ``open_cache``: round trips, partial chunks, masks, errors, promotion, prefetch, pins,
clear, write-behind (incl. a blocked disk and a full queue), failing disks and the INFO log lines."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import anyio
import pytest
import torch

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config
from kvpipe.pipeline.retrieve import ReadStage
from kvpipe.pipeline.stages import run_stages, split_batches
from kvpipe.tiers.disk import _file_name


def _disk_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "disk").glob("*.kvpe"))


# ----------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
async def test_store_lookup_retrieve_round_trip(dtype: torch.dtype) -> None:
    cfg = small_config(kv_dtype=str(dtype).removeprefix("torch."))
    tokens = make_tokens(4 * CHUNK)
    kv = make_kv(4 * CHUNK, dtype=dtype)
    async with kvpipe.open_cache(cfg) as cache:
        with anyio.fail_after(30):
            await cache.wait_resident()  # local_cpu_prefault: the pool's pages are faulted in at open
        assert cache.pool.wait_resident(0)
        assert await cache.lookup(tokens) == 0
        miss = await cache.retrieve(tokens)
        assert miss.num_tokens == 0 and miss.kv is None
        assert await cache.store(tokens, kv) == 4 * CHUNK
        assert await cache.lookup(tokens) == 4 * CHUNK
        res = await cache.retrieve(tokens)
        assert res.num_tokens == 4 * CHUNK
        assert res.kv is not None and torch.equal(res.kv, kv)
        assert res.hits_by_tier == {"cpu": 4 * CHUNK}
        # A longer request hits its cached prefix; a different first token misses entirely.
        longer = [*tokens, *make_tokens(2 * CHUNK, seed=9)]
        assert await cache.lookup(longer) == 4 * CHUNK
        res = await cache.retrieve(longer)
        assert res.num_tokens == 4 * CHUNK and torch.equal(res.kv, kv)
        assert await cache.lookup([tokens[0] + 1, *tokens[1:]]) == 0
        # Storing again stores nothing new.
        assert await cache.store(tokens, kv) == 0
        stats = cache.statistics()
        assert stats.stores == 2 and stats.stored_tokens == 4 * CHUNK
        assert stats.tiers["cpu"].chunks == 4


async def test_mla_round_trip() -> None:
    tokens = make_tokens(2 * CHUNK)
    kv = make_kv(2 * CHUNK, mla=True, dtype=torch.bfloat16)
    async with kvpipe.open_cache(small_config(kv_dtype="bfloat16")) as cache:
        assert await cache.store(tokens, kv) == 2 * CHUNK
        res = await cache.retrieve(tokens)
        assert res.kv is not None and res.kv.shape == kv.shape and torch.equal(res.kv, kv)


async def test_token_types_share_keys() -> None:
    tokens = make_tokens(2 * CHUNK)
    kv = make_kv(2 * CHUNK)
    async with kvpipe.open_cache(small_config()) as cache:
        await cache.store(torch.tensor(tokens, dtype=torch.int32), kv)
        assert await cache.lookup(tokens) == 2 * CHUNK
        import numpy as np

        assert await cache.lookup(np.array(tokens)) == 2 * CHUNK


async def test_retrieve_into_caller_memory() -> None:
    tokens = make_tokens(2 * CHUNK + 5)
    kv = make_kv(2 * CHUNK + 5)
    async with kvpipe.open_cache(small_config()) as cache:
        await cache.store(tokens, kv)
        out = torch.zeros_like(kv)
        res = await cache.retrieve(tokens, out=out)
        assert res.num_tokens == 2 * CHUNK
        assert torch.equal(out[:, :, : 2 * CHUNK], kv[:, :, : 2 * CHUNK])
        assert torch.all(out[:, :, 2 * CHUNK :] == 0)
        with pytest.raises(ValueError, match="out"):
            await cache.retrieve(tokens, out=torch.zeros(2, 2, CHUNK, 2, 4))


# ----------------------------------------------------------------------------------------------- partial chunks
async def test_partial_chunk_dropped_by_default() -> None:
    tokens = make_tokens(2 * CHUNK + 5)
    kv = make_kv(2 * CHUNK + 5)
    async with kvpipe.open_cache(small_config()) as cache:
        assert await cache.store(tokens, kv) == 2 * CHUNK
        assert await cache.lookup(tokens) == 2 * CHUNK
        res = await cache.retrieve(tokens)
        assert res.num_tokens == 2 * CHUNK
        assert torch.equal(res.kv, kv[:, :, : 2 * CHUNK])


async def test_partial_chunk_kept_with_save_unfull_chunk() -> None:
    tokens = make_tokens(2 * CHUNK + 5)
    kv = make_kv(2 * CHUNK + 5)
    async with kvpipe.open_cache(small_config(save_unfull_chunk=True)) as cache:
        assert await cache.store(tokens, kv) == 2 * CHUNK + 5
        assert await cache.lookup(tokens) == 2 * CHUNK + 5
        res = await cache.retrieve(tokens)
        assert res.num_tokens == 2 * CHUNK + 5 and torch.equal(res.kv, kv)
        # The partial chunk's key is not the full chunk's: a longer request reuses only the full chunks.
        longer = [*tokens, *make_tokens(CHUNK, seed=5)]
        assert await cache.lookup(longer) == 2 * CHUNK
        assert (await cache.retrieve(longer)).num_tokens == 2 * CHUNK


async def test_fewer_tokens_than_a_chunk() -> None:
    tokens = make_tokens(5)
    async with kvpipe.open_cache(small_config()) as cache:
        assert await cache.store(tokens, make_kv(5)) == 0
        assert await cache.lookup(tokens) == 0
        assert await cache.lookup([]) == 0


# ----------------------------------------------------------------------------------------------- masks and errors
async def test_mask_skips_leading_chunks() -> None:
    tokens = make_tokens(4 * CHUNK)
    kv = make_kv(4 * CHUNK)
    mask = torch.ones(4 * CHUNK, dtype=torch.bool)
    mask[: 2 * CHUNK] = False
    async with kvpipe.open_cache(small_config()) as cache:
        assert await cache.store(tokens, kv, mask=mask) == 2 * CHUNK
        assert cache.statistics().tiers["cpu"].chunks == 2
        assert await cache.lookup(tokens) == 0  # the leading chunks were never stored: no prefix hit
        assert await cache.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK]) == 2 * CHUNK
        res = await cache.retrieve(tokens)
        assert res.num_tokens == 4 * CHUNK and torch.equal(res.kv, kv)


@pytest.mark.parametrize("mask", [
    torch.cat([torch.zeros(5, dtype=torch.bool), torch.ones(2 * CHUNK - 5, dtype=torch.bool)]),  # not a multiple
    torch.ones(2 * CHUNK - 1, dtype=torch.bool),  # wrong length
    torch.ones(2 * CHUNK, dtype=torch.int64),  # not bool
    torch.cat([torch.ones(CHUNK, dtype=torch.bool), torch.zeros(CHUNK, dtype=torch.bool)]),  # False after True
    torch.ones(2, CHUNK, dtype=torch.bool),  # 2-D
], ids=["not-multiple", "length", "dtype", "false-after-true", "2d"])
async def test_bad_masks(mask: torch.Tensor) -> None:
    async with kvpipe.open_cache(small_config()) as cache:
        with pytest.raises(ValueError, match="mask"):
            await cache.store(make_tokens(2 * CHUNK), make_kv(2 * CHUNK), mask=mask)


async def test_bad_kv() -> None:
    tokens = make_tokens(2 * CHUNK)
    async with kvpipe.open_cache(small_config()) as cache:
        with pytest.raises(ValueError, match="dtype"):
            await cache.store(tokens, make_kv(2 * CHUNK, dtype=torch.float16))
        with pytest.raises(ValueError, match="tokens"):
            await cache.store(tokens, make_kv(2 * CHUNK + 1))
        with pytest.raises(ValueError, match="dimension 1"):
            await cache.store(tokens, torch.zeros(2, 3, 2 * CHUNK, 2, 4))
        with pytest.raises(ValueError, match="kv"):
            await cache.store(tokens, torch.zeros(2 * CHUNK))
        assert cache.statistics().tiers["cpu"].chunks == 0


async def test_closed_cache_refuses() -> None:
    async with kvpipe.open_cache(small_config()) as cache:
        pass
    with pytest.raises(RuntimeError, match="not open"):
        await cache.lookup(make_tokens(CHUNK))


async def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(kvpipe.ConfigError, match="eviction policy"):
        async with kvpipe.open_cache(small_config(cache_policy="MRU")):
            pass


@pytest.mark.parametrize(("url", "msg"), [
    ("infinistore://127.0.0.1:12345/?device=mlx5_1", "InfiniStore is not supported by kvpipe .*RDMA"),
    ("gopher://h:1", "no connector or tier for scheme 'gopher'"),
])
async def test_remote_url_without_connector_is_a_config_error(url: str, msg: str) -> None:
    with pytest.raises(kvpipe.ConfigError, match=msg) as e:
        async with kvpipe.open_cache(small_config(remote_url=url)):
            pass
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------------------------- tiers
async def test_retrieve_from_disk_promotes_into_cpu(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    tokens = make_tokens(3 * CHUNK)
    kv = make_kv(3 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(tokens, kv)
        await cache.flush()
    assert len(_disk_files(tmp_path)) == 3
    async with kvpipe.open_cache(cfg) as cache:  # fresh: empty CPU tier
        assert cache.statistics().tiers["cpu"].chunks == 0
        assert await cache.lookup(tokens) == 3 * CHUNK
        res = await cache.retrieve(tokens)
        assert res.hits_by_tier == {"disk": 3 * CHUNK} and torch.equal(res.kv, kv)
        assert cache.statistics().tiers["cpu"].chunks == 3
        res = await cache.retrieve(tokens)
        assert res.hits_by_tier == {"cpu": 3 * CHUNK} and torch.equal(res.kv, kv)


async def test_prefetch_promotes(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    tokens = make_tokens(3 * CHUNK)
    kv = make_kv(3 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(tokens, kv)
        await cache.flush()
    async with kvpipe.open_cache(cfg) as cache:
        assert await cache.prefetch(tokens) == 3 * CHUNK
        res = await cache.retrieve(tokens)  # waits for the prefetch rather than reading twice
        assert res.hits_by_tier == {"cpu": 3 * CHUNK} and torch.equal(res.kv, kv)
        assert cache.statistics().prefetched_chunks == 3
        assert await cache.prefetch(tokens) == 0  # already in CPU
        assert await cache.prefetch(make_tokens(CHUNK, seed=99)) == 0  # nothing cached


async def test_a_chunk_gone_from_the_cpu_tier_since_it_was_located_is_read_from_below(tmp_path: Path) -> None:
    """Between finding which tier holds each chunk and reading it, the CPU tier may drop a chunk (with a small pool,
    its LRU makes room for this very request's promotions of earlier chunks). The read then asks the tiers below,
    instead of cutting the hit short at that chunk (it used to: a retrieve right after a store could come back
    short although the disk or remote held every chunk)."""
    cfg = small_config(tmp_path, disk=True)
    tokens, kv = make_tokens(3 * CHUNK), make_kv(3 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(tokens, kv)
        await cache.flush()
        keys = cache.keys_for(tokens)
        (batch,) = split_batches("r", keys, [(i * CHUNK, (i + 1) * CHUNK) for i in range(3)], None)
        batch.tiers = ["cpu"] * 3  # where the lookup found them
        assert cache.cpu is not None and await cache.cpu.delete_many(keys[1:]) == 2  # dropped since
        (out,) = await run_stages([ReadStage(cache._guards)], [batch])
        try:
            assert out.tiers == ["cpu", "disk", "disk"]
            for i, obj in enumerate(out.objs):
                assert obj is not None and torch.equal(obj.tensor, kv[:, :, i * CHUNK : (i + 1) * CHUNK])
        finally:
            out.release()
        # a chunk in no tier at all stays a miss
        (batch,) = split_batches("r", keys, [(i * CHUNK, (i + 1) * CHUNK) for i in range(3)], None)
        batch.tiers = ["cpu", "cpu", "disk"]
        (tmp_path / "disk" / _file_name(keys[1])).unlink()
        (out,) = await run_stages([ReadStage(cache._guards)], [batch])
        try:
            assert out.tiers == ["cpu", None, "disk"] and out.objs[1] is None
        finally:
            out.release()


async def test_disk_only_cache(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True, local_cpu=False)
    tokens = make_tokens(2 * CHUNK)
    kv = make_kv(2 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        assert await cache.store(tokens, kv) == 2 * CHUNK
        await cache.flush()
        res = await cache.retrieve(tokens)
        assert res.hits_by_tier == {"disk": 2 * CHUNK} and torch.equal(res.kv, kv)
        assert "cpu" not in cache.statistics().tiers


async def test_pin_protects_from_eviction_and_unpin_releases() -> None:
    chunk_bytes = 2 * 2 * CHUNK * 2 * 4 * 4  # 2 layers x K,V x 16 tokens x 2 heads x 4 dims x fp32
    cfg = small_config(max_local_cpu_size=4 * chunk_bytes / 1e9)  # room for 4 chunks
    a, b = make_tokens(2 * CHUNK, seed=1), make_tokens(2 * CHUNK, seed=2)
    kv_a, kv_b = make_kv(2 * CHUNK, seed=1), make_kv(2 * CHUNK, seed=2)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(a, kv_a)
        await cache.store(b, kv_b)
        assert await cache.pin(a) == 2 * CHUNK
        for seed in range(3, 6):  # pressure: every new store must evict, never a pinned chunk
            await cache.store(make_tokens(2 * CHUNK, seed=seed), make_kv(2 * CHUNK, seed=seed))
        res = await cache.retrieve(a)
        assert res.num_tokens == 2 * CHUNK and torch.equal(res.kv, kv_a)
        assert await cache.lookup(b) == 0  # b was not pinned: evicted
        assert await cache.unpin(a) == 2 * CHUNK
        assert await cache.unpin(a) == 0
        for seed in range(6, 9):
            await cache.store(make_tokens(2 * CHUNK, seed=seed), make_kv(2 * CHUNK, seed=seed))
        assert await cache.lookup(a) == 0  # released: evicted like any other
        assert await cache.pin(make_tokens(CHUNK, seed=77)) == 0


async def test_full_pinned_pool_skips_chunks_without_blocking() -> None:
    chunk_bytes = 2 * 2 * CHUNK * 2 * 4 * 4
    cfg = small_config(max_local_cpu_size=2 * chunk_bytes / 1e9)
    a = make_tokens(2 * CHUNK, seed=1)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(a, make_kv(2 * CHUNK, seed=1))
        await cache.pin(a)
        with anyio.fail_after(60):  # generous: the point is that it returns, skipping the chunks
            stored = await cache.store(make_tokens(2 * CHUNK, seed=2), make_kv(2 * CHUNK, seed=2))
        assert stored == 0
        assert cache.statistics().skipped_chunks == 2
        assert await cache.lookup(a) == 2 * CHUNK


async def test_clear(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    tokens = make_tokens(2 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(tokens, make_kv(2 * CHUNK))
        assert await cache.clear() == 4  # 2 in CPU, 2 on disk
        assert await cache.lookup(tokens) == 0
        assert _disk_files(tmp_path) == []


# ----------------------------------------------------------------------------------------------- write-behind
async def test_flush_gets_stores_to_disk(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(make_tokens(3 * CHUNK), make_kv(3 * CHUNK))
        await cache.flush()
        assert len(_disk_files(tmp_path)) == 3
        assert cache.statistics().tiers["disk"].puts == 3


async def _unblock(fifo: Path) -> int:
    """Open the FIFO for reading: the writer's blocked open() returns, its (small) entry fits the pipe buffer."""
    return os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)


async def test_store_returns_before_disk_has_it_and_full_queue_drops(tmp_path: Path) -> None:
    """A really blocked disk: the temp file of the first chunk's write is a FIFO with no reader, so the
    write-behind worker's open() blocks in its thread. store() must still return (CPU has the chunks), and with
    a queue of 1 the third and fourth writes are dropped and counted."""
    cfg = small_config(tmp_path, disk=True, write_queue_size=1)
    requests = [make_tokens(CHUNK, seed=s) for s in range(4)]
    kvs = [make_kv(CHUNK, seed=s) for s in range(4)]
    reader: int | None = None
    async with kvpipe.open_cache(cfg) as cache:
        first_key = cache.keys_for(requests[0])[0]
        final = tmp_path / "disk" / _file_name(first_key)
        fifo = final.with_name(f"{final.name}.tmp.{os.getpid()}")
        os.mkfifo(fifo)
        try:
            with anyio.fail_after(60):
                for toks, kv in zip(requests, kvs):
                    assert await cache.store(toks, kv) == CHUNK  # returns: CPU holds the chunk
            for toks, kv in zip(requests, kvs):
                res = await cache.retrieve(toks)
                assert res.hits_by_tier == {"cpu": CHUNK} and torch.equal(res.kv, kv)
            assert _disk_files(tmp_path) == []  # nothing reached the disk yet
            stats = cache.statistics()
            assert stats.dropped_writes == 2  # one write blocked, one queued, two dropped
        finally:
            reader = await _unblock(fifo)
            with anyio.fail_after(60):
                await cache.flush()
            os.close(reader)
        assert final.exists()  # the blocked write completed (renamed into place) once the disk moved again
        final.unlink()  # it is a FIFO: keep it away from any reader
        written = {p.name for p in _disk_files(tmp_path)}
        assert len(written) == 1  # the queued write; the dropped ones never reach the disk
        assert cache.statistics().dropped_writes == 2


async def test_removed_disk_directory_never_raises(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    a, b = make_tokens(2 * CHUNK, seed=1), make_tokens(2 * CHUNK, seed=2)
    kv_a, kv_b = make_kv(2 * CHUNK, seed=1), make_kv(2 * CHUNK, seed=2)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(a, kv_a)
        await cache.flush()
        shutil.rmtree(tmp_path / "disk")
        assert await cache.store(b, kv_b) == 2 * CHUNK  # CPU still takes it; the disk write fails behind
        await cache.flush()
        assert cache.statistics().tiers["disk"].put_failures == 2
        res = await cache.retrieve(b)
        assert res.num_tokens == 2 * CHUNK and torch.equal(res.kv, kv_b)
        await cache.clear()
    async with kvpipe.open_cache(cfg) as cache:  # recreated at open; the old entries are simply gone
        assert (await cache.retrieve(a)).num_tokens == 0


async def test_disk_entries_removed_underneath_are_misses(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    tokens = make_tokens(3 * CHUNK)
    kv = make_kv(3 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(tokens, kv)
        await cache.flush()
    async with kvpipe.open_cache(cfg) as cache:
        keys = cache.keys_for(tokens)
        (tmp_path / "disk" / _file_name(keys[1])).unlink()
        res = await cache.retrieve(tokens)
        assert res.num_tokens == CHUNK and torch.equal(res.kv, kv[:, :, :CHUNK])
        (tmp_path / "disk" / _file_name(keys[2])).write_bytes(b"garbage")
        assert await cache.lookup(tokens) == CHUNK


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
async def test_read_only_disk_never_raises(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    async with kvpipe.open_cache(cfg) as cache:
        (tmp_path / "disk").chmod(0o500)
        try:
            assert await cache.store(make_tokens(CHUNK), make_kv(CHUNK)) == CHUNK
            await cache.flush()
            assert cache.statistics().tiers["disk"].put_failures == 1
        finally:
            (tmp_path / "disk").chmod(0o700)


# ----------------------------------------------------------------------------------------------- logs
async def test_info_log_lines(caplog: pytest.LogCaptureFixture) -> None:
    tokens = make_tokens(3 * CHUNK + 4)
    with caplog.at_level(logging.INFO, logger="kvpipe"):
        async with kvpipe.open_cache(small_config()) as cache:
            await cache.retrieve(tokens, req_id="r-cold")
            await cache.store(tokens, make_kv(3 * CHUNK + 4), req_id="r-cold")
            await cache.retrieve(tokens, req_id="r-warm")
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert f"Reqid: r-cold, Total tokens {3 * CHUNK + 4}, kvpipe hit tokens: 0, need to load: 0" in lines
    assert any(m.startswith(f"Storing KV cache for {3 * CHUNK} out of {3 * CHUNK + 4} tokens") for m in lines)
    assert any(m.startswith(f"Reqid: r-warm, Total tokens {3 * CHUNK + 4}, kvpipe hit tokens: {3 * CHUNK}, "
                            "need to load:") for m in lines)


async def test_close_returns_while_the_disk_hangs(tmp_path: Path) -> None:
    """A write-behind write stuck in the kernel (the temp file is a FIFO nobody reads) must not hold up the
    cache's close beyond blocking_timeout_secs. A timer unblocks the disk after a long while so that a regression
    fails this test instead of hanging the run."""
    import threading

    cfg = small_config(tmp_path, disk=True, blocking_timeout_secs=0.5)
    state: dict[str, object] = {"timer_unblocked": False}
    fifo: Path | None = None

    def unblock() -> None:
        if fifo is not None and "fd" not in state:
            state["fd"] = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            state["timer_unblocked"] = True

    timer = threading.Timer(60, unblock)
    try:
        async with kvpipe.open_cache(cfg) as cache:
            tokens = make_tokens(CHUNK)
            final = tmp_path / "disk" / _file_name(cache.keys_for(tokens)[0])
            fifo = final.with_name(f"{final.name}.tmp.{os.getpid()}")
            os.mkfifo(fifo)
            timer.start()
            assert await cache.store(tokens, make_kv(CHUNK)) == CHUNK
            await anyio.sleep(0.1)  # let the write-behind worker get stuck in open()
        assert state["timer_unblocked"] is False  # close returned while the disk was still hung
    finally:
        timer.cancel()
        unblock()  # let the abandoned writer thread finish
        with anyio.fail_after(60):
            while fifo is not None and fifo.exists():
                await anyio.sleep(0.05)
        os.close(state["fd"])  # type: ignore[arg-type]
        final.unlink(missing_ok=True)
