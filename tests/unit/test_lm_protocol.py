"""The ``lm://`` wire format: every frame type round-trips; malformed frames are rejected with ProtocolError."""

from __future__ import annotations

import pytest

from kvpipe.errors import ProtocolError
from kvpipe.lm.protocol import (
    FRAME_SIZE,
    MAX_KEY_LEN,
    MAX_REPLY_PAYLOAD,
    MAX_SMALL_PAYLOAD,
    Frame,
    Op,
    Status,
    decode_entries,
    decode_keys,
    encode_entries,
    encode_keys,
    parse_metrics,
)


@pytest.mark.parametrize("op", list(Op))
@pytest.mark.parametrize("status", list(Status))
def test_every_frame_round_trips(op: Op, status: Status) -> None:
    f = Frame(op=op, request_id=2**63 + 5, key_len=17, payload_len=4 << 20, status=status, flags=3)
    b = f.to_bytes()
    assert len(b) == FRAME_SIZE
    assert Frame.from_bytes(b) == f


def test_bad_magic_version_op_checksum_and_short() -> None:
    good = bytearray(Frame(Op.GET, 1, 3).to_bytes())
    with pytest.raises(ProtocolError, match="magic"):
        Frame.from_bytes(b"XXXX" + good[4:])
    flipped = bytearray(good)
    flipped[10] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        Frame.from_bytes(flipped)
    with pytest.raises(ProtocolError, match="version"):
        Frame.from_bytes(Frame(Op.GET, 1, version=9).to_bytes())
    with pytest.raises(ProtocolError, match="truncated"):
        Frame.from_bytes(good[:10])
    bad_op = bytearray(good)
    bad_op[5] = 200  # unknown op, with a valid checksum
    import struct

    import xxhash
    bad_op[28:32] = struct.pack("<I", xxhash.xxh32_intdigest(bytes(bad_op[:28])))
    with pytest.raises(ProtocolError, match="unknown op"):
        Frame.from_bytes(bad_op)


def test_limits() -> None:
    Frame(Op.PUT, 1, 10, 1 << 30).check_limits(1 << 30)
    with pytest.raises(ProtocolError, match="exceeds"):
        Frame(Op.PUT, 1, 10, (1 << 30) + 1).check_limits(1 << 30)
    with pytest.raises(ProtocolError, match="key"):
        Frame(Op.GET, 1, MAX_KEY_LEN + 1).check_limits(1 << 30)
    with pytest.raises(ProtocolError, match="GET payload"):
        Frame(Op.GET, 1, 1, MAX_SMALL_PAYLOAD + 1).check_limits(1 << 40)


def test_reply_limits() -> None:
    """On the client: a GET reply carries an entry, as big as the caller allows (an 80 MiB chunk of a 70B model
    used to be refused as a "GET payload" over 64 MiB); other replies (LIST, STATS) are bounded, and so is the
    echo of a PUT."""
    Frame(Op.GET, 1, 0, 80 << 20).check_limits(1 << 62, reply=True)
    Frame(Op.LIST, 1, 0, MAX_SMALL_PAYLOAD + 1).check_limits(1 << 62, reply=True)  # many keys
    with pytest.raises(ProtocolError, match="LIST payload"):
        Frame(Op.LIST, 1, 0, MAX_REPLY_PAYLOAD + 1).check_limits(1 << 62, reply=True)
    with pytest.raises(ProtocolError, match="PUT payload"):
        Frame(Op.PUT, 1, 0, MAX_REPLY_PAYLOAD + 1).check_limits(1 << 62, reply=True)
    with pytest.raises(ProtocolError, match="GET payload"):
        Frame(Op.GET, 1, 0, 65).check_limits(64, reply=True)


def test_key_and_entry_lists_round_trip() -> None:
    keys = ["a", "vllm@m@1@0@" + "f" * 64 + "@float16", "ünï", ""]
    assert decode_keys(encode_keys(keys)) == keys
    assert decode_keys(encode_keys([])) == []
    entries = [("a", 0), ("b", 2**40)]
    assert decode_entries(encode_entries(entries)) == entries


@pytest.mark.parametrize(("blob", "why"), [
    (b"", "cut short after 0 keys (0 bytes)"),
    (b"\x01\x00\x00\x00", "cut short after 0 keys (4 bytes)"),
    (b"\x01\x00\x00\x00\x05\x00\x00\x00ab", "key list entry out of bounds"),
    (encode_keys(["a"]) + b"x", "trailing bytes after key list"),
    (b"\x01\x00\x00\x00\x02\x00\x00\x00\xff\xfe", "key 0 is not UTF-8"),
    (b"\x05\x00\x00\x00" + encode_keys(["a", "b"])[4:], "cut short after 2 keys (14 bytes)"),
])
def test_malformed_key_lists(blob: bytes, why: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_keys(blob)
    assert str(exc.value).endswith(why) and "\n" not in str(exc.value)


@pytest.mark.parametrize(("blob", "why"), [
    (b"", "cut short after 0 entries (0 bytes)"),
    (encode_entries([("a", 1)])[:-1], "entry list item out of bounds"),
    (encode_entries([("a", 1)]) + b"z", "trailing bytes after entry list"),
    (encode_entries([("a", 1), ("b", 2)])[:-13], "cut short after 1 entries (17 bytes)"),
])
def test_malformed_entry_lists(blob: bytes, why: str) -> None:
    with pytest.raises(ProtocolError) as exc:
        decode_entries(blob)
    assert str(exc.value).endswith(why)


def test_metrics_text() -> None:
    assert parse_metrics("# c\nkvpipe_server_hits 3\n\nx 1.5\n") == {"kvpipe_server_hits": 3.0, "x": 1.5}
    with pytest.raises(ProtocolError):
        parse_metrics("a b c")
    with pytest.raises(ProtocolError):
        parse_metrics("a b")
