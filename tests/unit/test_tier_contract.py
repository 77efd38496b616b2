"""The shared tier contract (:mod:`contract`) over the ``cpu`` tier and every tier registered through plugins:
the built-in ``file`` (disk) tier and plugin tiers such as the example plugin's ``dict://``.

A registered tier this module does not know how to poke at byte level still runs the contract, without the
corruption checks (``raw=None``). Remote tiers run the same suite in ``tests/integration`` (see the docstring of
``tests/contract.py``).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from contract import TierContract, TierHarness
from kvpipe.keys import ChunkKey
from kvpipe.memory.eviction import LruPolicy
from kvpipe.plugins import registries
from kvpipe.tiers.base import Tier, TierContext
from kvpipe.tiers.cpu import CpuTier
from kvpipe.tiers.disk import _file_name


class FileRaw:
    """Entry bytes of the disk tier: one file per key."""

    def __init__(self, root: Path) -> None:
        self.root = root

    async def read(self, key: ChunkKey) -> bytes | None:
        p = anyio.Path(self.root / _file_name(key))
        return await p.read_bytes() if await p.exists() else None

    async def write(self, key: ChunkKey, data: bytes) -> None:
        await anyio.Path(self.root / _file_name(key)).write_bytes(data)

    async def delete(self, key: ChunkKey) -> None:
        await anyio.Path(self.root / _file_name(key)).unlink(missing_ok=True)


class DictRaw:
    """Entry bytes of the example plugin's ``dict://`` tier (a process-wide dict)."""

    def __init__(self, store: dict[str, bytes]) -> None:
        self.store = store

    async def read(self, key: ChunkKey) -> bytes | None:
        return self.store.get(str(key))

    async def write(self, key: ChunkKey, data: bytes) -> None:
        self.store[str(key)] = data

    async def delete(self, key: ChunkKey) -> None:
        self.store.pop(str(key), None)


def _cpu_harness(_tmp: Path) -> TierHarness:
    async def open_cpu(ctx: TierContext) -> Tier:
        return CpuTier(ctx.pool, LruPolicy())  # type: ignore[return-value]

    return TierHarness("cpu", open_cpu)


def _registered_harness(scheme: str, tmp: Path) -> TierHarness:
    factory = registries().tiers.get(scheme)
    if scheme == "file":
        root = tmp / "disk"
        return TierHarness("file", lambda ctx: factory(f"file://{root}", ctx), FileRaw(root), persistent=True)
    if scheme == "dict":
        from kvpipe_example.plugin import STORES

        name = f"contract-{uuid.uuid4().hex[:8]}"
        url = f"dict://{name}"

        async def open_dict(ctx: TierContext) -> Any:
            tier = await factory(url, ctx)
            return tier

        return TierHarness("dict", open_dict, DictRaw(STORES.setdefault(name, {})), persistent=True)
    return TierHarness(scheme, lambda ctx: factory(f"{scheme}://kvpipe-contract-{uuid.uuid4().hex[:8]}", ctx))


TIERS = ["cpu", *registries().tiers.names()]


class TestTierContract(TierContract):
    @pytest.fixture(params=TIERS)
    def harness(self, request: pytest.FixtureRequest, tmp_path: Path) -> TierHarness:
        if request.param == "cpu":
            return _cpu_harness(tmp_path)
        return _registered_harness(request.param, tmp_path)


def test_builtin_and_plugin_tiers_are_covered() -> None:
    assert "file" in TIERS
    try:
        import kvpipe_example  # noqa: F401
    except ImportError:
        return
    assert "dict" in TIERS
