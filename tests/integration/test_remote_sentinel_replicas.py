"""Sentinel reads from replicas (``redis-sentinel://...?read_from_replicas=true``) on the real master + replica +
3 Sentinels: reads are served by the replica (its own ``keyspace_hits`` count them, the master's do not move),
writes and clean-ups go to the master, bad entries are still caught by the header/checksum validation, a dead
replica sends reads back to the master without taking the tier down, and failover still works (the replica keeps
answering reads while the master is gone)."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import anyio
import pytest
import redis
import torch
from remote_fixtures import (
    chunk,
    chunk_tensor,
    gives_up_while_paused,
    key,
    make_ctx,
    open_tier,
    read_checked,
    release_all,
)
from servers import ValkeySentinel, redis_command, replication_settled

from kvpipe.connectors.redis import RedisConnector
from kvpipe.errors import ConfigError
from kvpipe.keys import ChunkKey
from kvpipe.tiers.remote import RemoteTier


def _hits(port: int) -> int:
    """``keyspace_hits`` of the server on ``port`` (``INFO stats``)."""
    info = redis_command(port, "INFO", "stats").decode()
    return int(next(line for line in info.splitlines() if line.startswith("keyspace_hits:")).split(":")[1])


async def _read_all(tier: RemoteTier, keys: list[ChunkKey], seeds: list[int]) -> int:
    """How many of ``keys`` hit (each hit checked against its seed's KV)."""
    return sum(await read_checked(tier, keys, seeds))


async def _settled(master_port: int) -> None:
    """Wait until the replica acknowledged everything the master wrote (so a replica read must hit)."""
    deadline = time.monotonic() + 10
    while not replication_settled(master_port):
        assert time.monotonic() < deadline, "replica did not catch up"
        await anyio.sleep(0.02)


async def _three_on_the_replica(tier: RemoteTier, topo: ValkeySentinel, model: str) -> list[ChunkKey]:
    """Store chunks 0-2 of ``model`` through ``tier`` and wait until the replica has them; their keys."""
    keys = [key(model, i) for i in range(3)]
    assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
    await _settled(topo.master.port)
    return keys


async def _wait_until(cond: Callable[[], bool], limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if cond():
            return True
        await anyio.sleep(0.05)
    return cond()


async def test_reads_are_served_by_the_replica(sentinel: ValkeySentinel, key_model: str) -> None:
    master, replica = sentinel.master.port, sentinel.replica.port
    assert sentinel.current_master_port() == master
    tier = await open_tier(sentinel.url + "?read_from_replicas=true")
    plain = await open_tier(sentinel.url)  # the default: reads from the master
    try:
        keys = [key(key_model, i) for i in range(6)]
        assert await tier.put_many(keys, [chunk(i) for i in range(6)]) == 6
        await _settled(master)
        m0, r0 = _hits(master), _hits(replica)
        for _ in range(3):
            assert sum(await read_checked(tier, keys, list(range(6)))) == 6
        assert await tier.contains_many(keys) == [True] * 6
        m1, r1 = _hits(master), _hits(replica)
        assert m1 == m0, "a read went to the master"
        assert r1 - r0 >= 3 * 6 * 2  # GET metadata + GET kv_bytes per entry and round (EXISTS counts too)
        # Control: without the option the same reads go to the master.
        assert await _read_all(plain, keys, list(range(6))) == 6
        assert _hits(master) - m1 >= 12 and _hits(replica) == r1
        # Writes and deletes went to the master (a replica refuses them: READONLY) and replicate.
        assert await tier.delete_many(keys[:2]) == 2
        await _settled(master)
        assert await tier.contains_many(keys) == [False, False] + [True] * 4
        assert tier.available and tier.statistics().extra["down_events"] == 0
    finally:
        await tier.aclose()
        await plain.aclose()


async def test_bad_entries_read_from_the_replica_are_caught_and_cleaned(sentinel: ValkeySentinel, key_model: str
                                                                        ) -> None:
    master = sentinel.master.port
    r = redis.Redis(port=master)
    tier = await open_tier(sentinel.url + "?read_from_replicas=true")
    try:
        keys = [key(key_model, i) for i in range(3)]
        s = [k.to_string() for k in keys]
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
        r.setrange(s[0] + "kv_bytes", 100, b"\xde\xad\xbe\xef")  # a stale/corrupt payload
        r.delete(s[1] + "metadata")  # half an entry
        await _settled(master)
        r0 = _hits(sentinel.replica.port)
        got = await tier.get_many(keys)
        assert got[0] is None and got[1] is None and got[2] is not None
        assert torch.equal(got[2].tensor, chunk_tensor(2))
        release_all(got)
        assert _hits(sentinel.replica.port) > r0  # it was the replica that answered
        assert tier.statistics().corrupt == 1
        # Cleaned up on the master (then replicated).
        assert not any(r.exists(s[i] + sfx) for i in range(2) for sfx in ("kv_bytes", "metadata"))
    finally:
        await tier.aclose()
        r.close()


async def test_entry_missing_on_a_lagging_replica_is_a_plain_miss(sentinel: ValkeySentinel, key_model: str) -> None:
    """A replica that has not received an entry yet (made here by deleting it on the replica alone, which is
    made writable for the moment) answers a miss; nothing is deleted on the master, and the master still
    serves it to a reader without the option."""
    master, replica = redis.Redis(port=sentinel.master.port), redis.Redis(port=sentinel.replica.port)
    tier = await open_tier(sentinel.url + "?read_from_replicas=true")
    plain = await open_tier(sentinel.url)
    try:
        keys = [key(key_model, i) for i in range(2)]
        assert await tier.put_many(keys, [chunk(i) for i in range(2)]) == 2
        await _settled(sentinel.master.port)
        s0 = keys[0].to_string()
        replica.config_set("replica-read-only", "no")
        try:
            assert replica.delete(s0 + "metadata", s0 + "kv_bytes") == 2
        finally:
            replica.config_set("replica-read-only", "yes")
        assert await _read_all(tier, keys, [0, 1]) == 1
        assert await tier.contains_many(keys) == [False, True]
        st = tier.statistics()
        assert (st.hits, st.misses, st.corrupt) == (1, 1, 0)
        assert master.exists(s0 + "metadata", s0 + "kv_bytes") == 2  # not cleaned up: it is not broken
        assert await _read_all(plain, keys, [0, 1]) == 2
    finally:
        await tier.aclose()
        await plain.aclose()
        master.close()
        replica.close()


async def test_dead_replica_reads_fall_back_to_the_master(fresh_sentinel: ValkeySentinel, key_model: str) -> None:
    topo = fresh_sentinel
    tier = await open_tier(topo.url + "?read_from_replicas=true", make_ctx(timeout=2.0))
    try:
        keys = [key(key_model, i) for i in range(4)]
        assert await tier.put_many(keys, [chunk(i) for i in range(4)]) == 4
        await _settled(topo.master.port)
        assert sum(await read_checked(tier, keys, list(range(4)))) == 4  # from the replica (pooled connection)
        m0 = _hits(topo.master.port)
        await anyio.to_thread.run_sync(topo.replica.kill)
        for _ in range(3):
            assert sum(await read_checked(tier, keys, list(range(4)))) == 4
            assert await tier.contains_many(keys) == [True] * 4
        assert _hits(topo.master.port) - m0 >= 3 * 4 * 2
        s = tier.statistics()
        assert tier.available and s.extra["down_events"] == 0 and s.misses == 0
    finally:
        await tier.aclose()


async def test_hung_replica_costs_one_deadline_then_reads_go_to_the_master(fresh_sentinel: ValkeySentinel,
                                                                          key_model: str) -> None:
    """A replica that stops answering (SIGSTOP: connections stay open, nothing comes back) makes one read miss at
    the tier's deadline; the replica is then left out and reads hit from the master, with no further down
    event."""
    topo = fresh_sentinel
    tier = await open_tier(topo.url + "?read_from_replicas=true", make_ctx(timeout=1.0))
    proc = topo.replica.proc
    assert proc is not None
    try:
        keys = await _three_on_the_replica(tier, topo, key_model)
        assert await _read_all(tier, keys, [0, 1, 2]) == 3
        proc.send_signal(signal.SIGSTOP)
        assert await _read_all(tier, keys, [0, 1, 2]) == 0  # the deadline decided: misses
        assert await _wait_until(lambda: tier.available, 5)
        downs = tier.statistics().extra["down_events"]
        assert downs == 1
        m0 = _hits(topo.master.port)
        for _ in range(5):
            assert await _read_all(tier, keys, [0, 1, 2]) == 3
        assert _hits(topo.master.port) - m0 >= 5 * 3 * 2
        assert tier.available and tier.statistics().extra["down_events"] == downs
    finally:
        proc.send_signal(signal.SIGCONT)
        await tier.aclose()


async def test_a_caller_giving_up_is_not_blamed_on_the_replica(sentinel: ValkeySentinel, key_model: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """A read cut off by the caller's own deadline (0.3 s, on a paused replica: SIGSTOP) is the caller's doing, not
    the replica's: it is not left out for it, and once it resumes the next reads go to it again. (It used to be
    left out for 5 s after any cancellation, an engine's aborted request included.)"""
    topo = sentinel
    tier = await open_tier(topo.url + "?read_from_replicas=true", make_ctx(timeout=10.0))
    try:
        keys = await _three_on_the_replica(tier, topo, key_model)
        # the read waits on the paused replica until the caller gives up
        assert await gives_up_while_paused(topo.replica.proc, lambda: tier.get_many(keys))
        m0 = _hits(topo.master.port)
        assert await _read_all(tier, keys, [0, 1, 2]) == 3
        assert _hits(topo.master.port) == m0, "the replica was left out: the reads went to the master"
        assert "failed" not in caplog.text
        assert tier.available and tier.statistics().extra["down_events"] == 0
    finally:
        await tier.aclose()


async def test_failover_with_replica_reads(fresh_sentinel: ValkeySentinel, key_model: str) -> None:
    topo = fresh_sentinel
    tier = await open_tier(topo.url + "?read_from_replicas=true", make_ctx(timeout=1.0))
    try:
        before = [key(key_model, i) for i in range(5)]
        assert await tier.put_many(before, [chunk(i) for i in range(5)]) == 5
        await _settled(topo.master.port)
        m0 = _hits(topo.master.port)
        assert sum(await read_checked(tier, before, list(range(5)))) == 5
        assert _hits(topo.master.port) == m0, "reads went to the master: the tier did not know the replica"
        await anyio.to_thread.run_sync(topo.master.kill)
        # The replica still answers reads while the master is gone (stale data is still validated).
        assert sum(await read_checked(tier, before, list(range(5)))) == 5
        # Through the failover: misses and dropped stores allowed, never an exception or wrong KV.
        deadline = time.monotonic() + 40
        n, resumed = 100, False
        while time.monotonic() < deadline:
            n += 1
            sum(await read_checked(tier, before, list(range(5))))
            k = key(key_model, n)
            await tier.put_many([k], [chunk(n % 50)])
            if await _read_all(tier, [k], [n % 50]) == 1:
                resumed = True
                break
            await anyio.sleep(0.05)
        assert resumed, "no hits after the failover"
        assert await _wait_until(lambda: topo.current_master_port() == topo.replica.port, 5)
        assert sum(await read_checked(tier, before, list(range(5)))) == 5  # replicated before the failover
        assert tier.statistics().extra["down_events"] >= 1
    finally:
        await tier.aclose()


def test_read_from_replicas_option_values() -> None:
    url = "redis-sentinel://127.0.0.1:26379,127.0.0.1:26380"
    assert RedisConnector.from_url(url + "?read_from_replicas=true").read_from_replicas
    assert not RedisConnector.from_url(url + "?read_from_replicas=0").read_from_replicas
    assert not RedisConnector.from_url(url).read_from_replicas
    with pytest.raises(ConfigError, match="read_from_replicas must be true or false"):
        RedisConnector.from_url(url + "?read_from_replicas=sometimes")
    with pytest.raises(ConfigError, match="a single server has no replicas to read from"):
        RedisConnector.from_url("redis://127.0.0.1:6379?read_from_replicas=true")
    assert RedisConnector.from_url("redis-cluster://127.0.0.1:7000?read_from_replicas=true").read_from_replicas
