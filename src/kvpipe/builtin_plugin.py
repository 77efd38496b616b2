"""kvpipe's built-in plugin: the disk tier, the ``naive`` serde and the LRU/FIFO policies, registered through the
same hooks as any outside plugin."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpipe.hookspecs import hookimpl
from kvpipe.memory.eviction import FifoPolicy, LruPolicy
from kvpipe.serde.naive import NaiveSerde

if TYPE_CHECKING:
    from kvpipe.plugins import EvictionRegistry, SerdeRegistry, TierRegistry
    from kvpipe.tiers.base import Tier, TierContext


async def _open_disk(url: str, ctx: TierContext) -> Tier:
    import os
    from pathlib import Path

    from kvpipe.plugins import registries
    from kvpipe.tiers.disk import open_disk_tier

    policy = registries().eviction.get(ctx.config.cache_policy)()
    root = Path(os.path.expanduser(url.removeprefix("file://")))  # noqa: ASYNC240 - no I/O: string work
    return await open_disk_tier(root, ctx.config.max_local_disk_bytes, ctx.pool, ctx.serde, policy)


@hookimpl
def kvpipe_register_tiers(registry: TierRegistry) -> None:
    """``file://PATH``: the disk tier."""
    registry.add("file", _open_disk)


@hookimpl
def kvpipe_register_serdes(registry: SerdeRegistry) -> None:
    """``naive``: raw bytes."""
    registry.add("naive", lambda config: NaiveSerde())


@hookimpl
def kvpipe_register_eviction_policies(registry: EvictionRegistry) -> None:
    """``LRU`` and ``FIFO``."""
    registry.add("lru", LruPolicy)
    registry.add("fifo", FifoPolicy)
