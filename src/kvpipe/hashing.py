"""Prefix-chained chunk hashing.

``digest[i] = sha256(digest[i-1] || tokens[start_i:end_i] as little-endian int64)``, starting from a fixed,
versioned seed. Never Python's ``hash()``: every process, rank and machine computes the same key. sha256 of a
256-token chunk costs ~1.2 µs here, so hashing is never the bottleneck.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

__all__ = ["HASH_VERSION", "SEED_DIGEST", "TokenSpan", "as_token_array", "chunk_spans", "prefix_hashes"]

HASH_VERSION = 1
SEED_DIGEST = hashlib.sha256(b"kvpipe/chunk-hash/v%d" % HASH_VERSION).digest()

TokenSpan = tuple[int, int]


def as_token_array(tokens: Sequence[int] | torch.Tensor | np.ndarray) -> np.ndarray:
    """Token ids as a 1-D little-endian int64 array (a view where the input already is one).

    :raises ValueError: for a tensor or array that is not 1-D integers.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: expected a 1-D integer tensor, got {tuple(tokens.shape)} {tokens.dtype}")
        arr = tokens.detach().to("cpu", torch.int64).numpy()
    else:
        arr = np.asarray(tokens)
        if arr.size == 0:
            arr = arr.astype(np.int64)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"tokens: expected a 1-D sequence of ints, got shape {arr.shape} {arr.dtype}")
    return np.ascontiguousarray(arr, dtype="<i8")


def chunk_spans(num_tokens: int, chunk_size: int, *, keep_partial: bool) -> list[TokenSpan]:
    """``(start, end)`` spans of ``chunk_size`` tokens; the last partial one only when ``keep_partial``."""
    full = num_tokens - num_tokens % chunk_size
    spans = [(s, s + chunk_size) for s in range(0, full, chunk_size)]
    if keep_partial and full < num_tokens:
        spans.append((full, num_tokens))
    return spans


def iter_prefix_hashes(tokens: np.ndarray, spans: Sequence[TokenSpan]) -> Iterator[str]:
    """Yield the hex digest of each span, chained from :data:`SEED_DIGEST` (spans must tile from 0)."""
    prev = SEED_DIGEST
    for start, end in spans:
        h = hashlib.sha256(prev)
        h.update(tokens[start:end].tobytes())
        prev = h.digest()
        yield prev.hex()


def prefix_hashes(tokens: np.ndarray, spans: Sequence[TokenSpan]) -> list[str]:
    """The hex digests of all ``spans`` (see :func:`iter_prefix_hashes`)."""
    return list(iter_prefix_hashes(tokens, spans))
