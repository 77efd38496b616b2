"""Helpers of the remote-tier tests: a tier context, a tier over a URL, chunk keys and chunks."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import torch

from kvpipe.config import Config
from kvpipe.connectors.base import Connector
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.keys import ChunkKey, KeyPrefix
from kvpipe.memory.pool import MemoryObj, create_pool
from kvpipe.serde.naive import NaiveSerde
from kvpipe.tiers.base import TierContext
from kvpipe.tiers.remote import RemoteTier, open_remote_tier

REMOTE_KINDS = ["redis", "sentinel", "cluster", "lm", "mooncake", "mock"]
SHAPE = (2, 2, 16, 2, 8)  # layers, K/V, tokens, heads, head_dim: 4 KiB of float32


def make_ctx(timeout: float = 3.0, pool_bytes: int = 32 << 20, **config: Any) -> TierContext:
    """A context with a fresh pool, the naive serde and ``blocking_timeout_secs=timeout``."""
    cfg = Config(blocking_timeout_secs=timeout, **config)
    return TierContext(cfg, create_pool(pool_bytes), NaiveSerde())


async def open_tier(url: str, ctx: TierContext | None = None, connector: Connector | None = None) -> RemoteTier:
    """A remote tier over ``url`` (the connector from the built-in connector plugin)."""
    ctx = ctx or make_ctx()
    conn = connector or connector_for_url(url, ctx.config)
    assert conn is not None
    return await open_remote_tier(url, ctx, conn)


def key(model: str, i: int, dtype: str = "float32") -> ChunkKey:
    """The ``i``-th chunk key of a test's ``model``."""
    return KeyPrefix("vllm", model, 1, 0, dtype).key(hashlib.sha256(f"{model}/{i}".encode()).hexdigest())


def chunk_tensor(i: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic chunk tensor for seed ``i``."""
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(shape, generator=g).to(dtype)


def chunk(i: int, shape: tuple[int, ...] = SHAPE, dtype: torch.dtype = torch.float32) -> MemoryObj:
    """:func:`chunk_tensor` as a detached memory object."""
    return MemoryObj.detached(chunk_tensor(i, shape, dtype), shape[2])


def release_all(objs: list[MemoryObj | None]) -> None:
    """Release every object of a ``get_many`` answer."""
    for o in objs:
        if o is not None:
            o.release()


async def write_chunks(tier: RemoteTier, model: str, n: int) -> tuple[list[ChunkKey], list[int]]:
    """Store chunks ``0..n-1`` of ``model`` (every one must be stored); their keys and seeds."""
    keys = [key(model, i) for i in range(n)]
    seeds = list(range(n))
    assert await tier.put_many(keys, [chunk(i) for i in seeds]) == n
    return keys, seeds


async def assert_round_trip(tier: RemoteTier, k: ChunkKey, i: int) -> None:
    """Store chunk ``i`` under ``k`` and read it back bit-identical."""
    assert await tier.put_many([k], [chunk(i)]) == 1
    (got,) = await tier.get_many([k])
    assert got is not None and torch.equal(got.tensor, chunk_tensor(i))
    got.release()


async def read_checked(tier: RemoteTier, keys: list[ChunkKey], seeds: list[int],
                       shape: tuple[int, ...] = SHAPE) -> list[bool]:
    """Which of ``keys`` hit; every hit must be the KV of its seed (``chunk_tensor(seed, shape)``), else the test
    fails."""
    got = await tier.get_many(keys)
    try:
        for g, i in zip(got, seeds, strict=True):
            if g is not None:
                assert torch.equal(g.tensor, chunk_tensor(i, shape)), f"wrong KV for chunk {i}"
    finally:
        release_all(got)
    return [g is not None for g in got]


def url_for(kind: str, request: pytest.FixtureRequest) -> str:
    """The remote URL of ``kind`` (one of ``REMOTE_KINDS``), starting its session server on first use."""
    if kind == "redis":
        return f"redis://127.0.0.1:{request.getfixturevalue('valkey').port}"
    if kind == "sentinel":
        return str(request.getfixturevalue("sentinel").url)
    if kind == "cluster":
        return str(request.getfixturevalue("cluster").url)
    if kind == "lm":
        return str(request.getfixturevalue("lm").url)
    if kind == "mooncake":
        return str(request.getfixturevalue("mooncake").url)
    if kind == "mock":
        return f"mock://{uuid.uuid4().hex}"
    raise ValueError(kind)


async def gives_up_while_paused(proc: subprocess.Popen[Any] | None, call: Callable[[], Awaitable[Any]],
                                after: float = 0.3) -> bool:
    """Pause server process ``proc`` (SIGSTOP: its connections stay open, nothing comes back), run ``call`` under a
    caller's own deadline of ``after`` seconds, and resume it; whether the caller's deadline ended the call."""
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    try:
        with anyio.move_on_after(after) as scope:
            await call()
    finally:
        proc.send_signal(signal.SIGCONT)
    return scope.cancelled_caught
