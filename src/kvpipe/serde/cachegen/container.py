"""The CacheGen container: a versioned, explicit binary layout (no pickle) for one encoded KV chunk.

It is the *payload* of a kvpipe entry (the tier puts the 80-byte :class:`~kvpipe.serde.entry.EntryHeader` in
front of it); it carries its own magic, version, lengths and checksums so that it can be validated on its own.

Layout, little-endian (versions 1 and 2; the encoder writes version 2, both decode)::

    0   4s  magic b"KVCG"
    4   H   version (1 or 2)
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
    53  x
    54  h   scale exponent base ``e`` (version 2, lossy): scale code ``k`` means ``2 ** ((k + e) / 8)``; 0 in v1
    56  I   number of stored probability tables
    60  I   number of coded segments (one per layer and plane)
    64  Q   body length
    72  Q   xxh3_64 of the body
    80  I   xxh32 of bytes 0..80
    84      body

Body, lossy mode, version 2 (sizes all follow from the header)::

    u8   [L*S]              delta half-width per layer/plane (delta symbols in [-h, h], alphabet 2h+1)
    u8   [ceil(L*S*C / 8)]  reference per layer/plane/channel, one bit each (little bit order):
                            1 = group anchor (delta), 0 = mid-range
    u8   [L*S*C]            anchor scale code per layer/plane/channel (log domain, 1/8 octave steps)
    u8   [L*S*C]            residual step code per layer/plane/channel (same mapping)
    bf16 [L*S*C]            mid-range per layer/plane/channel
    u16  [2a+1 + sum of delta alphabets]  probability tables (frequencies): the anchor table, shared by every
                            segment, then the delta tables in table order
    u32  [segments]         coded words per segment
    u32  [...]              coded words, segment after segment

Version 1 differs only in its side information: one u8 per reference flag, bf16 anchor and residual scales, and
one anchor table per segment (tables stored in coding order). Version 2 cuts the side information from 7.4% to
3.8% of a SmolLM2 chunk; with the quantizer settings unchanged, the bench's 1536 positions went from 3.528x /
KL 0.00082 to 3.652x / KL 0.00077 (the encoder quantizes with the coded scale values, so coarser scales cost no
accuracy of their own).

Every section is padded with zero bytes to a multiple of 4 (the checksum covers the padding).

Body, lossless mode: the same without the half-widths and scales; tables are one per layer, plane and byte
plane, alphabet 256, stored in coding order.

Coding order, lossy: for each layer, plane: the anchor table (alphabet 2a+1, ``ceil(T/G) * C`` symbols), then
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
    "freq_offsets",
    "scale_values",
    "table_layout",
]

CONTAINER_MAGIC = b"KVCG"
CONTAINER_VERSION = 2
_VERSIONS = (1, 2)
MODE_LOSSY = 0
MODE_LOSSLESS = 1
CODER_CONSTRICTION = 1
CODER_NATIVE = 2
_HEAD = struct.Struct("<4sHBBBBH5IIIIIIBxhIIQQ")
_CRC = struct.Struct("<I")
CONTAINER_HEADER_SIZE = _HEAD.size + _CRC.size
assert CONTAINER_HEADER_SIZE == 84

# Bounds that keep a corrupt header from asking for absurd allocations before the body checksum is checked.
_MAX_DIM = 1 << 24
_MAX_ELEMENTS = 1 << 34
# Scale codes: 8 per octave; the base keeps every code's value a normal, finite float32.
SCALE_CODES_PER_OCTAVE = 8
SCALE_BASE_MIN = -126 * SCALE_CODES_PER_OCTAVE
SCALE_BASE_MAX = 127 * SCALE_CODES_PER_OCTAVE - 255


def scale_values(base: int) -> np.ndarray:
    """The float32 value of every scale code 0..255 for exponent base ``base`` (one table, so that encoder and
    decoder use bit-identical values)."""
    return np.exp2((np.arange(256, dtype=np.float64) + base) / SCALE_CODES_PER_OCTAVE).astype(np.float32)


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
    use_delta: np.ndarray = attrs.field(eq=False)  # u8 0/1 [L*S*C] (lossy; bit-packed on the wire in v2) or empty
    anchor_scale: np.ndarray = attrs.field(eq=False)  # v2: u8 codes, v1: u16 (bf16 bits) [L*S*C]; or empty
    delta_scale: np.ndarray = attrs.field(eq=False)  # likewise
    mid: np.ndarray = attrs.field(eq=False)  # u16 (bf16 bits) [L*S*C] or empty
    freqs: np.ndarray = attrs.field(eq=False)  # u16, stored tables (see freq_offsets)
    seg_words: np.ndarray = attrs.field(eq=False)  # u32 [segments]
    words: np.ndarray = attrs.field(eq=False)  # u32 [sum of seg_words]
    scale_base: int = 0  # v2 scale exponent base
    version: int = CONTAINER_VERSION

    @property
    def num_segments(self) -> int:
        """Coded segments: one per layer and plane."""
        return self.layers * self.planes

    def table_layout(self) -> tuple[np.ndarray, np.ndarray]:
        """``(alphabet sizes, symbol counts)`` per table, in table order (both int64)."""
        return table_layout(self.mode, self.layers, self.planes, self.tokens, self.channels, self.anchor_group,
                            self.table_group, self.anchor_half, self.half)

    def freq_offsets(self) -> np.ndarray:
        """Offset into :attr:`freqs` of every coding table's frequencies (int64, coding order)."""
        return freq_offsets(self.version, self.mode, self.table_layout()[0], self.num_segments)[0]

    def scales(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(anchor scale, residual step, mid-range)`` as float32 ``[L*S*C]`` arrays (lossy)."""
        mid = _bf16_to_f32(self.mid)
        if self.version == 1:
            return _bf16_to_f32(self.anchor_scale), _bf16_to_f32(self.delta_scale), mid
        table = scale_values(self.scale_base)
        return table[self.anchor_scale], table[self.delta_scale], mid

    def to_bytes(self) -> bytearray:
        """The wire form (header + body) as one new buffer.

        :raises ValueError: for a version this build does not write (only the current one is written).
        """
        if self.version != CONTAINER_VERSION:
            raise ValueError(f"cachegen writes container version {CONTAINER_VERSION}, not {self.version}")
        flags = np.packbits(self.use_delta.astype(bool), bitorder="little") if self.mode == MODE_LOSSY \
            else np.empty(0, np.uint8)
        sections = [self.half, flags, self.anchor_scale, self.delta_scale, self.mid, self.freqs,
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
                          self.table_group, self.anchor_half, self.scale_base, self.num_stored_tables(),
                          self.num_segments, body_len, xxhash.xxh3_64_intdigest(body))
        out[: _HEAD.size] = head
        out[_HEAD.size:CONTAINER_HEADER_SIZE] = _CRC.pack(xxhash.xxh32_intdigest(head))
        return out

    def num_stored_tables(self) -> int:
        """Probability tables stored in the body."""
        return freq_offsets(self.version, self.mode, self.table_layout()[0], self.num_segments)[2]

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
         tgroup, ahalf, sbase, ntables, nseg, body_len, body_sum) = _HEAD.unpack(head)
        if version not in _VERSIONS:
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
        if version == 1 or mode == MODE_LOSSLESS:
            sbase = 0  # v1 stores nothing there
        elif not SCALE_BASE_MIN <= sbase <= SCALE_BASE_MAX:
            raise CorruptEntry(f"bad cachegen scale exponent base {sbase}")
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
            if version == 1:
                use_delta = reader.take(np.uint8, lp * channels)
                if (use_delta > 1).any():
                    raise CorruptEntry("bad cachegen reference flags")
            else:
                packed = reader.take(np.uint8, -(-lp * channels // 8))
                use_delta = np.unpackbits(packed, count=lp * channels, bitorder="little")
            scale_type = np.uint16 if version == 1 else np.uint8
            ascale = reader.take(scale_type, lp * channels)
            dscale = reader.take(scale_type, lp * channels)
            mid = reader.take(np.uint16, lp * channels)
        else:
            half = use_delta = ascale = dscale = mid = np.empty(0, np.uint8)
        alphabets, _ = table_layout(mode, layers, planes, tokens, channels, group, tgroup, ahalf, half)
        _, nfreqs, nstored = freq_offsets(version, mode, alphabets, nseg)
        if nstored != ntables:
            raise CorruptEntry(f"cachegen table count {ntables}, layout needs {nstored}")
        freqs = reader.take(np.uint16, nfreqs)
        seg_words = reader.take(np.uint32, nseg)
        words = reader.take(np.uint32, int(seg_words.sum(dtype=np.int64)))
        if reader.pos != len(body):
            raise CorruptEntry(f"cachegen body has {len(body) - reader.pos} trailing bytes")
        return cls(mode=mode, coder=coder, dtype_code=dcode, shape=shape, layers=layers, planes=planes,
                   tokens=tokens, channels=channels, anchor_group=group, table_group=tgroup, anchor_half=ahalf,
                   half=half, use_delta=use_delta, anchor_scale=ascale, delta_scale=dscale, mid=mid, freqs=freqs,
                   seg_words=seg_words, words=words, scale_base=sbase, version=version)


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


def freq_offsets(version: int, mode: int, alphabets: np.ndarray, num_segments: int) -> tuple[np.ndarray, int, int]:
    """``(offset of every coding table's frequencies, stored frequency count, stored table count)``.

    Version 1 and lossless mode store one table per coding table, in coding order. Version 2 (lossy) stores the
    anchor table once (its 2a+1 entries first, shared by every segment's anchor symbols: a few hundred anchors
    per segment never paid for a table of their own), then the delta tables in coding order.
    """
    alph = np.asarray(alphabets, np.int64)
    if version == 1 or mode == MODE_LOSSLESS or len(alph) == 0:
        off = np.zeros(len(alph), np.int64)
        np.cumsum(alph[:-1], out=off[1:])
        return off, int(alph.sum()), len(alph)
    per = len(alph) // num_segments
    grid = alph.reshape(num_segments, per)
    anchor = int(grid[0, 0])
    delta = grid[:, 1:].reshape(-1)
    off = np.zeros((num_segments, per), np.int64)
    doff = np.zeros(len(delta), np.int64)
    np.cumsum(delta[:-1], out=doff[1:])
    off[:, 1:] = (anchor + doff).reshape(num_segments, per - 1)
    return off.reshape(-1), anchor + int(delta.sum()), 1 + len(delta)


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


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
