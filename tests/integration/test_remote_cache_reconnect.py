"""Inside a cache, a remote tier reconnects in the cache's own task group: the remote comes back by itself, the
cache then gets hits from it, and closing the cache while the remote is down stops the reconnect loop with it."""

from __future__ import annotations

import time

import anyio
import pytest
import torch
from servers import free_port, lm_server

import kvpipe
from kvpipe.tiers.remote import RemoteTier

pytestmark = pytest.mark.integration


def _remote(cache: kvpipe.KVCache) -> RemoteTier:
    (tier,) = [t for t in cache.lower if isinstance(t, RemoteTier)]
    return tier


async def test_remote_comes_back_through_the_cache_task_group(tmp_path: pytest.TempPathFactory, key_model: str
                                                              ) -> None:
    port = free_port()
    server = lm_server(tmp_path, port=port)  # type: ignore[arg-type]
    cfg = kvpipe.Config(chunk_size=16, max_local_cpu_size=0.004, kv_dtype="float32", model_name=key_model,
                        remote_url=f"lm://127.0.0.1:{port}", blocking_timeout_secs=1.0, local_cpu=False)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50000, (64,), generator=g).tolist()
    kv = torch.randn((2, 2, 64, 2, 4), generator=g)
    try:
        async with kvpipe.open_cache(cfg) as cache:
            tier = _remote(cache)
            assert not tier.available
            assert tier._reconnect is None  # the task started at open (down) moved into the cache's group
            assert (await cache.retrieve(tokens)).num_tokens == 0  # a miss, at once
            server.start()
            deadline = time.monotonic() + 10
            while not tier.available and time.monotonic() < deadline:
                await anyio.sleep(0.02)
            assert tier.available and tier._reconnect is None
            assert await cache.store(tokens, kv) == 64
            await cache.flush()
            r = await cache.retrieve(tokens)
            assert r.num_tokens == 64 and r.hits_by_tier == {"remote": 64}
            assert r.kv is not None and torch.equal(r.kv, kv)
    finally:
        server.stop()


async def test_closing_the_cache_stops_a_pending_reconnect(key_model: str) -> None:
    cfg = kvpipe.Config(chunk_size=16, max_local_cpu_size=0.004, kv_dtype="float32", model_name=key_model,
                        remote_url=f"lm://127.0.0.1:{free_port()}", blocking_timeout_secs=1.0)
    with anyio.fail_after(10):
        async with kvpipe.open_cache(cfg) as cache:
            tier = _remote(cache)
            tier._mark_down("test")  # already down: starts nothing new
            await cache.store(list(range(32)), torch.zeros((2, 2, 32, 2, 4)))  # the store still works (CPU)
            assert (await cache.retrieve(list(range(32)))).num_tokens == 32
    assert not tier.available and tier._closed


def _prometheus(text: str) -> dict[str, float]:
    """``name{labels}`` -> value of each sample line of a Prometheus text."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


async def test_metrics_show_the_remote_going_down_and_the_writes_it_dropped(tmp_path: pytest.TempPathFactory,
                                                                           key_model: str) -> None:
    from kvpipe.serve.metrics import ServeMetrics, render_prometheus

    port = free_port()
    server = lm_server(tmp_path, port=port).start()  # type: ignore[arg-type]
    cfg = kvpipe.Config(chunk_size=16, max_local_cpu_size=0.004, kv_dtype="float32", model_name=key_model,
                        remote_url=f"lm://127.0.0.1:{port}", blocking_timeout_secs=1.0)
    g = torch.Generator().manual_seed(5)
    docs = [torch.randint(0, 50000, (64,), generator=g).tolist() for _ in range(3)]
    kv = torch.randn((2, 2, 64, 2, 4), generator=g)

    def scrape(cache: kvpipe.KVCache) -> dict[str, float]:
        return _prometheus(render_prometheus(ServeMetrics(), cache.statistics(), queue_depth=0, model="m"))

    try:
        async with kvpipe.open_cache(cfg) as cache:
            assert await cache.store(docs[0], kv) == 64
            await cache.flush()
            m = scrape(cache)
            assert m['kvpipe_tier_up{tier="remote"}'] == 1 and m['kvpipe_tier_puts_total{tier="remote"}'] == 4
            assert m['kvpipe_tier_bytes_written_total{tier="remote"}'] == kv.numel() * 4
            assert m['kvpipe_tier_down_events_total{tier="remote"}'] == 0
            server.stop()
            for doc in docs[1:]:  # 8 chunks the remote cannot take: the first write finds it gone
                assert await cache.store(doc, kv) == 64  # the CPU tier has them: store() is not held up
                await cache.flush()
            m = scrape(cache)
            assert m['kvpipe_tier_up{tier="remote"}'] == 0 and m['kvpipe_tier_up{tier="cpu"}'] == 1
            assert m['kvpipe_tier_down_events_total{tier="remote"}'] >= 1
            assert m['kvpipe_tier_puts_total{tier="remote"}'] == 4
            assert m['kvpipe_tier_put_failures_total{tier="remote"}'] == 8  # every chunk stored or counted
            assert m['kvpipe_tier_dropped_while_down_total{tier="remote"}'] >= 4  # at least the last store's
    finally:
        server.stop()
