"""Fault behaviour of remote tiers: unreachable at start, stop/restart under load, Sentinel failover mid-stream,
deadlines on a slow remote. The caller never sees an exception, never gets wrong KV, and hits come back by
themselves."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest
import torch
from remote_fixtures import SHAPE, chunk, chunk_tensor, key, make_ctx, open_tier, release_all
from servers import LmServerProc, ServerProc, ValkeySentinel, free_port, lm_server, redis_command, valkey_server

from kvpipe.connectors.base import Connector
from kvpipe.connectors.mock import MockConnector
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import MemoryObj
from kvpipe.tiers.remote import RemoteTier


class _Counting:
    """A connector seen through a proxy that counts its data calls (not ``ping``) by name."""

    DATA = ("get_many", "exists_many", "put_many", "put_stream", "delete_many")

    def __init__(self, conn: Connector) -> None:
        self._conn = conn
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in self.DATA:
            return attr

        def counted(*a: Any, **kw: Any) -> Any:
            self.calls[name] = self.calls.get(name, 0) + 1
            return attr(*a, **kw)
        return counted


async def _wait_until(cond: Callable[[], bool], limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        await anyio.sleep(0.02)
    return cond()


async def _hit_roundtrip(tier: RemoteTier, k: ChunkKey, i: int) -> bool:
    """Store chunk ``i`` under ``k`` and read it back; ``True`` on a (correct) hit. Wrong KV fails the test."""
    await tier.put_many([k], [chunk(i)])
    (got,) = await tier.get_many([k])
    if got is None:
        return False
    try:
        assert torch.equal(got.tensor, chunk_tensor(i)), f"wrong KV for {k}"
    finally:
        got.release()
    return True


@pytest.mark.parametrize("kind", ["redis", "lm"])
async def test_unreachable_at_open_then_comes_up(kind: str, tmp_path: pytest.TempPathFactory, key_model: str
                                                 ) -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}" if kind == "redis" else f"lm://127.0.0.1:{port}"
    conn = connector_for_url(url, make_ctx().config)
    assert conn is not None
    counting = _Counting(conn)
    tier = await open_tier(url, make_ctx(timeout=1.0), connector=counting)  # type: ignore[arg-type]
    server: ServerProc = (valkey_server(tmp_path, port=port) if kind == "redis"  # type: ignore[arg-type]
                          else lm_server(tmp_path, port=port))  # type: ignore[arg-type]
    try:
        assert not tier.available
        k = key(key_model, 0)
        assert await tier.get_many([k]) == [None]
        assert await tier.contains_many([k]) == [False]
        assert await tier.put_many([k], [chunk(0)]) == 0
        assert await tier.delete_many([k]) == 0
        assert counting.calls == {}  # misses at once: no data call went to the remote while it was down
        s = tier.statistics()
        assert s.put_failures == 1 and not s.available
        server.start()
        assert await _wait_until(lambda: tier.available, 5.0)
        assert await _hit_roundtrip(tier, k, 0)
        assert counting.calls.get("get_many", 0) >= 1  # once up, calls go through (the proxy does count)
    finally:
        await tier.aclose()
        server.stop()


async def _stop_restart_under_load(server: ServerProc, url: str, key_model: str) -> None:
    tier = await open_tier(url, make_ctx(timeout=1.0))
    errors: list[BaseException] = []
    hits_after_restart: list[float] = []
    restarted_at: list[float] = []
    stop = anyio.Event()

    async def load(worker: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            n = worker * 100000 + i
            try:
                if await _hit_roundtrip(tier, key(key_model, n), n % 50) and restarted_at:
                    hits_after_restart.append(time.monotonic())
            except AssertionError:
                raise
            except BaseException as exc:
                errors.append(exc)
                raise
            await anyio.sleep(0.005)

    try:
        async with anyio.create_task_group() as tg:
            for w in range(3):
                tg.start_soon(load, w)
            await anyio.sleep(0.5)
            assert tier.statistics().hits > 0
            await anyio.to_thread.run_sync(server.stop)
            await anyio.sleep(1.0)
            assert not tier.available
            await anyio.to_thread.run_sync(server.start)
            restarted_at.append(time.monotonic())
            await _wait_until(lambda: bool(hits_after_restart), 5.0)
            stop.set()
        assert not errors
        assert hits_after_restart, "no hit within 5 s of the restart"
        assert hits_after_restart[0] - restarted_at[0] < 5.0
        assert tier.available and tier.statistics().extra["down_events"] >= 1
    finally:
        await tier.aclose()


async def test_redis_stop_restart_under_load(fresh_valkey: ServerProc, key_model: str) -> None:
    await _stop_restart_under_load(fresh_valkey, f"redis://127.0.0.1:{fresh_valkey.port}", key_model)


async def test_lm_server_stop_restart_under_load(fresh_lm: LmServerProc, key_model: str) -> None:
    await _stop_restart_under_load(fresh_lm, fresh_lm.url, key_model)


async def test_sentinel_failover_mid_stream(fresh_sentinel: ValkeySentinel, key_model: str) -> None:
    topo = fresh_sentinel
    tier = await open_tier(topo.url, make_ctx(timeout=1.0))
    try:
        before = [key(key_model, i) for i in range(5)]
        assert await tier.put_many(before, [chunk(i) for i in range(5)]) == 5
        got = await tier.get_many(before)
        assert all(g is not None for g in got)
        release_all(got)
        old_master = topo.current_master_port()
        assert old_master == topo.master.port
        # Replication is asynchronous: let the replica acknowledge these writes before the master dies, or the
        # new master may rightly not have them.
        acked = await anyio.to_thread.run_sync(redis_command, topo.master.port, "WAIT", "1", "4000")
        assert acked.startswith(b":1"), acked
        await anyio.to_thread.run_sync(topo.master.kill)
        # Keep serving through the failover: misses and dropped stores, never an exception or wrong KV.
        deadline = time.monotonic() + 40
        n = 100
        resumed = False
        while time.monotonic() < deadline:
            n += 1
            if await _hit_roundtrip(tier, key(key_model, n), n % 50):
                resumed = True
                break
            await anyio.sleep(0.05)
        assert resumed, "no hits after the failover"
        assert topo.current_master_port() == topo.replica.port
        # Entries written before the failover were replicated: read them from the new master.
        got = await tier.get_many(before)
        for i, g in enumerate(got):
            if g is not None:
                assert torch.equal(g.tensor, chunk_tensor(i))
        assert sum(g is not None for g in got) >= 1
        release_all(got)
        assert tier.statistics().extra["down_events"] >= 1
    finally:
        await tier.aclose()


async def test_slow_remote_deadline_marks_down_then_recovers(key_model: str) -> None:
    conn = MockConnector.from_url(f"mock://{key_model}")
    tier = await open_tier(conn.url, make_ctx(timeout=0.2), connector=conn)
    try:
        k = key(key_model, 0)
        assert await tier.put_many([k], [chunk(0)]) == 1
        conn.latency_s = 3600.0  # an hour: only the 0.2 s deadline can end the call
        with anyio.fail_after(60):
            assert await tier.get_many([k]) == [None]
        assert not tier.available and tier.statistics().extra["timeouts"] == 1
        assert await tier.get_many([k]) == [None]  # down: immediate miss
        conn.latency_s = 0.0
        assert await _wait_until(lambda: tier.available, 5.0)
        (got,) = await tier.get_many([k])
        assert got is not None and torch.equal(got.tensor, chunk_tensor(0))
        got.release()
    finally:
        await tier.aclose()


async def test_outage_drops_and_counts_writes(key_model: str) -> None:
    conn = MockConnector.from_url(f"mock://{key_model}")
    tier = await open_tier(conn.url, make_ctx(timeout=1.0), connector=conn)
    try:
        conn.set_down()
        keys = [key(key_model, i) for i in range(3)]
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 0  # fails: marks down
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 0  # down: dropped at once
        s = tier.statistics()
        assert s.put_failures == 6 and s.extra["dropped_while_down"] == 3 and not s.available
        conn.set_down(False)
        assert await _wait_until(lambda: tier.available, 5.0)
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
    finally:
        await tier.aclose()


@pytest.mark.parametrize("kind", ["redis", "lm"])
async def test_server_killed_while_a_batch_streams(kind: str, request: pytest.FixtureRequest,
                                                   key_model: str) -> None:
    """A server SIGKILLed while a batch of PUTs streams to it (after the first chunk went out, before the second
    is made): ``put_many`` returns fewer than the batch (what it could confirm), raises nothing and does not hang;
    the tier is down, comes back with the server, and what it then reads is right or a miss."""
    server: ServerProc = request.getfixturevalue("fresh_valkey" if kind == "redis" else "fresh_lm")
    url = f"redis://127.0.0.1:{server.port}" if kind == "redis" else server.url  # type: ignore[attr-defined]
    tier = await open_tier(url, make_ctx(timeout=2.0))
    killed = anyio.Event()

    class KilledFirst(MemoryObj):
        async def checksum(self) -> int:  # the tier makes chunk 1's entry only once the server is dead
            await killed.wait()
            return await super().checksum()

    keys = [key(key_model, i) for i in range(8)]
    objs = [chunk(0)] + [KilledFirst.detached(chunk_tensor(i), SHAPE[2]) for i in range(1, 8)]
    try:
        async def kill_when_the_first_lands() -> None:
            watcher = await open_tier(url, make_ctx(timeout=2.0))
            try:
                with anyio.move_on_after(10):
                    while not (await watcher.contains_many(keys[:1]))[0]:
                        await anyio.sleep(0.005)
            finally:
                await watcher.aclose()
            await anyio.to_thread.run_sync(server.kill)
            killed.set()

        stored = -1
        with anyio.fail_after(20):  # "does not hang": far above the tier's own 2 s deadline
            async with anyio.create_task_group() as tg:
                tg.start_soon(kill_when_the_first_lands)
                stored = await tier.put_many(keys, objs)
        assert 0 <= stored < 8
        s = tier.statistics()
        assert not s.available and s.put_failures == 8 - stored
        await anyio.to_thread.run_sync(server.start)
        assert await _wait_until(lambda: tier.available, 5.0)
        got = await tier.get_many(keys)
        for g, i in zip(got, range(8), strict=True):
            assert g is None or torch.equal(g.tensor, chunk_tensor(i)), f"wrong KV for chunk {i}"
        release_all(got)
        assert await tier.put_many(keys[:4], [chunk(i) for i in range(4)]) == 4  # and it stores again
    finally:
        await tier.aclose()
