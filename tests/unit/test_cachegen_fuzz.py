"""Fuzz the CacheGen decoder: random bytes, truncations and bit flips are CorruptEntry, never a crash.

Seeded loops (reproducible, fast). Flips inside the body are caught by the container checksum; to reach the
structural checks and the entropy decoder behind it, some cases re-seal the checksums after corrupting.
"""

from __future__ import annotations

import random
import struct

import pytest
import torch
import xxhash

from kvpipe.errors import CorruptEntry
from kvpipe.serde.cachegen import CacheGenSerde
from kvpipe.serde.cachegen.container import CONTAINER_HEADER_SIZE

_HEAD = CONTAINER_HEADER_SIZE - 4


def _payload(lossless: bool = False, coder: str = "constriction") -> tuple[CacheGenSerde, bytes, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    kv = (torch.randn((3, 2, 24, 2, 8), generator=g).cumsum(2) * 0.3).half()
    serde = CacheGenSerde(lossless=lossless, anchor_group=6, coder=coder)
    return serde, bytes(serde.encode(kv)), kv


def _reseal(buf: bytearray) -> bytes:
    """Recompute the body and header checksums of a (corrupted) container."""
    body = memoryview(buf)[CONTAINER_HEADER_SIZE:]
    struct.pack_into("<Q", buf, 72, xxhash.xxh3_64_intdigest(body))
    struct.pack_into("<I", buf, _HEAD, xxhash.xxh32_intdigest(bytes(buf[:_HEAD])))
    return bytes(buf)


def _decode(serde: CacheGenSerde, data: bytes, like: torch.Tensor) -> None:
    serde.decode_into(memoryview(data), torch.empty_like(like))


@pytest.mark.parametrize("lossless", [False, True])
def test_random_bytes(lossless: bool) -> None:
    serde, good, kv = _payload(lossless)
    rng = random.Random(0)
    for n in [0, 1, 3, 83, 84, 85, 200, len(good)]:
        for _ in range(5):
            with pytest.raises(CorruptEntry):
                _decode(serde, rng.randbytes(n), kv)
    # Random bytes behind a valid magic still fail cleanly.
    for _ in range(20):
        with pytest.raises(CorruptEntry):
            _decode(serde, b"KVCG" + rng.randbytes(len(good) - 4), kv)


@pytest.mark.parametrize("lossless", [False, True])
def test_truncations(lossless: bool) -> None:
    serde, good, kv = _payload(lossless)
    for n in sorted({*range(0, 120), *range(len(good) - 40, len(good)), len(good) // 2}):
        with pytest.raises(CorruptEntry):
            _decode(serde, good[:n], kv)
    with pytest.raises(CorruptEntry):
        _decode(serde, good + b"\0\0\0\0", kv)


@pytest.mark.parametrize("lossless", [False, True])
def test_bit_flips(lossless: bool) -> None:
    serde, good, kv = _payload(lossless)
    rng = random.Random(1)
    positions = list(range(CONTAINER_HEADER_SIZE)) + rng.sample(range(CONTAINER_HEADER_SIZE, len(good)), 150)
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 1 << rng.randrange(8)
        with pytest.raises(CorruptEntry):
            _decode(serde, bytes(bad), kv)


@pytest.mark.parametrize("coder", ["constriction", "native"])
@pytest.mark.parametrize("lossless", [False, True])
def test_resealed_corruption_never_crashes(lossless: bool, coder: str) -> None:
    """With valid checksums over corrupted fields, decode either raises CorruptEntry or returns some tensor.

    For the native coder this drives corrupt lengths, tables and words into the C++ decoder itself."""
    serde, good, kv = _payload(lossless, coder)
    rng = random.Random(2)
    outcomes = {"corrupt": 0, "decoded": 0}
    for i in range(300):
        bad = bytearray(good)
        if i % 3 == 0:  # a header field (not magic, not checksums)
            pos = rng.randrange(4, 64)
        else:
            pos = rng.randrange(CONTAINER_HEADER_SIZE, len(good))
        for _ in range(rng.randrange(1, 4)):
            bad[pos] ^= 1 << rng.randrange(8)
        try:
            _decode(serde, _reseal(bad), kv)
            outcomes["decoded"] += 1
        except CorruptEntry:
            outcomes["corrupt"] += 1
    assert outcomes["corrupt"] > 0


def test_good_payload_still_decodes() -> None:
    serde, good, kv = _payload()
    out = torch.empty_like(kv)
    serde.decode_into(memoryview(good), out)
    assert (out.float() - kv.float()).abs().max() < 0.5
