"""A chunk whose write-behind was dropped (a full queue) or failed (the remote was down) lives in the CPU tier
alone; storing the same tokens again writes it behind again, so it reaches disk and the remote instead of being
lost when the CPU tier evicts it. Checked with a fresh cache over the same disk directory and the same remote, so
only what reached those tiers can answer."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch
from servers import free_port, lm_server

import kvpipe
from fixtures_core import CHUNK, shared_prefix_docs, small_config

pytestmark = pytest.mark.integration

DOCS, KVS = shared_prefix_docs(6, own_chunks=4)
N = 6 * CHUNK  # tokens per document


async def _whole(cfg: kvpipe.Config, tier: str) -> list[int]:
    """Tokens each document gets back from a fresh cache (an empty CPU tier): only ``tier`` can answer."""
    got = []
    async with kvpipe.open_cache(cfg) as cache:
        for d in range(6):
            res = await cache.retrieve(DOCS[d])
            assert set(res.hits_by_tier) <= {tier}
            assert res.kv is None or torch.equal(res.kv, KVS[d][:, :, : res.num_tokens])
            got.append(res.num_tokens)
    return got


async def test_a_dropped_write_is_written_again_by_the_next_store(tmp_path: Path, key_model: str) -> None:
    cfg = small_config(tmp_path, disk=True, model_name=key_model, write_queue_size=1)
    async with kvpipe.open_cache(cfg) as cache:
        async with anyio.create_task_group() as tg:  # six stores at once into a queue of one: writes are dropped
            for d in range(6):
                tg.start_soon(cache.store, DOCS[d], KVS[d])
        await cache.flush()
        assert cache.statistics().dropped_writes > 0
        for d in range(6):  # the same tokens again: every chunk is in CPU already
            await cache.store(DOCS[d], KVS[d])
            await cache.flush()
    assert await _whole(small_config(tmp_path, disk=True, model_name=key_model, local_cpu=False), "disk") == [N] * 6


async def test_writes_failed_while_the_remote_was_down_are_written_again(tmp_path: Path, key_model: str) -> None:
    port = free_port()
    server = lm_server(tmp_path, port=port)
    cfg = small_config(model_name=key_model, remote_url=f"lm://127.0.0.1:{port}", blocking_timeout_secs=1.0)
    try:
        async with kvpipe.open_cache(cfg) as cache:
            (remote,) = [t for t in cache.lower if t.name == "remote"]
            for d in range(6):  # the remote is not there: the CPU tier alone takes them
                await cache.store(DOCS[d], KVS[d])
            await cache.flush()
            failed = cache.statistics().tiers["remote"].put_failures
            assert failed > 0 and not remote.available
            for d in range(6):  # again while it is down: nothing is sent again (it would only be dropped again)
                await cache.store(DOCS[d], KVS[d])
            await cache.flush()
            assert cache.statistics().tiers["remote"].put_failures == failed
            server.start()
            with anyio.fail_after(15):
                while not remote.available:
                    await anyio.sleep(0.05)
            for d in range(6):
                await cache.store(DOCS[d], KVS[d])
                await cache.flush()
        cpu_off = small_config(model_name=key_model, remote_url=f"lm://127.0.0.1:{port}", local_cpu=False)
        assert await _whole(cpu_off, "remote") == [N] * 6
    finally:
        server.stop()
