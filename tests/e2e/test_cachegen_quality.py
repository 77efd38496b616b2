"""CacheGen on the real model's KV (SmolLM2-135M-Instruct, CPU): size and next-token quality.

Figures measured by benchmarks/bench_cachegen.py (fp32 reference, 3 texts, 1536 positions): ratio ~3.54x vs
fp16, top-1 agreement ~0.991, mean KL ~0.00053 (plain int8: 2x, 0.992, 0.00023; an fp16 cast: 1.0, 0). On the
128 positions used here the codec measures 0.969 / KL 0.0012 (container v1 defaults: 0.961 / 0.0019; one miss
there has a 0.54-nat reference margin under either); a single near-tie flip is 0.8%, so the floors leave room
for two flips and 2.5x the KL.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any

import pytest
import torch

from kvpipe.serde.cachegen import CacheGenSerde
from kvpipe.serde.cachegen.quality import measure_quality, prefill_kv

pytestmark = [pytest.mark.model]


@pytest.fixture(scope="module")
def report_ids(smol: tuple[Any, Any]) -> torch.Tensor:
    _, tok = smol
    text = (importlib.resources.files("kvpipe") / "data" / "harbor_report.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids
    assert ids.shape[1] >= 640
    return ids


def _codec(serde: CacheGenSerde, sizes: list[int]) -> Any:
    def roundtrip(kv: torch.Tensor) -> torch.Tensor:
        half = kv.to(torch.float16).contiguous()
        payload = serde.encode(half)
        sizes.append(len(payload))
        out = torch.empty_like(half)
        serde.decode_into(memoryview(payload), out)
        return out.to(kv.dtype)
    return roundtrip


def test_ratio_on_real_kv(smol: tuple[Any, Any], report_ids: torch.Tensor) -> None:
    model, _ = smol
    kv = prefill_kv(model, report_ids[:, :512]).to(torch.float16)
    serde = CacheGenSerde()
    for start in (0, 256):
        chunk = kv[:, :, start:start + 256].contiguous()
        payload = serde.encode(chunk)
        assert chunk.numel() * 2 / len(payload) > 3
        out = torch.empty_like(chunk)
        serde.decode_into(memoryview(payload), out)
        rel = (out.float() - chunk.float()).norm() / chunk.float().norm()
        assert rel < 0.1


def test_lossless_mode_exact_on_real_kv(smol: tuple[Any, Any], report_ids: torch.Tensor) -> None:
    model, _ = smol
    chunk = prefill_kv(model, report_ids[:, :256]).to(torch.bfloat16).contiguous()
    serde = CacheGenSerde(lossless=True)
    out = torch.empty_like(chunk)
    serde.decode_into(memoryview(serde.encode(chunk)), out)
    assert torch.equal(out.view(torch.uint8), chunk.view(torch.uint8))


def test_top1_agreement_floor(smol: tuple[Any, Any], report_ids: torch.Tensor) -> None:
    model, _ = smol
    sizes: list[int] = []
    r = measure_quality(model, report_ids[:, :512], report_ids[:, 512:640], _codec(CacheGenSerde(), sizes),
                        greedy_steps=4)
    assert r.positions == 128
    assert r.top1_agreement >= 0.95
    assert r.kl_mean < 0.003
    assert sizes


async def test_disk_tier_with_cachegen(smol: tuple[Any, Any], report_ids: torch.Tensor, tmp_path: Path,
                                       cache_config: Any) -> None:
    """Store real KV through a disk tier that uses cachegen; what comes back is close to what went in."""
    import kvpipe

    model, _ = smol
    tokens = report_ids[0, :512]
    kv = prefill_kv(model, tokens.view(1, -1))
    config = cache_config(disk=tmp_path / "disk", local_disk_serde="cachegen", local_cpu=False)
    async with kvpipe.open_cache(config) as cache:
        assert await cache.store(tokens, kv) == 512
        await cache.flush()
        res = await cache.retrieve(tokens)
    assert res.num_tokens == 512 and res.hits_by_tier.get("disk", 0) == 512
    got = res.kv.float()
    rel = (got - kv[:, :, :512].float()).norm() / kv.float().norm()
    assert rel < 0.1
