"""The example plugin, loaded through the real ``kvpipe`` entry-point group of its installed distribution."""

from __future__ import annotations

import importlib.metadata

import torch

import kvpipe
from kvpipe.plugins import registries


def test_entry_point_is_installed_and_registers() -> None:
    eps = importlib.metadata.entry_points(group="kvpipe")
    assert "example" in {ep.name for ep in eps}
    regs = registries(reload=True)
    assert "dict" in regs.tiers
    assert "count_bytes" in regs.stages
    assert regs.tiers.owners["dict"] == "example"


async def test_dict_tier_as_remote_and_count_stage(tmp_path) -> None:
    from kvpipe_example.plugin import COUNTS, STORES

    cfg = kvpipe.Config(chunk_size=8, max_local_cpu_size=0.001, remote_url="dict://plugin-test",
                        extra_stages=["count_bytes"], kv_dtype="float32")
    tokens = list(range(32))
    kv = torch.randn(2, 2, 32, 1, 4)
    before = COUNTS["chunks"]
    async with kvpipe.open_cache(cfg) as cache:
        assert await cache.store(tokens, kv) == 32
        await cache.flush()
    assert COUNTS["chunks"] - before == 4
    assert len(STORES["plugin-test"]) == 4
    # A fresh cache (empty CPU tier) is served by the plugin tier, bit-identical.
    async with kvpipe.open_cache(cfg) as cache:
        res = await cache.retrieve(tokens)
        assert res.num_tokens == 32
        assert res.hits_by_tier == {"dict": 32}
        assert torch.equal(res.kv, kv)
