"""The self-describing entry every tier stores: a fixed 80-byte header followed by the serde's payload.

Header layout (little-endian, version 1)::

    0   4s  magic  b"KVPE"
    4   H   version
    6   H   header size (80)
    8   8s  serde name, NUL-padded ascii
    16  B   dtype code          17  B  ndim         18  H  flags
    20  5I  shape (unused dims 0)
    40  I   num_tokens
    44  Q   payload length
    52  Q   xxh3_64 of the payload
    60  Q   xxh3_64 of the key string (a foreign entry under another key is detected)
    68  8x  reserved
    76  I   xxh32 of bytes 0..76 (the header itself)

Decoding checks every field; whatever fails is :class:`CorruptEntry`, which the tier turns into a miss and a
delete. No pickle, ever.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Protocol

import attrs
import torch
import xxhash

from kvpipe.errors import CorruptEntry
from kvpipe.keys import ChunkKey
from kvpipe.native import checksum as _checksum

__all__ = [
    "DTYPE_CODES",
    "HEADER_SIZE",
    "MAGIC",
    "Described",
    "EntryHeader",
    "dtype_from_name",
    "dtype_name",
    "key_fingerprint",
    "payload_checksum",
    "payload_digest",
]

MAGIC = b"KVPE"
VERSION = 1
HEADER_SIZE = 80
_BODY = struct.Struct("<4sHH8sBBH5IIQQQ8x")
_CRC = struct.Struct("<I")
assert _BODY.size + _CRC.size == HEADER_SIZE  # layout invariant, checked at import

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float16: 1,
    torch.bfloat16: 2,
    torch.float32: 3,
    torch.float64: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.float8_e4m3fn: 7,
    torch.float8_e5m2: 8,
}
_CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` → ``"float16"`` (the form used in keys and configs)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"``/``"fp16"``/``"half"``/``"torch.float16"`` → ``torch.float16``.

    :raises ValueError: for a name that is not a supported KV dtype.
    """
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32",
               "fp8": "float8_e4m3fn", "fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
    n = name.removeprefix("torch.")
    n = aliases.get(n, n)
    dtype = getattr(torch, n, None)
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported KV dtype {name!r}: expected one of "
                         + ", ".join(dtype_name(d) for d in DTYPE_CODES))
    return dtype


def payload_checksum(payload: object) -> int:
    """xxh3_64 of a bytes-like payload (a buffer; not copied), computed without holding the GIL where the native
    hasher is built (:mod:`kvpipe.native.checksum`)."""
    return _checksum.xxh3_64(payload)


def payload_digest() -> xxhash.xxh3_64:
    """A streaming hasher whose ``intdigest()`` equals :func:`payload_checksum` of everything fed to it: connectors
    hash a payload while it is received and hand the result to the tier."""
    return xxhash.xxh3_64()


def key_fingerprint(key: ChunkKey | str) -> int:
    """xxh3_64 of the key's string form."""
    return xxhash.xxh3_64_intdigest(str(key).encode())


class Described(Protocol):
    """What a header needs of the KV it describes (a tensor or a :class:`~kvpipe.memory.pool.MemoryObj`)."""

    @property
    def shape(self) -> Sequence[int]: ...

    @property
    def dtype(self) -> torch.dtype: ...


@attrs.frozen
class EntryHeader:
    """The fixed header of one stored entry."""

    serde: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    num_tokens: int
    payload_len: int
    checksum: int
    key_fp: int
    flags: int = 0
    version: int = VERSION

    @classmethod
    def for_payload(cls, key: ChunkKey | str, serde: str, kv: Described, num_tokens: int,
                    payload: object, payload_len: int, flags: int = 0, checksum: int | None = None
                    ) -> EntryHeader:
        """The header describing ``payload`` (the encoding of ``kv``: a tensor, or a pool region, whose shape and
        dtype are known without a torch call) stored under ``key``; ``checksum``: the
        payload's, when the caller computed it already (``payload`` is then not read)."""
        return cls(serde=serde, dtype=kv.dtype, shape=tuple(kv.shape), num_tokens=num_tokens,
                   payload_len=payload_len, checksum=payload_checksum(payload) if checksum is None else checksum,
                   key_fp=key_fingerprint(key), flags=flags)

    @property
    def tensor_nbytes(self) -> int:
        """Bytes of the decoded tensor."""
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def to_bytes(self) -> bytes:
        """The 80-byte wire/disk form."""
        shape = list(self.shape) + [0] * (5 - len(self.shape))
        body = _BODY.pack(MAGIC, self.version, HEADER_SIZE, self.serde.encode("ascii"), DTYPE_CODES[self.dtype],
                          len(self.shape), self.flags, *shape, self.num_tokens, self.payload_len, self.checksum,
                          self.key_fp)
        return body + _CRC.pack(xxhash.xxh32_intdigest(body))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> EntryHeader:
        """Parse and validate a header (not the payload).

        :raises CorruptEntry: on a short buffer, bad magic, unknown version, header checksum mismatch or
            impossible field values.
        """
        if len(data) < HEADER_SIZE:
            raise CorruptEntry(f"entry header truncated: {len(data)} of {HEADER_SIZE} bytes")
        body = bytes(data[: _BODY.size])
        (crc,) = _CRC.unpack_from(data, _BODY.size)
        if body[:4] != MAGIC:
            raise CorruptEntry(f"bad entry magic {body[:4]!r}")
        if xxhash.xxh32_intdigest(body) != crc:
            raise CorruptEntry("entry header checksum mismatch")
        (_, version, hsize, serde, dcode, ndim, flags, s0, s1, s2, s3, s4, ntok, plen, csum,
         kfp) = _BODY.unpack(body)
        if version != VERSION or hsize != HEADER_SIZE:
            raise CorruptEntry(f"unsupported entry version {version} (header size {hsize})")
        dtype = _CODE_DTYPES.get(dcode)
        if dtype is None or not 1 <= ndim <= 5:
            raise CorruptEntry(f"bad entry dtype code {dcode} or ndim {ndim}")
        shape = (s0, s1, s2, s3, s4)[:ndim]
        if min(shape) <= 0:
            raise CorruptEntry(f"bad entry shape {shape}")
        try:
            serde_name = serde.rstrip(b"\0").decode("ascii")
        except UnicodeDecodeError:
            raise CorruptEntry("bad entry serde name") from None
        return cls(serde=serde_name, dtype=dtype, shape=shape, num_tokens=ntok, payload_len=plen, checksum=csum,
                   key_fp=kfp, flags=flags, version=version)

    def check_key(self, key: ChunkKey | str) -> None:
        """:raises CorruptEntry: when this entry was written under another key (a foreign entry)."""
        if self.key_fp != key_fingerprint(key):
            raise CorruptEntry(f"entry belongs to another key than {key}")

    def check_payload(self, payload: object, length: int, checksum: int | None = None) -> None:
        """``checksum``: the payload's checksum when the caller computed it already (while receiving it).

        :raises CorruptEntry: when the payload is truncated, too long, or fails its checksum."""
        if length != self.payload_len:
            raise CorruptEntry(f"entry payload is {length} bytes, header says {self.payload_len}")
        if (payload_checksum(payload) if checksum is None else checksum) != self.checksum:
            raise CorruptEntry("entry payload checksum mismatch")
