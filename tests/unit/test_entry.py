"""The entry header (to_bytes/from_bytes round trip, every corruption → CorruptEntry) and the naive serde."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash

from fixtures_core import make_kv
from kvpipe import ChunkKey, CorruptEntry
from kvpipe.serde.entry import (
    DTYPE_CODES,
    HEADER_SIZE,
    MAGIC,
    EntryHeader,
    dtype_from_name,
    dtype_name,
    key_fingerprint,
)
from kvpipe.serde.naive import NaiveSerde

KEY = ChunkKey("kvpipe", "m", 1, 0, "ab" * 32, "float16")
OTHER = ChunkKey("kvpipe", "m", 1, 0, "cd" * 32, "float16")


def _entry(kv: torch.Tensor, key: ChunkKey = KEY) -> tuple[EntryHeader, bytes]:
    payload = NaiveSerde().encode(kv)
    hdr = EntryHeader.for_payload(key, "naive", kv, kv.shape[2], payload, len(payload))
    return hdr, hdr.to_bytes() + bytes(payload)


def _recrc(raw: bytearray) -> bytearray:
    """Recompute the header checksum after a field edit, so the field's own check is what fails."""
    struct.pack_into("<I", raw, 76, xxhash.xxh32_intdigest(bytes(raw[:76])))
    return raw


@pytest.mark.parametrize("dtype", list(DTYPE_CODES), ids=dtype_name)
def test_header_round_trip(dtype: torch.dtype) -> None:
    kv = make_kv(16).to(dtype)
    hdr, data = _entry(kv)
    raw = hdr.to_bytes()
    assert len(raw) == HEADER_SIZE == 80
    assert raw[:4] == MAGIC
    back = EntryHeader.from_bytes(raw)
    assert back == hdr
    assert back.shape == tuple(kv.shape) and back.dtype == dtype and back.num_tokens == 16
    assert back.tensor_nbytes == kv.numel() * kv.element_size() == back.payload_len
    back.check_key(KEY)
    back.check_payload(memoryview(data)[HEADER_SIZE:], len(data) - HEADER_SIZE)
    assert EntryHeader.from_bytes(memoryview(data)) == hdr  # a longer buffer: only the header is parsed


def test_mla_shape_round_trip() -> None:
    kv = make_kv(16, mla=True)
    hdr, _ = _entry(kv)
    assert EntryHeader.from_bytes(hdr.to_bytes()).shape == (2, 1, 16, 4)


def _corrupt_header(field: str) -> bytes | bytearray:
    _, data = _entry(make_kv(16))
    raw = bytearray(data[:HEADER_SIZE])
    if field == "magic":
        raw[0:4] = b"XXXX"
    elif field == "magic-with-crc":
        raw[0:4] = b"KVPF"
        _recrc(raw)
    elif field == "version":
        struct.pack_into("<H", raw, 4, 99)
    elif field == "version-with-crc":
        struct.pack_into("<H", raw, 4, 99)
        _recrc(raw)
    elif field == "header-size-with-crc":
        struct.pack_into("<H", raw, 6, 64)
        _recrc(raw)
    elif field == "crc":
        raw[77] ^= 0xFF
    elif field == "body-bit":
        raw[44] ^= 0x01  # payload length, crc not updated
    elif field == "dtype-with-crc":
        raw[16] = 200
        _recrc(raw)
    elif field == "ndim-with-crc":
        raw[17] = 0
        _recrc(raw)
    elif field == "shape-with-crc":
        struct.pack_into("<I", raw, 20, 0)
        _recrc(raw)
    elif field == "serde-with-crc":
        raw[8:16] = b"\xff" * 8
        _recrc(raw)
    elif field == "truncated":
        return bytes(raw[:79])
    elif field == "empty":
        return b""
    elif field == "garbage":
        return bytes(range(80))
    return raw


@pytest.mark.parametrize("field", ["magic", "magic-with-crc", "version", "version-with-crc", "header-size-with-crc",
                                   "crc", "body-bit", "dtype-with-crc", "ndim-with-crc", "shape-with-crc",
                                   "serde-with-crc", "truncated", "empty", "garbage"])
def test_header_corruption_is_corrupt_entry(field: str) -> None:
    with pytest.raises(CorruptEntry):
        EntryHeader.from_bytes(_corrupt_header(field))


def test_foreign_key() -> None:
    hdr, _ = _entry(make_kv(16), key=OTHER)
    back = EntryHeader.from_bytes(hdr.to_bytes())
    back.check_key(OTHER)
    with pytest.raises(CorruptEntry, match="another key"):
        back.check_key(KEY)
    assert key_fingerprint(KEY) == key_fingerprint(KEY.to_string()) != key_fingerprint(OTHER)


def test_payload_checksum_and_length() -> None:
    hdr, data = _entry(make_kv(16))
    payload = bytearray(data[HEADER_SIZE:])
    hdr.check_payload(payload, len(payload))
    with pytest.raises(CorruptEntry, match="payload is"):
        hdr.check_payload(payload[:-1], len(payload) - 1)  # truncated
    with pytest.raises(CorruptEntry, match="payload is"):
        hdr.check_payload(payload + b"x", len(payload) + 1)  # trailing bytes
    payload[100] ^= 0x40
    with pytest.raises(CorruptEntry, match="checksum"):
        hdr.check_payload(payload, len(payload))


# ----------------------------------------------------------------------------------------------- naive serde
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_name)
def test_naive_round_trip_bit_identical(dtype: torch.dtype) -> None:
    kv = make_kv(16, dtype=dtype)
    serde = NaiveSerde()
    assert serde.raw and serde.lossless and serde.name == "naive"
    payload = serde.encode(kv)
    out = torch.empty_like(kv)
    serde.decode_into(memoryview(bytes(payload)), out)
    assert torch.equal(out, kv)


def test_naive_encode_is_zero_copy_for_contiguous() -> None:
    kv = make_kv(16)
    payload = NaiveSerde().encode(kv)
    kv[0, 0, 0, 0, 0] = 42.0
    assert torch.frombuffer(bytearray(payload[:4]), dtype=torch.float32).item() == 42.0


def test_naive_encode_of_non_contiguous_is_correct() -> None:
    kv = make_kv(32)[:, :, 8:24]
    assert not kv.is_contiguous()
    payload = NaiveSerde().encode(kv)
    out = torch.empty(kv.shape, dtype=kv.dtype)
    NaiveSerde().decode_into(memoryview(bytes(payload)), out)
    assert torch.equal(out, kv)


def test_naive_decode_size_mismatch() -> None:
    kv = make_kv(16)
    payload = NaiveSerde().encode(kv)
    with pytest.raises(CorruptEntry):
        NaiveSerde().decode_into(memoryview(bytes(payload))[:-4], torch.empty_like(kv))


def test_dtype_names() -> None:
    assert dtype_from_name("fp16") is torch.float16
    assert dtype_from_name("torch.bfloat16") is torch.bfloat16
    assert dtype_from_name("half") is torch.float16
    assert dtype_name(torch.float8_e4m3fn) == "float8_e4m3fn"
    for bad in ("int64", "float13", "Tensor"):
        with pytest.raises(ValueError, match="unsupported KV dtype"):
            dtype_from_name(bad)
