"""A stored chunk's payload checksum is computed once, by the first tier that writes its raw bytes behind, and
reused by the others (also when they ask at the same time); entries written with it read back bit-identical."""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import xxhash

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config
from kvpipe.memory.pool import MemoryObj, create_pool
from kvpipe.native import checksum


async def test_checksum_is_the_bytes_hash_and_memoized(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = create_pool(1 << 20)
    obj = pool.allocate((4, 1000), torch.float32, 4)
    assert obj is not None
    obj.tensor.copy_(torch.randn(4, 1000))
    want = xxhash.xxh3_64_intdigest(obj.byte_view)
    assert await obj.checksum() == want
    monkeypatch.setattr(checksum, "xxh3_64", lambda _d: pytest.fail("hashed twice"))
    assert obj.checksum_blocking() == want and await obj.checksum() == want
    obj.release()
    other = MemoryObj.detached(torch.arange(3000, dtype=torch.float16), 3)
    other.set_checksum(12345)  # known already: taken as given
    assert await other.checksum() == 12345


def test_concurrent_first_callers_hash_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = checksum.xxh3_64
    gate = threading.Event()

    def slow(data: object) -> int:
        calls.append(1)
        gate.wait(5)
        return real(data)

    monkeypatch.setattr(checksum, "xxh3_64", slow)
    obj = MemoryObj.detached(torch.randn(50_000), 1)
    with ThreadPoolExecutor(4) as ex:
        futures = [ex.submit(obj.checksum_blocking) for _ in range(4)]
        gate.set()
        values = {f.result(timeout=10) for f in futures}
    assert values == {xxhash.xxh3_64_intdigest(obj.tensor.numpy().tobytes())} and len(calls) == 1


@pytest.mark.parametrize("remote_serde", ["naive", "cachegen"])
async def test_disk_and_remote_share_one_hash_per_chunk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        remote_serde: str) -> None:
    calls: list[int] = []
    real = checksum.xxh3_64

    def counting(data: object) -> int:
        calls.append(memoryview(data).nbytes)  # type: ignore[arg-type]
        return real(data)

    monkeypatch.setattr(checksum, "xxh3_64", counting)
    name = f"mock://shared-checksum-{remote_serde}"
    cfg = small_config(tmp_path, disk=True, remote_url=name, remote_serde=remote_serde)
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
