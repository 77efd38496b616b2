"""Shared helpers of the core tests (configs, tokens, KV tensors). Import from test modules:
``from fixtures_core import small_config, make_kv, make_tokens`` (``tests/`` is on ``sys.path`` through
``tests/conftest.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import kvpipe

__all__ = ["DATA", "make_kv", "make_tokens", "shared_prefix_docs", "small_config"]

DATA = Path(__file__).parent / "data"

# Small shapes keep every test in milliseconds: 2 layers x 2 heads x 4 dims x 16-token chunks.
LAYERS, HEADS, DIM, CHUNK = 2, 2, 4, 16


def small_config(tmp_path: Path | None = None, *, disk: bool = False, **overrides: Any) -> kvpipe.Config:
    """A config with 16-token chunks, a 4 MB pool, fp32 KV and (with ``disk``) a disk tier under ``tmp_path``."""
    values: dict[str, Any] = {"chunk_size": CHUNK, "max_local_cpu_size": 0.004, "kv_dtype": "float32",
                              "model_name": "test-model"}
    if disk:
        assert tmp_path is not None
        values["local_disk"] = f"file://{tmp_path / 'disk'}"
    values.update(overrides)
    return kvpipe.Config(**values)


def make_tokens(n: int, seed: int = 0) -> list[int]:
    """``n`` pseudo-random token ids (deterministic in ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50_000, (n,), generator=g).tolist()


def make_kv(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, mla: bool = False,
            layers: int = LAYERS, heads: int = HEADS, dim: int = DIM) -> torch.Tensor:
    """A KV tensor ``[layers, 2, n, heads, dim]`` (MLA: ``[layers, 1, n, dim]``) of random values."""
    g = torch.Generator().manual_seed(seed)
    shape = (layers, 1, n, dim) if mla else (layers, 2, n, heads, dim)
    return torch.randn(shape, generator=g).to(dtype)


def shared_prefix_docs(n_docs: int, own_chunks: int, shared_chunks: int = 2
                       ) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``n_docs`` "documents" that share a ``shared_chunks``-chunk system prompt, each with ``own_chunks`` chunks of
    its own, and their KV. The KV of a token depends on its whole prefix in a real model; here: one KV per
    document, with the shared prefix's KV identical in every document (as a real model would compute it)."""
    base = make_tokens(shared_chunks * CHUNK, seed=100)
    docs = [base + make_tokens(own_chunks * CHUNK, seed=200 + d) for d in range(n_docs)]
    kvs = []
    for d in range(n_docs):
        kv = make_kv((shared_chunks + own_chunks) * CHUNK, seed=300 + d)
        kv[:, :, : shared_chunks * CHUNK] = make_kv(shared_chunks * CHUNK, seed=300)
        kvs.append(kv)
    return docs, kvs
