"""``MemoryObj.checksum``: the xxh3 of a chunk's bytes, memoized, and computed once when several threads ask at
the same time (disk and remote sharing it through a cache: ``tests/integration/test_shared_checksum.py``)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import xxhash

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
