"""The Python API: ``open_cache()`` → :class:`KVCache` (async), and :class:`Cache` (the same, synchronous).

One ``KVCache`` owns the host pool, the tiers (CPU, then disk, then remote) and the write-behind workers, and
runs the store/retrieve/prefetch pipelines. Model name, world size, worker id and KV dtype come from the config
and go into every key.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.from_thread
import attrs
import numpy as np
import torch

from kvpipe.config import Config
from kvpipe.errors import ConfigError
from kvpipe.hashing import TokenSpan, as_token_array, chunk_spans, prefix_hashes
from kvpipe.keys import ChunkKey, KeyPrefix
from kvpipe.memory.pool import HostPool, PoolStats, create_pool
from kvpipe.pipeline.guard import TierGuard
from kvpipe.pipeline.retrieve import PromoteStage, ReadStage, ScatterStage
from kvpipe.pipeline.stages import Stage, run_stages, split_batches
from kvpipe.pipeline.store import DedupeStage, GatherStage, WriteStage
from kvpipe.pipeline.write_behind import PendingWrites, WriteBehind
from kvpipe.plugins import registries
from kvpipe.serde.entry import dtype_from_name, dtype_name
from kvpipe.tiers.base import Tier, TierContext, TierStats
from kvpipe.tiers.cpu import CpuTier

if TYPE_CHECKING:
    from kvpipe.connectors.base import Connector

__all__ = ["Cache", "CacheStats", "KVCache", "RetrieveResult", "TokensLike", "check_remote_url", "open_cache"]

log = logging.getLogger(__name__)

TokensLike = Sequence[int] | torch.Tensor | np.ndarray
_req_ids = itertools.count(1)


@attrs.frozen
class RetrieveResult:
    """What :meth:`KVCache.retrieve` found: the leading ``num_tokens`` tokens' KV (``kv`` is ``None`` on a full
    miss) and how many of those tokens each tier served (``"pending"``: chunks still queued for a slower tier,
    read from the queue's memory)."""

    num_tokens: int
    kv: torch.Tensor | None = attrs.field(eq=False)
    hits_by_tier: dict[str, int] = attrs.field(factory=dict)


@attrs.frozen
class CacheStats:
    """A snapshot of one cache's counters."""

    tiers: dict[str, TierStats]
    pool: PoolStats
    stores: int
    stored_tokens: int
    skipped_chunks: int
    dropped_writes: int
    lookups: int
    lookup_hit_tokens: int
    retrieves: int
    retrieved_tokens: int
    prefetched_chunks: int
    tier_errors: int
    pending_hits: int = 0  # chunks read from a write queue before their write to a slower tier landed

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (what ``kvpipe serve`` reports at ``/kvpipe/stats``)."""
        return attrs.asdict(self, recurse=True)


def _check_kv(kv: torch.Tensor, num_tokens: int, dtype: torch.dtype) -> None:
    if not isinstance(kv, torch.Tensor) or kv.dim() not in (4, 5):
        raise ValueError("kv: expected a tensor [layers, 2, tokens, heads, head_dim] or MLA [layers, 1, tokens, "
                         f"dim], got {getattr(kv, 'shape', type(kv).__name__)}")
    if (kv.dim() == 5 and kv.shape[1] != 2) or (kv.dim() == 4 and kv.shape[1] != 1):
        raise ValueError(f"kv: dimension 1 must be 2 (K, V) or 1 for MLA [layers, 1, tokens, dim], got "
                         f"{tuple(kv.shape)}")
    if kv.shape[2] != num_tokens:
        raise ValueError(f"kv: has {kv.shape[2]} tokens (dimension 2), tokens has {num_tokens}")
    if kv.dtype != dtype:
        raise ValueError(f"kv: dtype {dtype_name(kv.dtype)} does not match kv_dtype {dtype_name(dtype)} of the "
                         "config (it is part of every key)")


@attrs.define(eq=False)
class KVCache:
    """The engine-side cache. Use ``async with open_cache(config) as cache``."""

    config: Config
    prefix: KeyPrefix
    pool: HostPool
    cpu: CpuTier | None
    lower: list[Tier]
    _guards: dict[str, TierGuard] = attrs.field(factory=dict)
    _behind: list[WriteBehind] = attrs.field(factory=list)
    _sources: dict[str, TierGuard] = attrs.field(factory=dict)  # where reads look, in order
    _pending: PendingWrites | None = None
    _extra_store: list[Stage] = attrs.field(factory=list)
    _extra_retrieve: list[Stage] = attrs.field(factory=list)
    _inflight: dict[ChunkKey, anyio.Event] = attrs.field(factory=dict)
    _tg: Any = None
    _dtype: torch.dtype = attrs.field(init=False)
    _closed: bool = False
    _counters: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(
        ("stores", "stored_tokens", "skipped_chunks", "lookups", "lookup_hit_tokens", "retrieves",
         "retrieved_tokens", "prefetched_chunks"), 0))

    # ----------------------------------------------------------------- life cycle
    def __attrs_post_init__(self) -> None:
        self._dtype = dtype_from_name(self.config.kv_dtype)

    async def __aenter__(self) -> KVCache:
        for tier in self._all_tiers():
            self._guards[tier.name] = TierGuard(tier)
        self._behind = [WriteBehind(self._guards[t.name], self.config.write_queue_size) for t in self.lower]
        # Reads: the CPU tier, then chunks still queued for a slower tier (not there yet), then disk and remote.
        sources = list(self._guards.items())
        if self._behind:
            self._pending = PendingWrites(self._behind)
            pending = TierGuard(self._pending)  # type: ignore[arg-type]  # reads only
            sources.insert(1 if self.cpu is not None else 0, (self._pending.name, pending))
        self._sources = dict(sources)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        for wb in self._behind:
            self._tg.start_soon(wb.run, name=f"kvpipe-write-behind-{wb.guard.tier.name}")
        for tier in self._all_tiers():  # tiers with background work (reconnects) run it in the cache's group
            bind = getattr(tier, "bind_task_group", None)
            if callable(bind):
                bind(self._tg)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Finish queued writes (for at most ``blocking_timeout_secs``), stop background work, close every tier;
        idempotent."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.config.blocking_timeout_secs):
            for wb in self._behind:
                wb.close()
                await wb.flush()
        if self._tg is not None:
            # The task group is exited in the scope it was entered in (never inside the shield above).
            self._tg.cancel_scope.cancel()
            await self._tg.__aexit__(None, None, None)
        with anyio.CancelScope(shield=True):
            for tier in reversed(self._all_tiers()):
                await tier.aclose()
        self.pool.close()

    def _all_tiers(self) -> list[Tier]:
        return ([self.cpu] if self.cpu is not None else []) + list(self.lower)  # type: ignore[list-item]

    def _check_open(self) -> None:
        if self._closed or self._tg is None:
            raise RuntimeError("the cache is not open: use 'async with open_cache(config) as cache'")

    # ----------------------------------------------------------------- keys
    def _keys(self, tokens: TokensLike) -> tuple[list[TokenSpan], list[ChunkKey]]:
        arr = as_token_array(tokens)
        spans = chunk_spans(len(arr), self.config.chunk_size, keep_partial=self.config.save_unfull_chunk)
        return spans, [self.prefix.key(h) for h in prefix_hashes(arr, spans)]

    def keys_for(self, tokens: TokensLike) -> list[ChunkKey]:
        """The chunk keys of ``tokens`` (for inspection and tests)."""
        return self._keys(tokens)[1]

    async def _locate(self, keys: Sequence[ChunkKey]) -> tuple[list[str | None], int]:
        """For each key the first tier that holds it, and how many leading keys some tier holds."""
        where: list[str | None] = [None] * len(keys)
        todo = list(range(len(keys)))
        for name, guard in self._sources.items():
            if not todo:
                break
            present = await guard.call("contains_many", [False] * len(todo), [keys[i] for i in todo])
            for i, p in zip(todo, present, strict=True):
                if p:
                    where[i] = name
            todo = [i for i in todo if where[i] is None]
        n = next((i for i, w in enumerate(where) if w is None), len(keys))
        return where, n

    # ----------------------------------------------------------------- the API
    async def store(self, tokens: TokensLike, kv: torch.Tensor, *, mask: torch.Tensor | None = None,
                    req_id: str | None = None) -> int:
        """Store the KV of ``tokens`` chunk by chunk; returns how many tokens were newly stored.

        ``kv`` is ``[layers, 2, len(tokens), heads, head_dim]`` (MLA ``[layers, 1, len(tokens), dim]``) in the
        config's ``kv_dtype``. ``mask`` (bool, one per token) marks with leading ``False`` the tokens whose KV is
        already stored; their count must be a multiple of ``chunk_size``. Returns once the CPU tier holds the
        chunks: disk and remote writes happen behind, and a full pool or queue skips chunks (counted), it never
        blocks.

        :raises ValueError: for a ``kv`` or ``mask`` that does not match ``tokens`` or the config.
        """
        self._check_open()
        req = req_id or f"req-{next(_req_ids)}"
        arr = as_token_array(tokens)  # once per request: a list of ints is converted here, not again per use
        total = len(arr)
        _check_kv(kv, total, self._dtype)
        spans, keys = self._keys(arr)
        if mask is not None:
            skip = _masked_prefix(mask, total, self.config.chunk_size)
            first = next((i for i, (s, _e) in enumerate(spans) if s >= skip), len(spans))
            spans, keys = spans[first:], keys[first:]
        if not keys:
            log.info("Storing KV cache for 0 out of %d tokens (Reqid: %s)", total, req)
            return 0
        stages: list[Stage] = [DedupeStage(self.cpu, self._pending), GatherStage(self.pool),
                               WriteStage(self.cpu, self._behind, self._pending),
                               *self._extra_store]
        batches = await run_stages(stages, split_batches(req, keys, spans, kv))
        new = sum(e - s for b in batches for (s, e), t in zip(b.spans, b.tiers, strict=True) if t == "new")
        self._counters["stores"] += 1
        self._counters["stored_tokens"] += new
        self._counters["skipped_chunks"] += sum(b.info.get("skipped", 0) for b in batches)
        log.info("Storing KV cache for %d out of %d tokens (Reqid: %s)", new, total, req)
        return new

    async def lookup(self, tokens: TokensLike) -> int:
        """How many leading tokens of ``tokens`` some tier holds (whole chunks; a miss is 0, never an error)."""
        self._check_open()
        arr = as_token_array(tokens)
        spans, keys = self._keys(arr)
        _, n = await self._locate(keys)
        hit = spans[n - 1][1] if n else 0
        self._counters["lookups"] += 1
        self._counters["lookup_hit_tokens"] += hit
        log.debug("lookup: %d of %d tokens hit", hit, len(arr))
        return hit

    async def retrieve(self, tokens: TokensLike, *, out: torch.Tensor | None = None,
                       req_id: str | None = None) -> RetrieveResult:
        """The KV of the longest cached prefix of ``tokens``: ``kv`` is ``[layers, 2, num_tokens, heads,
        head_dim]``, written into ``out`` when given (``[layers, 2, >= len(tokens), heads, head_dim]``, e.g. the
        engine's preallocated buffer; ``kv`` is then a view of it). Chunks read from disk or remote are promoted
        into the CPU tier. A tier failing or an entry going bad shortens the hit; it never raises.

        :raises ValueError: for an ``out`` with too few tokens or another dtype than the config's.
        """
        self._check_open()
        arr = as_token_array(tokens)
        total = len(arr)
        if out is not None and (out.dim() not in (4, 5) or out.shape[2] < total or out.dtype != self._dtype):
            raise ValueError(f"out: expected [layers, 2, >= {total}, heads, head_dim] "
                             f"{dtype_name(self._dtype)}, got {tuple(out.shape)} {dtype_name(out.dtype)}")
        req = req_id or f"req-{next(_req_ids)}"
        spans, keys = self._keys(arr)
        await self._wait_inflight(keys)
        where, n = await self._locate(keys)
        result = RetrieveResult(0, None, {})
        if n:
            batches = split_batches(req, keys[:n], spans[:n], None)
            for b in batches:
                b.tiers = list(where[b.first : b.first + len(b.keys)])
            scatter = ScatterStage(total_tokens=spans[n - 1][1], out=out)
            done = await run_stages([ReadStage(self._sources), scatter, PromoteStage(self.cpu),
                                     *self._extra_retrieve], batches)
            got = scatter.contiguous_end
            by_tier: dict[str, int] = {}
            for b in done:
                for (s, e), t in zip(b.spans, b.tiers, strict=True):
                    if t is not None and e <= got:
                        by_tier[t] = by_tier.get(t, 0) + e - s
            if got and scatter.out is not None:
                kv = scatter.out if got == scatter.out.shape[2] else scatter.out[:, :, :got]
                result = RetrieveResult(got, kv, by_tier)
        self._counters["retrieves"] += 1
        self._counters["retrieved_tokens"] += result.num_tokens
        log.info("Reqid: %s, Total tokens %d, kvpipe hit tokens: %d, need to load: %d", req, total,
                 result.num_tokens, result.num_tokens)
        return result

    async def prefetch(self, tokens: TokensLike) -> int:
        """Start promoting the cached prefix of ``tokens`` from disk/remote into the CPU tier, in the background;
        returns how many tokens will be promoted. A ``retrieve`` of the same chunks waits for the promotion
        instead of reading twice."""
        self._check_open()
        spans, keys = self._keys(tokens)
        where, n = await self._locate(keys)
        idx = [i for i in range(n) if where[i] not in (None, "cpu") and keys[i] not in self._inflight]
        if not idx or self.cpu is None:
            return 0
        events = {keys[i]: anyio.Event() for i in idx}
        self._inflight.update(events)
        batches = split_batches("prefetch", [keys[i] for i in idx], [spans[i] for i in idx], None)
        for b in batches:
            b.tiers = [where[idx[b.first + j]] for j in range(len(b.keys))]

        async def promote() -> None:
            try:
                out = await run_stages([ReadStage(self._sources), PromoteStage(self.cpu)], batches)
                self._counters["prefetched_chunks"] += sum(t is not None for b in out for t in b.tiers)
            finally:
                for k, ev in events.items():
                    self._inflight.pop(k, None)
                    ev.set()

        self._tg.start_soon(promote, name="kvpipe-prefetch")
        return sum(spans[i][1] - spans[i][0] for i in idx)

    async def _wait_inflight(self, keys: Sequence[ChunkKey]) -> None:
        for k in keys:
            ev = self._inflight.get(k)
            if ev is not None:
                await ev.wait()

    async def pin(self, tokens: TokensLike) -> int:
        """Protect the CPU-cached chunks of ``tokens`` from eviction for ``pin_lease_secs`` (calling again renews
        the lease); returns how many tokens are pinned."""
        self._check_open()
        if self.cpu is None:
            return 0
        spans, keys = self._keys(tokens)
        present = await self.cpu.contains_many(keys)
        self.cpu.pin([k for k, p in zip(keys, present, strict=True) if p], self.config.pin_lease_secs)
        return sum(e - s for (s, e), p in zip(spans, present, strict=True) if p)

    async def unpin(self, tokens: TokensLike) -> int:
        """End the pins of ``tokens``' chunks; returns how many tokens were pinned."""
        self._check_open()
        if self.cpu is None:
            return 0
        spans, keys = self._keys(tokens)
        pinned = set(self.cpu.pinned_keys(keys))
        self.cpu.unpin(keys)
        return sum(e - s for (s, e), k in zip(spans, keys, strict=True) if k in pinned)

    async def clear(self) -> int:
        """Delete every chunk of the local tiers (CPU and disk) and return how many there were. Remote stores are
        shared between instances and are cleared with ``kvpipe inspect --remote URL --delete``."""
        self._check_open()
        for wb in self._behind:
            await wb.flush()
        n = 0
        if self.cpu is not None:
            n += await self.cpu.delete_many(self.cpu.local_keys())
        for tier in self.lower:
            local_keys = getattr(tier, "local_keys", None)  # tiers whose whole content is this instance's
            if local_keys is not None:
                n += await self._guards[tier.name].call("delete_many", 0, local_keys())
        return n

    async def flush(self) -> None:
        """Wait until every write-behind queue is empty (stores have reached disk and remote)."""
        self._check_open()
        for wb in self._behind:
            await wb.flush()

    async def wait_resident(self) -> None:
        """Wait until the CPU pool's pages are resident (``local_cpu_prefault`` makes them so in the background
        at open): call it before timing the first requests. Bound it with ``anyio.move_on_after``."""
        self._check_open()
        await anyio.to_thread.run_sync(self.pool.wait_resident, abandon_on_cancel=True)

    def statistics(self) -> CacheStats:
        """A snapshot of every tier's and the pipeline's counters."""
        c = self._counters
        return CacheStats(
            tiers={t.name: t.statistics() for t in self._all_tiers()}, pool=self.pool.statistics(),
            stores=c["stores"], stored_tokens=c["stored_tokens"], skipped_chunks=c["skipped_chunks"],
            dropped_writes=sum(wb.dropped_chunks for wb in self._behind), lookups=c["lookups"],
            lookup_hit_tokens=c["lookup_hit_tokens"], retrieves=c["retrieves"],
            retrieved_tokens=c["retrieved_tokens"], prefetched_chunks=c["prefetched_chunks"],
            tier_errors=sum(g.errors for g in self._guards.values()),
            pending_hits=self._pending.hits if self._pending is not None else 0)


def _masked_prefix(mask: torch.Tensor, total: int, chunk_size: int) -> int:
    m = torch.as_tensor(mask)
    if m.dim() != 1 or m.numel() != total or m.dtype != torch.bool:
        raise ValueError(f"mask: expected a 1-D bool tensor of {total} tokens, got {tuple(m.shape)} {m.dtype}")
    skip = int(m.logical_not().cumprod(0).sum())
    if skip % chunk_size:
        raise ValueError(f"mask: {skip} leading False tokens is not a multiple of chunk_size {chunk_size}")
    if not bool(m[skip:].all()):
        raise ValueError("mask: False tokens must all come before the True ones")
    return skip


class _OpenCache:
    """``open_cache()``'s result: an async context manager yielding an open :class:`KVCache`."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._cache: KVCache | None = None

    async def __aenter__(self) -> KVCache:
        self._cache = await _build(self._config)
        try:
            return await self._cache.__aenter__()
        except BaseException:
            await self._cache.aclose()
            raise

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._cache is not None:
            await self._cache.aclose()


def open_cache(config: Config | None = None, **overrides: Any) -> _OpenCache:
    """Open a cache: ``async with open_cache(config) as cache``. With no ``config``, ``Config.load()`` (YAML file
    and environment) plus ``overrides``.

    :raises ConfigError: for a bad config, an unusable disk directory, an unknown serde or remote scheme.
    """
    if config is None:
        config = Config.load(**overrides)
    elif overrides:
        config = config.replace(**overrides)
    return _OpenCache(config)


async def _build(config: Config) -> KVCache:
    regs = registries()
    prefix = KeyPrefix(config.key_format, config.model_name, config.world_size, config.worker_id,
                       dtype_name(dtype_from_name(config.kv_dtype)))
    # Every name is resolved before any resource exists, so a bad config leaves nothing behind.
    policy_factory = regs.eviction.get(config.cache_policy)
    disk_serde = regs.serdes.get(config.local_disk_serde)(config) if config.local_disk_path is not None else None
    remote_serde = regs.serdes.get(config.remote_serde)(config) if config.remote_url is not None else None
    wanted = {regs.stages.get(name).name.lower() for name in config.extra_stages}
    extra_store: list[Stage] = []
    extra_retrieve: list[Stage] = []
    for spec in regs.stages.factories.values():
        if spec.always or spec.name.lower() in wanted:
            (extra_store if spec.pipeline == "store" else extra_retrieve).append(spec.factory(config))
    pool = create_pool(config.max_local_cpu_bytes, hugepages=config.local_cpu_use_hugepages,
                       prefault=config.local_cpu_prefault,
                       transparent_hugepages=config.local_cpu_transparent_hugepages)
    cpu = CpuTier(pool, policy_factory()) if config.local_cpu else None
    lower: list[Tier] = []
    try:
        if disk_serde is not None:
            ctx = TierContext(config, pool, disk_serde)
            lower.append(await regs.tiers.get("file")(str(config.local_disk_path), ctx))
        if config.remote_url is not None and remote_serde is not None:
            lower.append(await _open_remote(config.remote_url, TierContext(config, pool, remote_serde)))
    except BaseException:
        for t in lower:
            await t.aclose()
        pool.close()
        raise
    return KVCache(config, prefix, pool, cpu, lower, extra_store=extra_store, extra_retrieve=extra_retrieve)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower()


def _remote_connector(url: str, config: Config) -> Connector | None:
    """The connector plugin's connector for ``url`` (built without I/O), or ``None`` when a tier plugin serves the
    scheme itself. :raises ConfigError: for a malformed URL, or a scheme nothing serves."""
    regs = registries()
    scheme = _scheme(url)
    if scheme in regs.tiers:
        return None
    connector = regs.pm.hook.kvpipe_connector_for_url(url=url, config=config)
    if connector is None:
        if scheme == "infinistore":  # LMCache lists it; kvpipe has no connector (no RDMA device to test one on)
            raise ConfigError(f"remote_url: {url!r}: InfiniStore is not supported by kvpipe (its server needs an RDMA "
                              "device); use mooncakestore://, lm:// or redis://")
        raise ConfigError(f"remote_url: no connector or tier for scheme {scheme!r} in {url!r}")
    return connector  # type: ignore[no-any-return]


def check_remote_url(config: Config) -> None:
    """Check ``config.remote_url`` as opening a cache would, but without connecting: a malformed URL (bad port,
    unknown option, a scheme nothing serves) raises here, before anything runs.

    :raises ConfigError: naming what is wrong with the URL.
    """
    if config.remote_url:
        _remote_connector(config.remote_url, config)


async def _open_remote(url: str, ctx: TierContext) -> Tier:
    connector = _remote_connector(url, ctx.config)
    if connector is None:
        return await registries().tiers.get(_scheme(url))(url, ctx)  # type: ignore[no-any-return]
    from kvpipe.tiers.remote import open_remote_tier

    return await open_remote_tier(url, ctx, connector)


class Cache:
    """The synchronous :class:`KVCache`, for code without an event loop: one background event loop thread, one
    thread hop per call (never per chunk). Use as a context manager or call :meth:`close`.

    :raises ConfigError: like :func:`open_cache`.
    """

    def __init__(self, config: Config | None = None, **overrides: Any) -> None:
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        try:
            self._cache_cm = self._portal.wrap_async_context_manager(open_cache(config, **overrides))
            self._cache: KVCache = self._cache_cm.__enter__()
        except BaseException:
            self._portal_cm.__exit__(None, None, None)
            raise
        self._closed = False

    @property
    def config(self) -> Config:
        """The effective config."""
        return self._cache.config

    def store(self, tokens: TokensLike, kv: torch.Tensor, *, mask: torch.Tensor | None = None,
              req_id: str | None = None) -> int:
        """See :meth:`KVCache.store`."""
        return self._portal.call(functools.partial(self._cache.store, tokens, kv, mask=mask, req_id=req_id))

    def lookup(self, tokens: TokensLike) -> int:
        """See :meth:`KVCache.lookup`."""
        return self._portal.call(self._cache.lookup, tokens)

    def retrieve(self, tokens: TokensLike, *, out: torch.Tensor | None = None,
                 req_id: str | None = None) -> RetrieveResult:
        """See :meth:`KVCache.retrieve`."""
        return self._portal.call(functools.partial(self._cache.retrieve, tokens, out=out, req_id=req_id))

    def prefetch(self, tokens: TokensLike) -> int:
        """See :meth:`KVCache.prefetch`."""
        return self._portal.call(self._cache.prefetch, tokens)

    def pin(self, tokens: TokensLike) -> int:
        """See :meth:`KVCache.pin`."""
        return self._portal.call(self._cache.pin, tokens)

    def unpin(self, tokens: TokensLike) -> int:
        """See :meth:`KVCache.unpin`."""
        return self._portal.call(self._cache.unpin, tokens)

    def clear(self) -> int:
        """See :meth:`KVCache.clear`."""
        return self._portal.call(self._cache.clear)

    def flush(self) -> None:
        """See :meth:`KVCache.flush`."""
        self._portal.call(self._cache.flush)

    def wait_resident(self, timeout: float | None = None) -> bool:
        """See :meth:`KVCache.wait_resident`; ``False`` when ``timeout`` seconds passed first."""
        return self._cache.pool.wait_resident(timeout)

    def keys_for(self, tokens: TokensLike) -> list[ChunkKey]:
        """See :meth:`KVCache.keys_for`."""
        return self._cache.keys_for(tokens)

    def statistics(self) -> CacheStats:
        """See :meth:`KVCache.statistics`."""
        return self._portal.call(self._cache.statistics)

    def close(self) -> None:
        """Close the cache and stop its event loop thread; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._cache_cm.__exit__(None, None, None)
        finally:
            self._portal_cm.__exit__(None, None, None)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
