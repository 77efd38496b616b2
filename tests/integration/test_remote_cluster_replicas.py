"""Cluster reads from replicas (``redis-cluster://...?read_from_replicas=true``) on a real 3-master + 3-replica
Valkey cluster: reads go to the replicas (their ``keyspace_hits`` rise, the masters' do not) and return the right
KV; with a replica killed, its slots' reads fall back to their master within the same call: all hits, nothing
raised, the tier stays up; half entries seen on replicas are cleaned up when the masters hold half of them too."""

from __future__ import annotations

import time

import anyio
import pytest
import redis
from redis.crc import key_slot
from remote_fixtures import chunk, key, open_tier, read_checked
from servers import ValkeyCluster, redis_command, replication_settled, slot_owners

from kvpipe.keys import ChunkKey
from kvpipe.tiers.remote import RemoteTier


def _hits(port: int) -> int:
    info = redis_command(port, "INFO", "stats").decode(errors="replace")
    return int(next(x for x in info.splitlines() if x.startswith("keyspace_hits:")).split(":")[1])


async def _settled(c: ValkeyCluster) -> None:
    """Until every replica has the whole stream and ``CLUSTER SLOTS`` lists a replica for every range (Valkey
    leaves out a replica that has not synced anything yet)."""
    deadline = time.monotonic() + 10
    while not all(replication_settled(p) for p in c.master_ports()) or not _replicas_listed(c):
        assert time.monotonic() < deadline, "replicas did not catch up"
        await anyio.sleep(0.05)


def _replicas_listed(c: ValkeyCluster) -> bool:
    port = next(n.port for n in c.nodes if n.running)
    r = redis.Redis(port=port)
    try:
        return all(len(rng) > 3 for rng in r.execute_command("CLUSTER", "SLOTS"))
    finally:
        r.close()


async def _written_then_replica_reader(c: ValkeyCluster, key_model: str, n: int) -> tuple[list[ChunkKey], RemoteTier]:
    """``n`` chunks stored through a tier that uses the masters only, the replicas caught up, and a tier that
    reads from the replicas (opened now, so its first slot map lists them)."""
    keys = [key(key_model, i) for i in range(n)]
    writer = await open_tier(c.url)
    try:
        assert await writer.put_many(keys, [chunk(i) for i in range(n)]) == n
    finally:
        await writer.aclose()
    await _settled(c)
    return keys, await open_tier(c.url + "?read_from_replicas=true")


async def test_reads_go_to_the_replicas(cluster_replicas: ValkeyCluster, key_model: str) -> None:
    c = cluster_replicas
    keys, tier = await _written_then_replica_reader(c, key_model, 6)
    try:
        masters = set(c.master_ports())
        replicas = {n.port for n in c.nodes if n.running} - masters
        assert len(masters) == 3 and len(replicas) == 3
        before = {p: _hits(p) for p in masters | replicas}
        assert await read_checked(tier, keys, list(range(6))) == [True] * 6
        assert await tier.contains_many(keys) == [True] * 6
        after = {p: _hits(p) for p in masters | replicas}
        assert sum(after[p] - before[p] for p in replicas) >= 12  # each entry's header and payload
        assert all(after[p] == before[p] for p in masters)
    finally:
        await tier.aclose()


async def test_orphans_seen_on_replicas_are_cleaned_on_the_masters(cluster_replicas: ValkeyCluster,
                                                                  key_model: str) -> None:
    c = cluster_replicas
    keys, tier = await _written_then_replica_reader(c, key_model, 6)
    try:
        owners = slot_owners(c)

        def on_master(*cmd: str) -> bytes:
            return redis_command(owners[key_slot(cmd[1].encode())], *cmd)

        k0, k1 = keys[0].to_string(), keys[1].to_string()
        assert on_master("DEL", k0 + "metadata").startswith(b":1")  # a payload without header
        assert on_master("DEL", k1 + "kv_bytes").startswith(b":1")  # a header without payload
        await _settled(c)
        replicas = {n.port for n in c.nodes if n.running} - set(c.master_ports())
        before = {p: _hits(p) for p in replicas}
        hits = await read_checked(tier, keys, list(range(6)))
        assert hits == [False, False, True, True, True, True]
        assert sum(_hits(p) - before[p] for p in replicas) >= 8  # the reads went to the replicas
        # confirmed half on the masters, and deleted there
        assert on_master("EXISTS", k0 + "kv_bytes").startswith(b":0")
        assert on_master("EXISTS", k1 + "metadata").startswith(b":0")
        for k in keys[2:]:  # whole entries untouched
            s = k.to_string()
            assert on_master("EXISTS", s + "kv_bytes").startswith(b":1")
            assert on_master("EXISTS", s + "metadata").startswith(b":1")
    finally:
        await tier.aclose()


async def test_a_killed_replica_falls_back_to_its_master(cluster_replicas: ValkeyCluster, key_model: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    c = cluster_replicas
    keys, tier = await _written_then_replica_reader(c, key_model, 12)
    try:
        masters = set(c.master_ports())
        victim = next(n for n in c.nodes if n.running and n.port not in masters)
        victim.kill()
        for _ in range(2):  # the first read meets the dead replica, the second leaves it out
            assert await read_checked(tier, keys, list(range(12))) == [True] * 12
        assert tier.available
        assert f"replica 127.0.0.1:{victim.port} failed" in caplog.text  # it was met, and left out
    finally:
        await tier.aclose()

