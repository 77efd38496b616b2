"""The ``lm://`` wire protocol, shared by :mod:`kvpipe.lm.server` and :mod:`kvpipe.connectors.lm`.

Every message, request or reply, is one frame: a fixed 32-byte header, the key, then the payload::

    0   4s  magic  b"KVLM"
    4   B   protocol version (1)
    5   B   op
    6   B   status (0 in requests)
    7   B   flags (0)
    8   Q   request id (echoed in the reply)
    16  I   key length (bytes, UTF-8)
    20  Q   payload length
    28  I   xxh32 of bytes 0..28 (a torn or misaligned header is detected at once)

Ops: ``PING``, ``AUTH`` (key = shared token), ``PUT`` (payload = the entry: 80-byte entry header + data),
``GET`` (reply payload = the entry), ``EXISTS`` and ``DELETE`` (status says), ``LIST`` (key = glob; reply payload
= :func:`encode_entries`), ``STATS`` (reply payload = Prometheus-style text), and the batch variants
``EXISTS_BATCH`` / ``DELETE_BATCH`` (payload = :func:`encode_keys`; reply payload = one byte per key). ``PUT`` and
``GET`` batch by pipelining: a client writes N frames, then reads N replies, in order, on one connection.

A server answers a request it cannot parse by closing that connection (never by crashing): a frame with bad magic,
an unknown version or op, an oversized key or payload, or any op before ``AUTH`` when a token is set. A message
that starts as Redis's protocol does (``*``: a ``redis://`` URL pointed at this server) is answered first with
:data:`RESP_REFUSAL`, a RESP error line, so a Redis client fails at once with a message saying why.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence

import attrs
import xxhash

from kvpipe.errors import ProtocolError

__all__ = [
    "FRAME_SIZE",
    "MAGIC",
    "MAX_KEY_LEN",
    "MAX_REPLY_PAYLOAD",
    "MAX_SMALL_PAYLOAD",
    "RESP_REFUSAL",
    "VERSION",
    "Frame",
    "Op",
    "Status",
    "decode_entries",
    "decode_keys",
    "encode_entries",
    "encode_frame",
    "encode_keys",
    "parse_metrics",
]

MAGIC = b"KVLM"
# What the server answers a Redis client (RESP), and what the lm:// client recognises as "not Redis" when it probes.
RESP_REFUSAL = b"-ERR this is a kvpipe lm:// server, not Redis: use an lm:// URL for it\r\n"
VERSION = 1
_BODY = struct.Struct("<4sBBBBQIQ")
_CRC = struct.Struct("<I")
_WIRE = struct.Struct("<4sBBBBQIQI")  # _BODY then _CRC
FRAME_SIZE = _BODY.size + _CRC.size
MAX_KEY_LEN = 4096
# Payload bound for every request but PUT (whose bound is the server's --max-frame): key lists, globs, tokens.
MAX_SMALL_PAYLOAD = 64 << 20
# Payload bound for every reply but GET's (an entry, received into pool memory or skipped, never allocated whole):
# a LIST of many keys, STATS text.
MAX_REPLY_PAYLOAD = 1 << 30
_U32 = struct.Struct("<I")
_U32U64 = struct.Struct("<IQ")


class Op(enum.IntEnum):
    """Frame operations."""

    PING = 1
    AUTH = 2
    PUT = 3
    GET = 4
    EXISTS = 5
    DELETE = 6
    LIST = 7
    STATS = 8
    EXISTS_BATCH = 9
    DELETE_BATCH = 10


class Status(enum.IntEnum):
    """Reply status codes."""

    OK = 0
    NOT_FOUND = 1
    ERROR = 2
    UNAUTHORIZED = 3
    BAD_REQUEST = 4
    TOO_LARGE = 5
    NO_SPACE = 6


_OPS = {int(o): o for o in Op}
_STATUSES = {int(s): s for s in Status}


def encode_frame(op: Op, request_id: int, key_len: int = 0, payload_len: int = 0, status: Status = Status.OK,
                 flags: int = 0) -> bytes:
    """The 32-byte wire form of a frame header (:meth:`Frame.to_bytes` without building a :class:`Frame`: the
    request and reply paths call this once per message)."""
    return _pack(VERSION, op, status, flags, request_id, key_len, payload_len)


def _pack(version: int, op: int, status: int, flags: int, request_id: int, key_len: int, payload_len: int) -> bytes:
    body = _BODY.pack(MAGIC, version, op, status, flags, request_id, key_len, payload_len)
    return body + _CRC.pack(xxhash.xxh32_intdigest(body))


@attrs.frozen
class Frame:
    """A frame header (the key and payload follow it on the wire)."""

    op: Op
    request_id: int
    key_len: int = 0
    payload_len: int = 0
    status: Status = Status.OK
    flags: int = 0
    version: int = VERSION

    def to_bytes(self) -> bytes:
        """The 32-byte wire form."""
        return _pack(self.version, self.op, self.status, self.flags, self.request_id, self.key_len, self.payload_len)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Frame:
        """Parse and check a frame header.

        :raises ProtocolError: on a short buffer, bad magic or checksum, unknown version, op or status.
        """
        if len(data) < FRAME_SIZE:
            raise ProtocolError(f"frame header truncated: {len(data)} of {FRAME_SIZE} bytes")
        magic, version, op, status, flags, rid, klen, plen, crc = _WIRE.unpack_from(data)
        if magic != MAGIC:
            raise ProtocolError(f"bad frame magic {magic!r}")
        if xxhash.xxh32_intdigest(memoryview(data)[: _BODY.size]) != crc:
            raise ProtocolError("frame header checksum mismatch")
        if version != VERSION:
            raise ProtocolError(f"unsupported protocol version {version} (this side speaks {VERSION})")
        op_e, status_e = _OPS.get(op), _STATUSES.get(status)
        if op_e is None or status_e is None:
            raise ProtocolError(f"unknown op {op} or status {status}")
        return cls(op=op_e, request_id=rid, key_len=klen, payload_len=plen, status=status_e, flags=flags,
                   version=version)

    def check_limits(self, max_payload: int, *, reply: bool = False) -> None:
        """Check a request (on the server) or a ``reply`` (on the client): ``max_payload`` bounds what carries an
        entry (a PUT request, a GET reply), :data:`MAX_SMALL_PAYLOAD` other requests, :data:`MAX_REPLY_PAYLOAD`
        other replies. (GET replies used to get the small bound: an entry over 64 MiB, one 256-token chunk of a
        70B model, was stored and then never read, each GET taking the tier down.)

        :raises ProtocolError: when the key or payload is larger than that."""
        if self.key_len > MAX_KEY_LEN:
            raise ProtocolError(f"key of {self.key_len} bytes exceeds {MAX_KEY_LEN}")
        if self.op == (Op.GET if reply else Op.PUT):
            limit = max_payload
        else:
            limit = MAX_REPLY_PAYLOAD if reply else MAX_SMALL_PAYLOAD
        if self.payload_len > limit:
            raise ProtocolError(f"{self.op.name} payload of {self.payload_len} bytes exceeds {limit}")


def encode_keys(keys: Sequence[str]) -> bytes:
    """A key list: ``u32 count`` then ``u32 length + UTF-8`` per key."""
    parts = [_U32.pack(len(keys))]
    for k in keys:
        b = k.encode()
        parts.append(_U32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def decode_keys(data: bytes | memoryview) -> list[str]:
    """Inverse of :func:`encode_keys`. :raises ProtocolError: when malformed."""
    out: list[str] = []
    try:
        (n,) = _U32.unpack_from(data, 0)
        pos = 4
        for _ in range(n):
            (ln,) = _U32.unpack_from(data, pos)
            pos += 4
            if ln > MAX_KEY_LEN or pos + ln > len(data):
                raise ProtocolError("key list entry out of bounds")
            out.append(bytes(data[pos : pos + ln]).decode())
            pos += ln
    except struct.error:
        raise ProtocolError(f"malformed key list: cut short after {len(out)} keys ({len(data)} bytes)") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"malformed key list: key {len(out)} is not UTF-8") from None
    if pos != len(data):
        raise ProtocolError("trailing bytes after key list")
    return out


def encode_entries(entries: Sequence[tuple[str, int]]) -> bytes:
    """A ``(key, size)`` list (the ``LIST`` reply): ``u32 count`` then ``u32 key length, u64 size, key``."""
    parts = [_U32.pack(len(entries))]
    for k, size in entries:
        b = k.encode()
        parts.append(_U32U64.pack(len(b), size))
        parts.append(b)
    return b"".join(parts)


def decode_entries(data: bytes | memoryview) -> list[tuple[str, int]]:
    """Inverse of :func:`encode_entries`. :raises ProtocolError: when malformed."""
    out: list[tuple[str, int]] = []
    try:
        (n,) = _U32.unpack_from(data, 0)
        pos = 4
        for _ in range(n):
            ln, size = _U32U64.unpack_from(data, pos)
            pos += _U32U64.size
            if ln > MAX_KEY_LEN or pos + ln > len(data):
                raise ProtocolError("entry list item out of bounds")
            out.append((bytes(data[pos : pos + ln]).decode(), size))
            pos += ln
    except struct.error:
        raise ProtocolError(f"malformed entry list: cut short after {len(out)} entries ({len(data)} bytes)") from None
    except UnicodeDecodeError:
        raise ProtocolError(f"malformed entry list: key {len(out)} is not UTF-8") from None
    if pos != len(data):
        raise ProtocolError("trailing bytes after entry list")
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """The ``STATS`` reply (``name value`` lines, ``#`` comments) as a mapping.

    :raises ProtocolError: on a line that is not ``name value``.
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ProtocolError(f"bad metrics line {line!r}")
        try:
            out[parts[0]] = float(parts[1])
        except ValueError:
            raise ProtocolError(f"bad metrics value in {line!r}") from None
    return out
