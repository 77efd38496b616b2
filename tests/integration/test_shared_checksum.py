"""Disk and a real ``kvpipe server`` (``lm://``) remote share one payload checksum per stored chunk (computed by
the first tier that writes it); both copies read back as valid entries."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from servers import LmServerProc

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config
from kvpipe.native import checksum


@pytest.mark.parametrize("remote_serde", ["naive", "cachegen"])
async def test_disk_and_remote_share_one_hash_per_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        lm: LmServerProc, key_model: str, remote_serde: str) -> None:
    calls: list[int] = []
    real = checksum.xxh3_64

    def counting(data: object) -> int:
        calls.append(memoryview(data).nbytes)  # type: ignore[arg-type]
        return real(data)

    monkeypatch.setattr(checksum, "xxh3_64", counting)
    cfg = small_config(tmp_path, disk=True, remote_url=lm.url, remote_serde=remote_serde, model_name=key_model)
    tokens, kv = make_tokens(3 * CHUNK), make_kv(3 * CHUNK)
    async with kvpipe.open_cache(cfg) as cache:
        await cache.store(tokens, kv)
        await cache.flush()
        assert cache.statistics().tiers["disk"].puts == 3
        assert cache.statistics().tiers["remote"].puts == 3
    chunk_bytes = kv[:, :, :CHUNK].numel() * kv.element_size()
    raw_hashes = [n for n in calls if n == chunk_bytes]
    # One hash per chunk for the raw bytes, shared by disk (naive) and, when naive too, the remote.
    assert len(raw_hashes) == 3
    if remote_serde == "cachegen":  # encoded payloads are hashed as themselves, once each
        assert len([n for n in calls if n != chunk_bytes]) == 3
    # Both copies are valid entries: read from disk, then (disk gone) from the remote.
    async with kvpipe.open_cache(cfg) as cache:
        res = await cache.retrieve(tokens)
        assert res.hits_by_tier == {"disk": 3 * CHUNK} and torch.equal(res.kv, kv)
    shutil.rmtree(tmp_path / "disk")
    async with kvpipe.open_cache(cfg) as cache:
        res = await cache.retrieve(tokens)
        assert res.hits_by_tier == {"remote": 3 * CHUNK}
        if remote_serde == "naive":
            assert torch.equal(res.kv, kv)
        else:
            assert res.kv.shape == kv.shape
