"""The CacheGen container: a versioned, explicit binary layout (no pickle) for one encoded KV chunk.

It is the *payload* of a kvpipe entry (the tier puts the 80-byte :class:`~kvpipe.serde.entry.EntryHeader` in
front of it); it carries its own magic, version, lengths and checksums so that it can be validated on its own.

Layout, little-endian, version 1::

    0   4s  magic b"KVCG"
    4   H   version (1)
    6   B   mode: 0 = lossy (anchor/delta quantization), 1 = lossless (byte planes)
    7   B   coder: 1 = constriction ANS (32-bit words), 2 = kvpipe native rANS (32-bit words)
    8   B   dtype code (:data:`kvpipe.serde.entry.DTYPE_CODES`)
    9   B   ndim of the original tensor (4 for MLA, 5 otherwise)
    10  H   anchor group (tokens per anchor; lossy)
    12  5I  original shape (unused dims 0)
    32  I   L   layers
    36  I   S   planes per layer (2 = K and V, 1 = MLA latent)
    40  I   T   tokens
    44  I   C   channels per token (heads * head_dim, or the MLA latent dim)
    48  I   table group: channels per delta probability table (lossy) / bytes per element (lossless)
    52  B   anchor half-width (anchor symbols in [-a, a])
    53  3x
    56  I   number of probability tables
    60  I   number of coded segments (one per layer and plane)
    64  Q   body length
    72  Q   xxh3_64 of the body
    80  I   xxh32 of bytes 0..80
    84      body

Body, lossy mode (sizes all follow from the header)::

    u8   [L*S]              delta half-width per layer/plane (delta symbols in [-h, h], alphabet 2h+1)
    u8   [L*S*C]            reference per layer/plane/channel: 1 = group anchor (delta), 0 = mid-range
    bf16 [L*S*C]            anchor scale per layer/plane/channel
    bf16 [L*S*C]            residual scale per layer/plane/channel
    bf16 [L*S*C]            mid-range per layer/plane/channel
    u16  [sum of alphabets] probability tables (frequencies), in table order
    u32  [segments]         coded words per segment
    u32  [...]              coded words, segment after segment

Every section is padded with zero bytes to a multiple of 4 (the checksum covers the padding).

Body, lossless mode: the same without the half-widths and scales; tables are one per layer, plane and byte
plane, alphabet 256.

Table order, lossy: for each layer, plane: the anchor table (alphabet 2a+1, ``ceil(T/G) * C`` symbols), then
one delta table per channel group (alphabet 2h+1, ``T * group`` symbols). Lossless: for each layer, plane,
byte plane: one table (``T * C`` symbols). Segment ``(l, s)`` holds its tables' symbols in that order.
"""

from __future__ import annotations

import struct

import attrs
import numpy as np
import xxhash

from kvpipe.errors import CorruptEntry

__all__ = [
    "CODER_CONSTRICTION",
    "CODER_NATIVE",
    "CONTAINER_HEADER_SIZE",
    "CONTAINER_MAGIC",
    "MODE_LOSSLESS",
    "MODE_LOSSY",
    "Container",
]

CONTAINER_MAGIC = b"KVCG"
CONTAINER_VERSION = 1
MODE_LOSSY = 0
MODE_LOSSLESS = 1
CODER_CONSTRICTION = 1
CODER_NATIVE = 2
_HEAD = struct.Struct("<4sHBBBBH5IIIIIIB3xIIQQ")
_CRC = struct.Struct("<I")
CONTAINER_HEADER_SIZE = _HEAD.size + _CRC.size
assert CONTAINER_HEADER_SIZE == 84

# Bounds that keep a corrupt header from asking for absurd allocations before the body checksum is checked.
_MAX_DIM = 1 << 24
_MAX_ELEMENTS = 1 << 34


@attrs.frozen
class Container:
    """One decoded container: header fields and zero-copy numpy views of the body's sections."""

    mode: int
    coder: int
    dtype_code: int
    shape: tuple[int, ...]
    layers: int
    planes: int
    tokens: int
    channels: int
    anchor_group: int
    table_group: int
    anchor_half: int
    half: np.ndarray = attrs.field(eq=False)  # u8 [L*S] (lossy) or empty
    use_delta: np.ndarray = attrs.field(eq=False)  # u8 [L*S*C] (lossy) or empty
    anchor_scale: np.ndarray = attrs.field(eq=False)  # u16 (bf16 bits) [L*S*C] or empty
    delta_scale: np.ndarray = attrs.field(eq=False)  # u16 (bf16 bits) [L*S*C] or empty
    mid: np.ndarray = attrs.field(eq=False)  # u16 (bf16 bits) [L*S*C] or empty
    freqs: np.ndarray = attrs.field(eq=False)  # u16 [sum of alphabets]
    seg_words: np.ndarray = attrs.field(eq=False)  # u32 [segments]
    words: np.ndarray = attrs.field(eq=False)  # u32 [sum of seg_words]

    @property
    def num_segments(self) -> int:
        """Coded segments: one per layer and plane."""
        return self.layers * self.planes

    def table_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(alphabet sizes, symbol counts)`` per table, in table order (both int64)."""
        return table_layout(self.mode, self.layers, self.planes, self.tokens, self.channels, self.anchor_group,
                            self.table_group, self.anchor_half, self.half)

    def to_bytes(self) -> bytearray:
        """The wire form (header + body) as one new buffer."""
        sections = [self.half, self.use_delta, self.anchor_scale, self.delta_scale, self.mid, self.freqs,
                    self.seg_words, self.words]
        body_len = sum(_padded(int(s.nbytes)) for s in sections)
        out = bytearray(CONTAINER_HEADER_SIZE + body_len)
        pos = CONTAINER_HEADER_SIZE
        for s in sections:
            n = int(s.nbytes)
            if n:
                out[pos:pos + n] = np.ascontiguousarray(s).view(np.uint8).reshape(-1).data
            pos += _padded(n)
        body = memoryview(out)[CONTAINER_HEADER_SIZE:]
        shape = list(self.shape) + [0] * (5 - len(self.shape))
        head = _HEAD.pack(CONTAINER_MAGIC, CONTAINER_VERSION, self.mode, self.coder, self.dtype_code, len(self.shape),
                          self.anchor_group, *shape, self.layers, self.planes, self.tokens, self.channels,
                          self.table_group, self.anchor_half, len(self.freqs_sizes()), self.num_segments,
                          body_len, xxhash.xxh3_64_intdigest(body))
        out[: _HEAD.size] = head
        out[_HEAD.size:CONTAINER_HEADER_SIZE] = _CRC.pack(xxhash.xxh32_intdigest(head))
        return out

    def freqs_sizes(self) -> np.ndarray:
        """Alphabet size of each table."""
        return self.table_layout()[0]

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Container:
        """Parse and validate a container; the sections are views into ``data`` (no copy).

        :raises CorruptEntry: on a short buffer, bad magic/version/checksums, impossible header values, or section
            lengths that do not add up.
        """
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        if len(mv) < CONTAINER_HEADER_SIZE:
            raise CorruptEntry(f"cachegen container truncated: {len(mv)} of {CONTAINER_HEADER_SIZE} header bytes")
        head = bytes(mv[: _HEAD.size])
        (crc,) = _CRC.unpack_from(mv, _HEAD.size)
        if head[:4] != CONTAINER_MAGIC:
            raise CorruptEntry(f"bad cachegen magic {head[:4]!r}")
        if xxhash.xxh32_intdigest(head) != crc:
            raise CorruptEntry("cachegen container header checksum mismatch")
        (_, version, mode, coder, dcode, ndim, group, s0, s1, s2, s3, s4, layers, planes, tokens, channels,
         tgroup, ahalf, ntables, nseg, body_len, body_sum) = _HEAD.unpack(head)
        if version != CONTAINER_VERSION:
            raise CorruptEntry(f"unsupported cachegen container version {version}")
        if mode not in (MODE_LOSSY, MODE_LOSSLESS) or coder not in (CODER_CONSTRICTION, CODER_NATIVE):
            raise CorruptEntry(f"bad cachegen mode {mode} or coder {coder}")
        if ndim not in (4, 5):
            raise CorruptEntry(f"bad cachegen ndim {ndim}")
        shape = (s0, s1, s2, s3, s4)[:ndim]
        dims = (layers, planes, tokens, channels)
        if any(not 0 < d < _MAX_DIM for d in (*shape, *dims)) or planes not in (1, 2):
            raise CorruptEntry(f"bad cachegen dims shape={shape} L,S,T,C={dims}")
        if layers * planes * tokens * channels != int(np.prod(shape, dtype=np.int64)) or \
                layers * planes * tokens * channels > _MAX_ELEMENTS:
            raise CorruptEntry(f"cachegen dims {dims} do not match shape {shape}")
        if mode == MODE_LOSSY and (not 0 < group < _MAX_DIM or not 0 < tgroup <= channels
                                   or channels % tgroup or not 0 < ahalf < 128):
            raise CorruptEntry(f"bad cachegen anchor group {group}, table group {tgroup} or anchor half {ahalf}")
        if mode == MODE_LOSSLESS and tgroup not in (1, 2, 4, 8):
            raise CorruptEntry(f"bad cachegen element size {tgroup}")
        if nseg != layers * planes:
            raise CorruptEntry(f"cachegen segment count {nseg} does not match {layers}x{planes}")
        body = mv[CONTAINER_HEADER_SIZE:]
        if len(body) != body_len:
            raise CorruptEntry(f"cachegen body is {len(body)} bytes, header says {body_len}")
        if xxhash.xxh3_64_intdigest(body) != body_sum:
            raise CorruptEntry("cachegen body checksum mismatch")
        reader = _Reader(body)
        lp = layers * planes
        if mode == MODE_LOSSY:
            half = reader.take(np.uint8, lp)
            if (half == 0).any() or (half > 127).any():
                raise CorruptEntry("bad cachegen delta half-width")
            use_delta = reader.take(np.uint8, lp * channels)
            if (use_delta > 1).any():
                raise CorruptEntry("bad cachegen reference flags")
            ascale = reader.take(np.uint16, lp * channels)
            dscale = reader.take(np.uint16, lp * channels)
            mid = reader.take(np.uint16, lp * channels)
        else:
            half = use_delta = ascale = dscale = mid = np.empty(0, np.uint8)
        alphabets, _ = table_layout(mode, layers, planes, tokens, channels, group, tgroup, ahalf, half)
        if len(alphabets) != ntables:
            raise CorruptEntry(f"cachegen table count {ntables}, layout needs {len(alphabets)}")
        freqs = reader.take(np.uint16, int(alphabets.sum()))
        seg_words = reader.take(np.uint32, nseg)
        words = reader.take(np.uint32, int(seg_words.sum(dtype=np.int64)))
        if reader.pos != len(body):
            raise CorruptEntry(f"cachegen body has {len(body) - reader.pos} trailing bytes")
        return cls(mode=mode, coder=coder, dtype_code=dcode, shape=shape, layers=layers, planes=planes,
                   tokens=tokens, channels=channels, anchor_group=group, table_group=tgroup, anchor_half=ahalf,
                   half=half, use_delta=use_delta, anchor_scale=ascale, delta_scale=dscale, mid=mid, freqs=freqs,
                   seg_words=seg_words, words=words)


def table_layout(mode: int, layers: int, planes: int, tokens: int, channels: int, anchor_group: int,
                 table_group: int, anchor_half: int, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Alphabet size and symbol count of every probability table, in table (and coding) order."""
    lp = layers * planes
    if mode == MODE_LOSSLESS:
        n = lp * table_group
        return np.full(n, 256, np.int64), np.full(n, tokens * channels, np.int64)
    ngroups = channels // table_group
    per = 1 + ngroups
    alph = np.empty((lp, per), np.int64)
    count = np.empty((lp, per), np.int64)
    alph[:, 0] = 2 * anchor_half + 1
    alph[:, 1:] = (2 * half.astype(np.int64) + 1)[:, None]
    count[:, 0] = -(-tokens // anchor_group) * channels
    count[:, 1:] = tokens * table_group
    return alph.reshape(-1), count.reshape(-1)


class _Reader:
    """Sequential typed views over a body, with bounds checks."""

    def __init__(self, body: memoryview) -> None:
        self.body = body
        self.pos = 0

    def take(self, dtype: type[np.generic], count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        if count < 0 or self.pos + size > len(self.body):
            raise CorruptEntry(f"cachegen body truncated: section of {size} bytes at {self.pos} of "
                               f"{len(self.body)}")
        arr = np.frombuffer(self.body, dtype=dtype, count=count, offset=self.pos)
        self.pos += _padded(size)
        if self.pos > len(self.body):
            raise CorruptEntry("cachegen body truncated in section padding")
        return arr


def _padded(n: int) -> int:
    return (n + 3) & ~3
