"""The shared Tier contract suite: every tier (built-in or plugin, local or remote) must pass it.

How to run it over your tier (e.g. a redis or ``lm://`` tier in ``tests/integration``)::

    import pytest
    from contract import RawStore, TierContract, TierHarness   # tests/ is on sys.path via tests/conftest.py

    class TestRedisTier(TierContract):
        @pytest.fixture
        def harness(self, redis_server) -> TierHarness:          # any fixtures you need
            async def open_tier(ctx):                            # a fresh tier object over the SAME storage
                return await open_remote_tier(redis_server.url, ctx, ...)
            return TierHarness(name="redis", open=open_tier, raw=MyRawStore(redis_server), persistent=True)

``open(ctx)`` must return a new tier over the same backing store each time it is called (the suite reopens it
to check persistence when ``persistent``). ``raw`` gives byte-level access to stored entries so the suite can
corrupt, truncate, swap and delete them underneath the tier (``None`` for tiers that hold objects, like ``cpu``:
those checks are skipped). Give each test its own key space (the suite uses a fresh random model name per test
through :func:`contract_keys`), or flush the store in your fixture.

Every test is ``async`` (pytest-asyncio auto mode) and opens/closes its tiers inside the test.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import pytest
import torch

from kvpipe.config import Config
from kvpipe.keys import ChunkKey, KeyPrefix
from kvpipe.memory.pool import HostPool, MemoryObj, create_pool
from kvpipe.serde.naive import NaiveSerde
from kvpipe.tiers.base import Tier, TierContext, TierStats

__all__ = ["RawStore", "TierContract", "TierHarness", "contract_keys", "make_context"]


class RawStore(Protocol):
    """Byte-level access to a tier's stored entries (header + payload), by key."""

    async def read(self, key: ChunkKey) -> bytes | None:
        """The stored entry bytes, or ``None`` when absent."""
        ...

    async def write(self, key: ChunkKey, data: bytes) -> None:
        """Replace (or create) the stored entry bytes of ``key``."""
        ...

    async def delete(self, key: ChunkKey) -> None:
        """Remove the entry of ``key`` behind the tier's back."""
        ...


@attrs.define
class TierHarness:
    """How the contract suite opens and pokes one tier."""

    name: str
    open: Callable[[TierContext], Awaitable[Tier]]
    raw: RawStore | None = None
    persistent: bool = False


def make_context(pool_bytes: int = 8 << 20, **config: object) -> TierContext:
    """A tier context with a small pool and the naive serde."""
    cfg = Config(max_local_cpu_size=pool_bytes / 1e9, **config)  # type: ignore[arg-type]
    return TierContext(cfg, create_pool(pool_bytes), NaiveSerde())


def contract_keys(n: int, dtype: str = "float16") -> list[ChunkKey]:
    """``n`` keys under a fresh model name (no collision with other tests sharing a store)."""
    prefix = KeyPrefix("kvpipe", f"contract-{uuid.uuid4().hex[:12]}", 1, 0, dtype)
    return [prefix.key(uuid.uuid4().hex + uuid.uuid4().hex) for _ in range(n)]


SHAPES = {
    "fp16": ((2, 2, 16, 2, 8), torch.float16),
    "bf16": ((2, 2, 16, 2, 8), torch.bfloat16),
    "fp32": ((2, 2, 16, 2, 8), torch.float32),
    "mla": ((3, 1, 16, 24), torch.bfloat16),
}


def _obj(pool: HostPool, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> MemoryObj:
    obj = pool.allocate(shape, dtype, shape[2])
    assert obj is not None
    g = torch.Generator().manual_seed(seed)
    obj.tensor.copy_(torch.randn(shape, generator=g).to(dtype))
    return obj


async def _put(tier: Tier, keys: list[ChunkKey], objs: list[MemoryObj]) -> None:
    assert await tier.put_many(keys, objs) == len(keys)


def _release(objs: list[MemoryObj | None]) -> None:
    for o in objs:
        if o is not None:
            o.release()


class TierContract:
    """Subclass and provide a ``harness`` fixture returning a :class:`TierHarness`."""

    @pytest.fixture
    def ctx(self) -> TierContext:
        return make_context()

    # ------------------------------------------------------------------------------------------- round trips
    @pytest.mark.parametrize("kind", list(SHAPES))
    async def test_round_trip_bit_identical(self, harness: TierHarness, ctx: TierContext, kind: str) -> None:
        shape, dtype = SHAPES[kind]
        keys = contract_keys(3)
        objs = [_obj(ctx.pool, shape, dtype, seed=i) for i in range(3)]
        expected = [o.tensor.clone() for o in objs]
        tier = await harness.open(ctx)
        try:
            await _put(tier, keys, objs)
            _release(objs)  # the tier keeps what it needs (copy or its own reference)
            assert await tier.contains_many(keys) == [True] * 3
            got = await tier.get_many(keys)
            for g, e in zip(got, expected):
                assert g is not None
                assert g.tensor.dtype == dtype and tuple(g.tensor.shape) == shape
                assert g.num_tokens == shape[2]
                assert torch.equal(g.tensor, e)
            _release(got)
            # Reading again gives the same (reads do not consume).
            again = await tier.get_many(keys[1:2])
            assert again[0] is not None and torch.equal(again[0].tensor, expected[1])
            _release(again)
        finally:
            await tier.aclose()

    async def test_put_existing_key_is_kept(self, harness: TierHarness, ctx: TierContext) -> None:
        [key] = contract_keys(1)
        a = _obj(ctx.pool, (2, 2, 16, 2, 8), torch.float16, seed=1)
        tier = await harness.open(ctx)
        try:
            await _put(tier, [key], [a])
            await _put(tier, [key], [a])
            [got] = await tier.get_many([key])
            assert got is not None and torch.equal(got.tensor, a.tensor)
            _release([got, a])
        finally:
            await tier.aclose()

    # ------------------------------------------------------------------------------------------- misses
    async def test_misses_are_values(self, harness: TierHarness, ctx: TierContext) -> None:
        keys = contract_keys(4)
        obj = _obj(ctx.pool, (2, 2, 16, 2, 8), torch.float16, seed=0)
        tier = await harness.open(ctx)
        try:
            assert await tier.contains_many(keys) == [False] * 4
            assert await tier.get_many(keys) == [None] * 4
            assert await tier.contains_many([]) == []
            assert await tier.get_many([]) == []
            await _put(tier, keys[1:2], [obj])
            assert await tier.contains_many(keys) == [False, True, False, False]
            got = await tier.get_many(keys)
            assert got[0] is None and got[2] is None and got[3] is None and got[1] is not None
            _release([*got, obj])
        finally:
            await tier.aclose()

    async def test_delete_many(self, harness: TierHarness, ctx: TierContext) -> None:
        keys = contract_keys(3)
        objs = [_obj(ctx.pool, (2, 2, 16, 2, 8), torch.float16, seed=i) for i in range(2)]
        tier = await harness.open(ctx)
        try:
            await _put(tier, keys[:2], objs)
            assert await tier.delete_many(keys) == 2  # the third never existed
            assert await tier.contains_many(keys) == [False] * 3
            assert await tier.get_many(keys[:2]) == [None, None]
            assert await tier.delete_many(keys) == 0
        finally:
            _release(list(objs))
            await tier.aclose()

    # ------------------------------------------------------------------------------------------- bad entries
    async def _stored(self, harness: TierHarness, ctx: TierContext, n: int = 2) -> tuple[Tier, list[ChunkKey]]:
        keys = contract_keys(n)
        objs = [_obj(ctx.pool, (2, 2, 16, 2, 8), torch.float16, seed=i) for i in range(n)]
        tier = await harness.open(ctx)
        await _put(tier, keys, objs)
        _release(list(objs))
        return tier, keys

    async def _assert_bad_entry_is_a_deleted_miss(self, harness: TierHarness, tier: Tier, key: ChunkKey) -> None:
        assert harness.raw is not None
        before = tier.statistics()
        [got] = await tier.get_many([key])
        assert got is None
        assert await harness.raw.read(key) is None, "a bad entry must be deleted"
        assert await tier.contains_many([key]) == [False]
        after = tier.statistics()
        assert after.corrupt == before.corrupt + 1
        assert after.misses > before.misses

    @pytest.mark.parametrize("damage", ["garbage", "truncated-payload", "truncated-header", "flipped-payload-bit",
                                        "flipped-header-bit", "empty"])
    async def test_corrupt_entries_are_deleted_misses(self, harness: TierHarness, ctx: TierContext,
                                                      damage: str) -> None:
        if harness.raw is None:
            pytest.skip(f"{harness.name} holds objects, not bytes")
        tier, keys = await self._stored(harness, ctx)
        try:
            data = await harness.raw.read(keys[0])
            assert data is not None and len(data) > 80
            bad = bytearray(data)
            if damage == "garbage":
                bad = bytearray(b"\x13" * len(data))
            elif damage == "truncated-payload":
                bad = bad[: len(data) - 7]
            elif damage == "truncated-header":
                bad = bad[:40]
            elif damage == "flipped-payload-bit":
                bad[len(data) // 2] ^= 0x10
            elif damage == "flipped-header-bit":
                bad[41] ^= 0x01  # num_tokens
            elif damage == "empty":
                bad = bytearray()
            await harness.raw.write(keys[0], bytes(bad))
            await self._assert_bad_entry_is_a_deleted_miss(harness, tier, keys[0])
            # The other entry is untouched.
            [other] = await tier.get_many(keys[1:])
            assert other is not None
            _release([other])
        finally:
            await tier.aclose()

    async def test_foreign_entry_is_a_deleted_miss(self, harness: TierHarness, ctx: TierContext) -> None:
        """Another key's (valid) entry copied over this key's: detected by the key fingerprint."""
        if harness.raw is None:
            pytest.skip(f"{harness.name} holds objects, not bytes")
        tier, keys = await self._stored(harness, ctx)
        try:
            other = await harness.raw.read(keys[1])
            assert other is not None
            await harness.raw.write(keys[0], other)
            await self._assert_bad_entry_is_a_deleted_miss(harness, tier, keys[0])
        finally:
            await tier.aclose()

    async def test_entries_deleted_underneath_are_misses(self, harness: TierHarness, ctx: TierContext) -> None:
        if harness.raw is None:
            pytest.skip(f"{harness.name} holds objects, not bytes")
        tier, keys = await self._stored(harness, ctx)
        try:
            await harness.raw.delete(keys[0])
            got = await tier.get_many(keys)
            assert got[0] is None and got[1] is not None
            _release(got)
            await harness.raw.delete(keys[1])
            assert await tier.contains_many(keys) == [False, False]
            assert await tier.get_many(keys) == [None, None]
        finally:
            await tier.aclose()

    # ------------------------------------------------------------------------------------------- life cycle
    async def test_reopen_keeps_entries_when_persistent(self, harness: TierHarness, ctx: TierContext) -> None:
        if not harness.persistent:
            pytest.skip(f"{harness.name} is not persistent")
        tier, keys = await self._stored(harness, ctx)
        [first] = await tier.get_many(keys[:1])
        assert first is not None
        expected = first.tensor.clone()
        _release([first])
        await tier.aclose()
        tier = await harness.open(ctx)
        try:
            assert await tier.contains_many(keys) == [True, True]
            [got] = await tier.get_many(keys[:1])
            assert got is not None and torch.equal(got.tensor, expected)
            _release([got])
            assert tier.statistics().chunks >= 2
        finally:
            await tier.aclose()

    async def test_aclose_is_idempotent(self, harness: TierHarness, ctx: TierContext) -> None:
        tier = await harness.open(ctx)
        await tier.aclose()
        await tier.aclose()

    async def test_statistics_counters(self, harness: TierHarness, ctx: TierContext) -> None:
        keys = contract_keys(3)
        objs = [_obj(ctx.pool, (2, 2, 16, 2, 8), torch.float16, seed=i) for i in range(2)]
        tier = await harness.open(ctx)
        try:
            s0 = tier.statistics()
            assert isinstance(s0, TierStats) and s0.name == tier.name
            await _put(tier, keys[:2], objs)
            s1 = tier.statistics()
            assert s1.puts - s0.puts == 2
            assert s1.chunks - s0.chunks == 2
            assert s1.bytes - s0.bytes >= 2 * objs[0].nbytes
            got = await tier.get_many(keys)  # 2 hits, 1 miss
            s2 = tier.statistics()
            assert s2.hits - s1.hits == 2
            assert s2.misses - s1.misses == 1
            _release(got)
            await tier.delete_many(keys[:1])
            assert tier.statistics().chunks - s0.chunks == 1
        finally:
            _release(list(objs))
            await tier.aclose()
