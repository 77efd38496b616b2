"""The native rANS coder (container coder id 2): ``rans.cpp`` built once with the system C++ compiler, called
through ctypes (which releases the GIL), segments coded in parallel with OpenMP.

constriction decodes ~30-50 M symbols/s on one core and holds the GIL; this coder's 4-state interleaved decoder
with a 4096-slot lookup table is several times faster and uses both cores. Built on first use by
:func:`kvpipe.native.load_library` (into ``$KVPIPE_CACHE_DIR/native``, keyed by the source's hash); without a
compiler :func:`available` is ``False`` and the serde keeps using constriction.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import CorruptEntry
from kvpipe.native import load_library

__all__ = ["available", "decode", "encode"]

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("rans.cpp")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _build() -> ctypes.CDLL | None:
    lib = load_library(_SRC, "kvpipe_rans", (["-fopenmp"], []))
    if lib is None:
        logger.info("native cachegen coder not built: cachegen uses the constriction coder")
        return None
    lib.kvpipe_rans_encode.restype = _I64
    lib.kvpipe_rans_encode.argtypes = [_P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.kvpipe_rans_decode.restype = _I64
    lib.kvpipe_rans_decode.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _P, _P, _P, ctypes.c_int]
    lib.kvpipe_cg_decode_lossy.restype = _I64
    lib.kvpipe_cg_decode_lossy.argtypes = [_P, _P, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64,
                                           _P, _P, _P, _P, _P, _P, ctypes.c_int, ctypes.c_int]
    return lib


def _get() -> ctypes.CDLL | None:
    global _lib, _tried
    with _lock:
        if not _tried:
            _tried = True
            try:
                _lib = _build()
            except OSError as e:
                logger.warning("native cachegen coder unavailable (%s); using constriction", e)
                _lib = None
        return _lib


def available() -> bool:
    """Whether the native coder is built and loadable here (builds it on the first call)."""
    return _get() is not None


def _threads() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def _ptr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def _offsets(sizes: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(sizes, dtype=np.int64))).astype(np.int64)


def encode(sym: np.ndarray, alphabets: np.ndarray, counts: np.ndarray, freqs: np.ndarray, freq_off: np.ndarray,
           num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Code int32 ``sym`` (table order) into ``(words per segment u32, words u32)``; table ``t``'s frequencies
    start at ``freqs[freq_off[t]]``.

    :raises ValueError: when a symbol is outside its table (a caller bug).
    """
    lib = _get()
    if lib is None:
        raise RuntimeError("native cachegen coder not available")
    sym = np.ascontiguousarray(sym, np.int32)
    alph = np.ascontiguousarray(alphabets, np.int64)
    cnt = np.ascontiguousarray(counts, np.int64)
    freqs = np.ascontiguousarray(freqs, np.uint16)
    sym_off = _offsets(cnt)[:-1].copy()
    freq_off = np.ascontiguousarray(freq_off, np.int64)
    rec_cap = (cnt + 8) // 2 + 8  # ≤ one 16-bit word per symbol, + 4 states, + the length word
    rec_off_all = _offsets(rec_cap)
    out = np.empty(int(rec_off_all[-1]), np.uint32)
    rec_len = np.zeros(len(cnt), np.int64)
    rc = lib.kvpipe_rans_encode(_ptr(sym), len(cnt), _ptr(alph), _ptr(sym_off), _ptr(cnt), _ptr(freqs),
                                _ptr(freq_off), _ptr(out), _ptr(rec_off_all), _ptr(rec_cap), _ptr(rec_len),
                                _threads())
    if rc != 0:
        raise ValueError(f"native rANS encode failed at table {-rc - 1}")
    # Compact the records (table after table) into one stream per segment.
    words = np.concatenate([out[o:o + n] for o, n in zip(rec_off_all[:-1].tolist(), rec_len.tolist(),
                                                         strict=True)])
    per = len(cnt) // num_segments
    seg_words = rec_len.reshape(num_segments, per).sum(axis=1).astype(np.uint32)
    return seg_words, words


def decode(seg_words: np.ndarray, words: np.ndarray, alphabets: np.ndarray, counts: np.ndarray,
           freqs: np.ndarray, freq_off: np.ndarray, out: np.ndarray) -> None:
    """Decode every segment into ``out`` (uint8, table order, preallocated).

    :raises CorruptEntry: when a stream is inconsistent with its tables.
    """
    lib = _get()
    if lib is None:
        raise CorruptEntry("cachegen entry uses the native coder, which is not available here")
    if out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError("native decode writes a contiguous uint8 array")
    words = np.ascontiguousarray(words, np.uint32)
    alph = np.ascontiguousarray(alphabets, np.int64)
    cnt = np.ascontiguousarray(counts, np.int64)
    freqs = np.ascontiguousarray(freqs, np.uint16)
    if len(words) == 0:
        words = np.zeros(1, np.uint32)  # a valid pointer; segment offsets still bound every read
    # Every array passed by address is held in a local until the call returns (a temporary would be freed).
    seg_off = _offsets(np.asarray(seg_words, np.int64))
    sym_off = _offsets(cnt)[:-1].copy()
    freq_off = np.ascontiguousarray(freq_off, np.int64)
    nseg = len(seg_words)
    rc = lib.kvpipe_rans_decode(_ptr(words), _ptr(seg_off), nseg, len(cnt) // nseg, _ptr(alph), _ptr(sym_off),
                                _ptr(cnt), _ptr(freqs), _ptr(freq_off), _ptr(out), _threads())
    if rc != 0:
        raise CorruptEntry(f"cachegen native stream of segment {-rc - 1} does not decode")


_OUT_DTYPES = {"float16": 1, "bfloat16": 2, "float32": 3}


def decode_lossy_into(cont: Any, alphabets: np.ndarray, counts: np.ndarray, freq_off: np.ndarray,
                      ascale: np.ndarray, dscale: np.ndarray, mid: np.ndarray, out_ptr: int, out_dtype: str) -> None:
    """Fused entropy decode + dequantization of a lossy native container into a contiguous CPU tensor's memory
    (``[L, S, T, C]``, ``out_dtype`` one of float16/bfloat16/float32); scales and mid-ranges as fp32 arrays.

    :raises CorruptEntry: when a stream is inconsistent with its tables.
    """
    lib = _get()
    if lib is None:
        raise CorruptEntry("cachegen entry uses the native coder, which is not available here")
    words = np.ascontiguousarray(cont.words, np.uint32)
    if len(words) == 0:
        words = np.zeros(1, np.uint32)
    seg_off = _offsets(np.asarray(cont.seg_words, np.int64))
    alph = np.ascontiguousarray(alphabets, np.int64)
    cnt = np.ascontiguousarray(counts, np.int64)
    freqs = np.ascontiguousarray(cont.freqs, np.uint16)
    freq_off = np.ascontiguousarray(freq_off, np.int64)
    half = np.ascontiguousarray(cont.half, np.uint8)
    use_delta = np.ascontiguousarray(cont.use_delta, np.uint8)
    ascale = np.ascontiguousarray(ascale, np.float32)
    dscale = np.ascontiguousarray(dscale, np.float32)
    mid = np.ascontiguousarray(mid, np.float32)
    nseg = len(cont.seg_words)
    rc = lib.kvpipe_cg_decode_lossy(
        _ptr(words), _ptr(seg_off), nseg, len(cnt) // nseg, _ptr(alph), _ptr(cnt), _ptr(freqs), _ptr(freq_off),
        cont.tokens, cont.channels, cont.anchor_group, cont.table_group, cont.anchor_half, _ptr(half),
        _ptr(ascale), _ptr(dscale), _ptr(mid), _ptr(use_delta), out_ptr, _OUT_DTYPES[out_dtype], _threads())
    if rc != 0:
        raise CorruptEntry(f"cachegen native stream of segment {-rc - 1} does not decode")
