"""The payload checksum (XXH3-64, seed 0) without holding the GIL.

python-xxhash computes the same value but holds the GIL while it hashes: 0.2-0.4 ms per 4 MiB payload here,
during which no other Python thread runs, the event loop included (a disk writer's thread hashing a chunk holds up
the loop's remote I/O). ``xxh3.c`` (written from the XXH3 specification, AVX2 when the CPU has it) runs through
ctypes, which releases the GIL.

Inputs of 240 bytes or less, and machines without a C compiler, use python-xxhash: the value is the same.
"""

from __future__ import annotations

import ctypes
import threading
from pathlib import Path

import numpy as np
import xxhash

from kvpipe.native import load_library

__all__ = ["available", "xxh3_64"]

_LONG = 240  # XXH3's long-input path starts above this length
_lock = threading.Lock()
_fn: ctypes._CFuncPtr | None = None  # type: ignore[name-defined]
_tried = False


def _native() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _fn, _tried
    if _tried:
        return _fn
    with _lock:
        if not _tried:
            lib = load_library(Path(__file__).with_name("xxh3.c"), "kvpipe_xxh3")
            if lib is not None:
                fn = lib.kvpipe_xxh3_64_long
                fn.restype = ctypes.c_uint64
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64]
                _fn = fn
            _tried = True
    return _fn


def available() -> bool:
    """Whether the GIL-free hasher is built and loaded here (builds it on the first call)."""
    return _native() is not None


def xxh3_64(data: object) -> int:
    """XXH3-64 of a bytes-like object (not copied); the same value as ``xxhash.xxh3_64_intdigest``."""
    view = memoryview(data)  # type: ignore[arg-type]
    fn = _native()
    if fn is None or view.nbytes <= _LONG:
        return xxhash.xxh3_64_intdigest(view)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    arr = np.frombuffer(view.cast("B") if view.ndim != 1 or view.format != "B" else view, dtype=np.uint8)
    return int(fn(arr.ctypes.data, arr.size))

