"""The remote tier: entries (header + serde payload) in a byte store reached through a :class:`Connector`.

What this layer adds over a connector:

- **serde and validation**: ``put_many`` encodes with ``ctx.serde`` and writes an :class:`EntryHeader` next to
  the payload; ``get_many`` checks every header field, the key fingerprint and the payload checksum. A corrupt,
  truncated or foreign entry is a miss and is deleted; an entry written with another serde is a plain miss (it
  belongs to an engine configured differently, so it is left alone). For raw serdes (``naive``) the payload is
  received straight into pool memory: the connector calls ``read_into(header)`` once it has the header and this
  tier answers with a fresh ``ctx.pool.allocate(shape, dtype, num_tokens)`` region. A batch put goes to a
  connector's ``put_stream`` when it has one: each entry is encoded and hashed just before it is sent, so the remote
  takes in one chunk while the next is hashed.
- **deadlines**: every connector call runs under ``ctx.config.blocking_timeout_secs`` (a cancel scope's deadline).
- **down/up state machine**: connection refused or reset, a deadline passed, a protocol error or a failover
  reply mark the tier *down*. While down every call returns at once (misses, ``False``, 0 stored) and stores are
  dropped and counted. A background task pings the remote with exponential backoff (50 ms doubling to 1 s) and
  marks the tier *up* again when a ping succeeds; nothing ever raises to the caller because of the remote.

Background reconnect: inside a cache (``open_cache``), the cache hands its task group to the tier
(:meth:`RemoteTier.bind_task_group`) and the reconnect loop runs there, on any anyio backend, and ends with the
cache. A tier used on its own (tests, benchmarks) is returned by a plain coroutine (:func:`open_remote_tier`) and
closed by ``aclose()`` perhaps from another task, so it cannot own a task group: on asyncio it starts one detached
reconnect task on the running loop, keeps a strong reference to it, and cancels and awaits it in ``aclose()``; on
other backends (trio) the probe runs inline in the first call made after the backoff delay, under a short deadline
(``min(blocking_timeout_secs, 0.5)``), so a call waits at most that long.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from typing import Any, TypeVar

import anyio
import anyio.abc
import attrs
import sniffio
import torch

from kvpipe.connectors.base import CALL_DEADLINE, Connector, Entry, GetResult
from kvpipe.errors import CapacityError, CorruptEntry, ProtocolError, TierError, TierUnavailable
from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import MemoryObj
from kvpipe.serde.base import Serde
from kvpipe.serde.entry import Described, EntryHeader, key_fingerprint, payload_checksum
from kvpipe.tiers.base import TierContext, TierStats

__all__ = ["RemoteTier", "open_remote_tier"]

log = logging.getLogger(__name__)

T = TypeVar("T")
_FIRST_BACKOFF = 0.05
_MAX_BACKOFF = 1.0
_INLINE_PROBE_MAX = 0.5
_LOG_EVERY = 30.0  # seconds between repeated warnings of the same kind
_DOWN = (TierUnavailable, OSError, ProtocolError, EOFError)


class _Failed:
    """Marker: the remote call failed (already logged and counted)."""


_FAILED = _Failed()


@attrs.define(eq=False)
class RemoteTier:
    """A :class:`~kvpipe.tiers.base.Tier` over a :class:`~kvpipe.connectors.base.Connector`."""

    url: str
    connector: Connector
    ctx: TierContext
    name: str = "remote"
    timeout: float = 10.0
    _up: bool = True
    _closed: bool = False
    _reconnect: asyncio.Task[None] | None = None
    _tg: anyio.abc.TaskGroup | None = None
    _reconnecting: bool = False
    _next_probe: float = 0.0
    _backoff: float = _FIRST_BACKOFF
    _last_warn: dict[str, float] = attrs.field(factory=dict)
    _limiter: anyio.CapacityLimiter | None = None
    _c: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(
        ("hits", "misses", "puts", "put_failures", "corrupt", "serde_mismatch", "no_memory", "timeouts",
         "errors", "down_events", "reconnects", "deletes", "bytes_read", "bytes_written", "dropped_while_down"),
        0))

    # -- state machine ------------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """Whether the tier is up (calls go to the remote)."""
        return self._up and not self._closed

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warn.get(kind, -1e9) >= _LOG_EVERY:
            self._last_warn[kind] = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def _mark_down(self, reason: str) -> None:
        if self._up:
            self._up = False
            self._c["down_events"] += 1
            self._backoff = _FIRST_BACKOFF
            self._next_probe = time.monotonic() + self._backoff
            log.warning("remote tier %s is down (%s); serving misses and retrying in the background",
                        self._safe_url, reason)
            reset = getattr(self.connector, "reset", None)
            if callable(reset):
                reset()
        self._start_reconnect()

    def _mark_up(self) -> None:
        if not self._up and not self._closed:
            self._up = True
            self._c["reconnects"] += 1
            log.warning("remote tier %s is back up", self._safe_url)

    @property
    def _safe_url(self) -> str:
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.rpartition('@')[2].split('?')[0]}"

    def bind_task_group(self, tg: anyio.abc.TaskGroup) -> None:
        """Run background work (the reconnect loop) in ``tg`` from now on (the owning cache's task group); a
        detached reconnect task started before (the remote was down at open) moves into the group."""
        self._tg = tg
        task, self._reconnect = self._reconnect, None
        if task is not None and not task.done():
            task.cancel()
            self._start_reconnect()

    def _start_reconnect(self) -> None:
        if self._closed or self._reconnecting or (self._reconnect is not None and not self._reconnect.done()):
            return
        if self._tg is not None:
            self._reconnecting = True
            self._tg.start_soon(self._reconnect_loop, True, name=f"kvpipe-reconnect {self._safe_url}")
            return
        try:
            backend = sniffio.current_async_library()
        except sniffio.AsyncLibraryNotFoundError:
            return
        if backend == "asyncio":
            self._reconnect = asyncio.get_running_loop().create_task(self._reconnect_loop(),
                                                                     name=f"kvpipe-reconnect {self._safe_url}")

    async def _probe(self, deadline: float) -> bool:
        try:
            with anyio.fail_after(deadline):
                await self.connector.ping()
        except (TimeoutError, TierError, *_DOWN) as exc:
            log.debug("remote %s still down: %s", self._safe_url, exc)
            return False
        return True

    async def _reconnect_loop(self, in_group: bool = False) -> None:
        delay = _FIRST_BACKOFF
        try:
            while not self._closed and not self._up:
                await anyio.sleep(delay)
                if await self._probe(self.timeout):
                    self._mark_up()
                    return
                delay = min(delay * 2, _MAX_BACKOFF)
        except Exception as exc:  # never let a connector bug take the cache's task group down
            log.warning("remote tier %s: reconnect loop failed: %r; retrying on the next failure", self._safe_url,
                        exc)
        finally:
            if in_group:
                self._reconnecting = False

    async def _maybe_probe_inline(self) -> None:
        """The fallback without a task group or asyncio loop: probe in the caller once the backoff has passed."""
        if (self._reconnect is not None or self._reconnecting or self._closed
                or time.monotonic() < self._next_probe):
            return
        if await self._probe(min(self.timeout, _INLINE_PROBE_MAX)):
            self._mark_up()
        else:
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF)
            self._next_probe = time.monotonic() + self._backoff

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T | _Failed:
        """Run one connector call under the deadline; failures are logged, counted and returned as ``_FAILED``."""
        if self._closed:
            return _FAILED
        if not self._up:
            await self._maybe_probe_inline()
            if not self._up:
                return _FAILED
        deadline = anyio.current_time() + self.timeout
        token = CALL_DEADLINE.set(deadline)
        try:
            # A bare CancelScope, not ``anyio.fail_after``: the same deadline without its generator-based context
            # manager, which was about 40% of this tier's own Python time per call (profiled here).
            with anyio.CancelScope(deadline=deadline):
                return await fn()
        except TimeoutError:  # the connector's own
            pass
        except _DOWN as exc:
            self._mark_down(f"{what}: {exc}")
            return _FAILED
        except TierError as exc:
            self._c["errors"] += 1
            self._warn(what, "remote tier %s: %s failed: %s", self._safe_url, what, exc)
            return _FAILED
        finally:
            CALL_DEADLINE.reset(token)
        # here only when the deadline ended the call (or the connector timed out)
        self._c["timeouts"] += 1
        self._mark_down(f"{what}: no answer within {self.timeout:g} s")
        return _FAILED

    # -- Tier API -----------------------------------------------------------------------------------------------
    async def contains_many(self, keys: Sequence[ChunkKey]) -> list[bool]:
        """Which keys have a complete entry (``False`` for all while the remote is down)."""
        if not keys:
            return []
        res = await self._call("exists", lambda: self.connector.exists_many([k.to_string() for k in keys]))
        return [False] * len(keys) if isinstance(res, _Failed) else res

    async def get_many(self, keys: Sequence[ChunkKey]) -> list[MemoryObj | None]:
        """The chunks under ``keys``, decoded into pool memory (``None`` for misses; the caller owns one ref)."""
        if not keys:
            return []
        uniq = list(dict.fromkeys(keys))
        strs = [k.to_string() for k in uniq]
        by_fp = {key_fingerprint(s): i for i, s in enumerate(strs)}
        by_key = {s: i for i, s in enumerate(strs)}
        by_fp_of = list(by_fp)
        serde, pool = self.ctx.serde, self.ctx.pool
        headers: dict[int, EntryHeader] = {}
        allocated: dict[int, MemoryObj] = {}
        no_memory: set[int] = set()

        def read_into(hb: bytes, key: str | None = None) -> memoryview | None:
            # ``key``: kvpipe's connectors say which entry the header came with (they may read a batch out of
            # order, e.g. a cluster's nodes concurrently); others are matched by the header's key fingerprint.
            try:
                h = EntryHeader.from_bytes(hb)
            except CorruptEntry:
                return None
            if key is not None:
                i = by_key.get(key)
                if i is not None and h.key_fp != by_fp_of[i]:
                    return None  # foreign: rejected (and deleted) after the read
            else:
                i = by_fp.get(h.key_fp)
            if i is None or i in headers or h.serde != serde.name:
                return None
            headers[i] = h
            if not serde.raw:
                return memoryview(bytearray(h.payload_len))
            if h.tensor_nbytes != h.payload_len:
                return None  # impossible for a raw serde: corrupt, rejected after the read
            try:
                obj = pool.allocate(h.shape, h.dtype, h.num_tokens)
            except CapacityError:
                obj = None
            if obj is None:
                no_memory.add(i)
                return None
            allocated[i] = obj
            return obj.byte_view

        try:
            res = await self._call("get", lambda: self.connector.get_many(strs, read_into))
            got: dict[ChunkKey, MemoryObj] = {}
            corrupt: list[str] = []
            if not isinstance(res, _Failed):
                for i, r in enumerate(res):
                    if r is None:
                        continue
                    obj = await self._decode(i, strs[i], r, headers, allocated, no_memory)
                    if obj is None:
                        continue
                    if obj is _CORRUPT:
                        corrupt.append(strs[i])
                        continue
                    got[uniq[i]] = obj  # type: ignore[assignment]
        finally:
            for obj in allocated.values():  # regions not handed out (misses, failures, cancellation)
                obj.release()
        if corrupt:
            self._c["corrupt"] += len(corrupt)
            self._warn("corrupt", "remote tier %s: %d corrupt, truncated or foreign entries, deleting them "
                       "(e.g. %s)", self._safe_url, len(corrupt), corrupt[0])
            n = await self._call("delete", lambda: self.connector.delete_many(corrupt))
            if not isinstance(n, _Failed):
                self._c["deletes"] += n
        out: list[MemoryObj | None] = []
        seen: set[ChunkKey] = set()
        for k in keys:
            obj = got.get(k)
            if obj is not None and k in seen:
                obj = obj.ref()  # a key asked twice: one reference per answer
            seen.add(k)
            out.append(obj)
        hits = sum(o is not None for o in out)
        self._c["hits"] += hits
        self._c["misses"] += len(out) - hits
        return out

    async def _decode(self, i: int, key: str, r: GetResult, headers: dict[int, EntryHeader],
                      allocated: dict[int, MemoryObj], no_memory: set[int]) -> MemoryObj | object | None:
        """One connector answer → a decoded chunk, ``None`` (plain miss) or ``_CORRUPT``."""
        hb, view = r[0], r[1]
        checksum = r[2] if len(r) > 2 else None  # type: ignore[misc]
        serde = self.ctx.serde
        try:
            h = headers.get(i) or EntryHeader.from_bytes(hb)
            h.check_key(key)
            if h.serde != serde.name:
                self._c["serde_mismatch"] += 1
                log.debug("remote entry %s was written with serde %r, this engine reads %r: miss", key, h.serde,
                          serde.name)
                return None
            if i in no_memory:
                self._c["no_memory"] += 1
                return None
            h.check_payload(view, len(view), checksum)
            self._c["bytes_read"] += len(view)
            if serde.raw:
                obj = allocated.pop(i, None)
                if obj is None:
                    raise CorruptEntry("payload not received into pool memory")
                return obj
            obj = self.ctx.pool.allocate(h.shape, h.dtype, h.num_tokens)
            if obj is None:
                self._c["no_memory"] += 1
                return None
            try:
                await anyio.to_thread.run_sync(serde.decode_into, view, obj.tensor, limiter=self._thread_limiter())
            except BaseException:
                obj.release()
                raise
            return obj
        except CorruptEntry as exc:
            log.debug("remote entry %s rejected: %s", key, exc)
            return _CORRUPT
        except CapacityError:
            self._c["no_memory"] += 1
            return None

    def _thread_limiter(self) -> anyio.CapacityLimiter:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(2)
        return self._limiter

    async def put_many(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj]) -> int:
        """Encode and store; returns how many were stored. While the remote is down nothing is sent: the
        stores are dropped and counted (``put_failures``)."""
        if not keys:
            return 0
        if not self.available:
            self._c["put_failures"] += len(keys)
            self._c["dropped_while_down"] += len(keys)
            return 0
        sizes: list[int] = []
        put_stream = getattr(self.connector, "put_stream", None)
        if put_stream is not None and len(keys) > 1:
            # Each entry goes out as soon as it is made: the remote takes in this chunk while the next is hashed.
            async def stream() -> int:
                async with aclosing(self._entries(keys, objs, sizes)) as entries:
                    return int(await put_stream(entries))
            n = await self._call("put", stream)
        else:
            items = [e async for e in self._entries(keys, objs, sizes)]
            n = await self._call("put", lambda: self.connector.put_many(items))
        if isinstance(n, _Failed):
            n = 0
        self._c["puts"] += n
        self._c["put_failures"] += len(keys) - n
        self._c["bytes_written"] += sum(sizes[:n])
        return n

    async def _entries(self, keys: Sequence[ChunkKey], objs: Sequence[MemoryObj], sizes: list[int]
                       ) -> AsyncGenerator[Entry, None]:
        """``(key, header, payload)`` per chunk, encoded and hashed one at a time; ``sizes`` gets each payload's
        size."""
        serde = self.ctx.serde
        for k, obj in zip(keys, objs, strict=True):
            if serde.raw:
                # A raw serde's payload is the region's bytes: taken as a plain memoryview slice, no torch call
                # (right after a transfer wakes this process, a torch call here cost ~0.1 ms on this VM).
                payload = obj.byte_view
                csum = await obj.checksum()  # memoized: computed once per chunk, by the first tier that needs it
                kv: Described = obj
            else:
                payload, csum = await anyio.to_thread.run_sync(_encode_and_hash, serde, obj.tensor,
                                                               limiter=self._thread_limiter())
                kv = obj.tensor
            s = k.to_string()
            header = EntryHeader.for_payload(s, serde.name, kv, obj.num_tokens, None, payload.nbytes,
                                             checksum=csum)
            sizes.append(payload.nbytes)
            yield s, header.to_bytes(), payload

    async def delete_many(self, keys: Sequence[ChunkKey]) -> int:
        """Delete entries; returns how many existed (0 while the remote is down)."""
        if not keys:
            return 0
        n = await self._call("delete", lambda: self.connector.delete_many([k.to_string() for k in keys]))
        if isinstance(n, _Failed):
            return 0
        self._c["deletes"] += n
        return n

    def statistics(self) -> TierStats:
        """Counters of this process's traffic (the remote's own size is not known here: ``chunks``/``bytes``
        are 0; ``kvpipe inspect --remote`` reports them)."""
        c = self._c
        return TierStats(name=self.name, chunks=0, bytes=0, hits=c["hits"], misses=c["misses"], puts=c["puts"],
                         put_failures=c["put_failures"], corrupt=c["corrupt"], evictions=0,
                         available=self.available, extra={k: float(v) for k, v in c.items()
                                                          if k not in ("hits", "misses", "puts", "put_failures",
                                                                       "corrupt")})

    async def aclose(self) -> None:
        """Stop reconnecting and close the connector; idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._reconnect = self._reconnect, None
        with anyio.CancelScope(shield=True):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
            try:
                with anyio.move_on_after(5):
                    await self.connector.aclose()
            except Exception as exc:
                log.debug("closing connector %s: %s", self._safe_url, exc)


_CORRUPT: Any = object()


def _encode_and_hash(serde: Serde, kv: torch.Tensor) -> tuple[memoryview, int]:
    """Encode ``kv`` and hash the payload (on a worker thread: neither holds the GIL for long)."""
    payload = memoryview(serde.encode(kv)).cast("B")
    return payload, payload_checksum(payload)


async def open_remote_tier(url: str, ctx: TierContext, connector: Connector) -> RemoteTier:
    """The remote tier for ``url`` over ``connector`` (from the ``kvpipe_connector_for_url`` hook).

    Opening pings the remote once under the deadline; an unreachable remote does not fail the open: the tier
    starts down and comes up by itself when the remote answers.
    """
    timeout = float(getattr(ctx.config, "blocking_timeout_secs", 10.0))
    tier = RemoteTier(url=url, connector=connector, ctx=ctx, timeout=timeout)
    try:
        with anyio.fail_after(timeout):
            await connector.ping()
    except TimeoutError:
        tier._mark_down(f"ping: no answer within {timeout:g} s")
    except (TierError, *_DOWN) as exc:
        tier._mark_down(f"ping: {exc}")
    return tier
