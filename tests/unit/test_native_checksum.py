"""The GIL-free payload checksum (``kvpipe/native/xxh3.c``) equals python-xxhash's xxh3_64 on every input."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import xxhash

from kvpipe.native import checksum
from kvpipe.serde.entry import payload_checksum

# Around every boundary of the long-input path: 240/241 (short vs long), stripes (64), blocks (1024).
LENGTHS = [0, 1, 3, 16, 17, 128, 129, 239, 240, 241, 255, 256, 1023, 1024, 1025, 1087, 1088, 1089, 2048, 4095,
           65536 + 7, 1 << 20, (4 << 20) + 13]


def test_native_hasher_builds_here() -> None:
    # CI machines have gcc; without a compiler the module falls back to python-xxhash (tested below).
    assert checksum.available()


@pytest.mark.parametrize("n", LENGTHS)
def test_same_value_as_python_xxhash(n: int) -> None:
    rng = random.Random(n)
    data = rng.randbytes(n)
    assert checksum.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)
    assert payload_checksum(memoryview(data)) == xxhash.xxh3_64_intdigest(data)


def test_buffer_kinds_and_offsets() -> None:
    base = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    for start in range(0, 9):  # unaligned starts
        view = memoryview(base)[start : start + 5000]
        assert checksum.xxh3_64(view) == xxhash.xxh3_64_intdigest(view)
    t = torch.arange(4096, dtype=torch.float16).view(8, 512)
    raw = t.numpy().tobytes()
    assert checksum.xxh3_64(memoryview(t.numpy())) == xxhash.xxh3_64_intdigest(raw)  # a 2-D, non-byte view
    strided = memoryview(base)[::2]  # not contiguous: hashed as its bytes in order
    assert checksum.xxh3_64(strided) == xxhash.xxh3_64_intdigest(strided.tobytes())


def test_all_zero_and_all_ones() -> None:
    for fill in (0, 255):
        data = bytes([fill]) * 100_000
        assert checksum.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)


def test_fallback_without_the_native_library(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checksum, "_native", lambda: None)
    data = random.Random(1).randbytes(10_000)
    assert checksum.xxh3_64(data) == xxhash.xxh3_64_intdigest(data)
