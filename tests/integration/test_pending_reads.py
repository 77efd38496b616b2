"""A chunk queued for a slower tier is readable before its write lands: a retrieve right after a store hits from
the write queue ("pending"), with no CPU tier (the seed's remote-only config) and when the CPU tier lost the chunk.

The remote server is held with SIGSTOP while the writes are queued, so the writes are certainly still in flight
when the cache is read (no timing assumed); SIGCONT lets them land, and a fresh cache then reads what reached the
remote, so both paths hand back the KV that went in."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import torch
from servers import LmServerProc, ServerProc, lm_server

import kvpipe
from fixtures_core import CHUNK, shared_prefix_docs, small_config
from kvpipe.serve.metrics import ServeMetrics, render_prometheus

pytestmark = pytest.mark.integration

DOCS, KVS = shared_prefix_docs(3, own_chunks=2)
N = 4 * CHUNK  # tokens per document


@pytest.fixture(params=["valkey", "lm"])
def server(request: pytest.FixtureRequest) -> ServerProc:
    proc: ServerProc = request.getfixturevalue(f"fresh_{request.param}")
    return proc


def _url(server: ServerProc) -> str:
    return server.url if isinstance(server, LmServerProc) else f"redis://127.0.0.1:{server.port}"


@contextlib.contextmanager
def _held(server: ServerProc) -> Iterator[None]:
    """The server stopped (it accepts bytes into its socket buffer, answers nothing) until the block ends."""
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.proc.send_signal(signal.SIGCONT)


async def _from_remote_alone(cfg: kvpipe.Config) -> list[int]:
    async with kvpipe.open_cache(attrs.evolve(cfg, local_cpu=False)) as cache:
        got = []
        for d, doc in enumerate(DOCS):
            res = await cache.retrieve(doc)
            assert set(res.hits_by_tier) <= {"remote"}
            assert res.kv is None or torch.equal(res.kv, KVS[d][:, :, : res.num_tokens])
            got.append(res.num_tokens)
        return got


async def test_no_cpu_tier_reads_what_the_write_queue_holds(server: ServerProc, key_model: str) -> None:
    cfg = small_config(model_name=key_model, remote_url=_url(server), local_cpu=False, blocking_timeout_secs=60)
    async with kvpipe.open_cache(cfg) as cache:
        with _held(server):
            for d, doc in enumerate(DOCS):
                assert await cache.store(doc, KVS[d]) > 0
            assert await cache.lookup(DOCS[0]) == N
            for d, doc in enumerate(DOCS):
                res = await cache.retrieve(doc)
                assert res.num_tokens == N
                assert res.kv is not None and torch.equal(res.kv, KVS[d])
                # the shared system prompt was queued once; every chunk is still in the queue, none in the remote
                assert res.hits_by_tier == {"pending": N}
            assert cache.statistics().tiers["remote"].puts == 0
            assert cache.statistics().pending_hits == 3 * 4  # 4 chunks read per document
            text = render_prometheus(ServeMetrics(), cache.statistics(), queue_depth=0, model="m")
            assert "kvpipe_pending_hits_total 12" in text.splitlines()
        await cache.flush()
        assert cache.statistics().tiers["remote"].puts > 0
        res = await cache.retrieve(DOCS[1])  # written now: the remote serves it
        assert res.hits_by_tier == {"remote": N} and torch.equal(res.kv, KVS[1])  # type: ignore[arg-type]
        assert cache.statistics().pool.used == 0  # the queue's references are all released
    assert await _from_remote_alone(cfg) == [N] * len(DOCS)


async def test_a_chunk_gone_from_cpu_is_read_from_the_queue(server: ServerProc, key_model: str) -> None:
    cfg = small_config(model_name=key_model, remote_url=_url(server), blocking_timeout_secs=60)
    async with kvpipe.open_cache(cfg) as cache:
        with _held(server):
            await cache.store(DOCS[0], KVS[0])
            assert cache.cpu is not None
            keys = cache.keys_for(DOCS[0])
            assert await cache.cpu.delete_many(keys[2:]) == 2  # as an LRU eviction would: the last two chunks
            res = await cache.retrieve(DOCS[0])
            assert res.hits_by_tier == {"cpu": 2 * CHUNK, "pending": 2 * CHUNK}
            assert res.kv is not None and torch.equal(res.kv, KVS[0])
            assert await cache.cpu.contains_many(keys) == [True] * 4  # promoted back into CPU
        await cache.flush()
    assert (await _from_remote_alone(cfg))[0] == N


async def test_storing_again_while_queued_neither_copies_nor_queues_again(server: ServerProc, key_model: str) -> None:
    cfg = small_config(model_name=key_model, remote_url=_url(server), local_cpu=False, blocking_timeout_secs=60)
    async with kvpipe.open_cache(cfg) as cache:
        (wb,) = cache._behind
        with _held(server):
            assert await cache.store(DOCS[0], KVS[0]) == N
            used = cache.statistics().pool.used
            # no CPU tier, but the write queue holds every chunk: nothing new, no copy, no second write
            assert await cache.store(DOCS[0], KVS[0]) == 0
            assert wb.queued_chunks == 4 and cache.statistics().pool.used == used
            # a prompt sharing the first two chunks queues only its own two
            assert await cache.store(DOCS[1], KVS[1]) == 2 * CHUNK and wb.queued_chunks == 6
            res = await cache.retrieve(DOCS[0])
            assert res.hits_by_tier == {"pending": N} and torch.equal(res.kv, KVS[0])  # type: ignore[arg-type]
        await cache.flush()
        assert cache.statistics().tiers["remote"].puts == 6  # each chunk written once
        assert cache.statistics().pool.used == 0
        res = await cache.retrieve(DOCS[0])
        assert res.hits_by_tier == {"remote": N} and torch.equal(res.kv, KVS[0])  # type: ignore[arg-type]
        assert await cache.store(DOCS[0], KVS[0]) == N  # written and no longer queued: stored anew (no CPU tier)


async def test_a_chunk_gone_from_cpu_but_queued_is_put_back_not_copied(server: ServerProc, key_model: str) -> None:
    cfg = small_config(model_name=key_model, remote_url=_url(server), blocking_timeout_secs=60)
    async with kvpipe.open_cache(cfg) as cache:
        assert cache.cpu is not None
        (wb,) = cache._behind
        keys = cache.keys_for(DOCS[0])
        with _held(server):
            assert await cache.store(DOCS[0], KVS[0]) == N
            assert await cache.cpu.delete_many(keys[2:]) == 2  # as an LRU eviction would
            assert await cache.store(DOCS[0], KVS[0]) == 0
            assert wb.queued_chunks == 4  # not queued a second time
            assert await cache.cpu.contains_many(keys) == [True] * 4  # the queue's memory, back in CPU
            res = await cache.retrieve(DOCS[0])
            assert res.hits_by_tier == {"cpu": N} and torch.equal(res.kv, KVS[0])  # type: ignore[arg-type]
        await cache.flush()
        assert cache.statistics().tiers["remote"].puts == 4
    assert (await _from_remote_alone(cfg))[0] == N


async def test_a_write_that_fails_is_a_miss_not_an_error(tmp_path: Path, key_model: str) -> None:
    server = lm_server(tmp_path).start()
    cfg = small_config(model_name=key_model, remote_url=_url(server), local_cpu=False, blocking_timeout_secs=60)
    try:
        async with kvpipe.open_cache(cfg) as cache:
            with _held(server):
                await cache.store(DOCS[0], KVS[0])
                assert (await cache.retrieve(DOCS[0])).hits_by_tier == {"pending": N}
                server.kill()  # the queued write fails: the queue lets go of the chunks
            await cache.flush()
            res = await cache.retrieve(DOCS[0])
            assert res.num_tokens == 0 and res.kv is None
            assert cache.statistics().pool.used == 0
    finally:
        server.stop()


async def test_a_queued_chunk_another_tier_failed_to_write_is_written_there_again(
        tmp_path: Path, server: ServerProc, key_model: str) -> None:
    """No CPU tier, disk and remote: the disk write fails (its directory is gone) while the remote write waits in
    its queue. Storing the prompt again finds the chunks queued for the remote (not new, not queued there twice)
    and writes them to disk again, from the queue's memory."""
    cfg = small_config(tmp_path, disk=True, model_name=key_model, remote_url=_url(server), local_cpu=False,
                       blocking_timeout_secs=60)
    async with kvpipe.open_cache(cfg) as cache:
        disk_wb, remote_wb = cache._behind
        root = disk_wb.guard.tier.root  # type: ignore[attr-defined]
        assert disk_wb.guard.tier.name == "disk" and remote_wb.guard.tier.name == "remote"
        with _held(server):
            root.rename(root.with_name("away"))
            root.write_bytes(b"")  # a file where the directory was: every entry write fails
            assert await cache.store(DOCS[0], KVS[0]) == N
            await disk_wb.flush()
            assert cache.statistics().tiers["disk"].put_failures == 4
            root.unlink()
            root.with_name("away").rename(root)
            assert await cache.store(DOCS[0], KVS[0]) == 0  # queued for the remote: not new
            await disk_wb.flush()
            assert remote_wb.queued_chunks == 4 and disk_wb.queued_chunks == 8
            assert cache.statistics().tiers["disk"].puts == 4
        await cache.flush()
        assert cache.statistics().tiers["remote"].puts == 4
    async with kvpipe.open_cache(small_config(tmp_path, disk=True, model_name=key_model, local_cpu=False)) as cache:
        res = await cache.retrieve(DOCS[0])  # the disk alone answers
        assert res.hits_by_tier == {"disk": N} and torch.equal(res.kv, KVS[0])  # type: ignore[arg-type]
