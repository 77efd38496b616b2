"""The tier contract over every remote (redis, Sentinel, cluster, lm://, mock://): bit-identical round trips,
misses, corrupt/truncated/foreign entries as misses that are cleaned up, entries deleted underneath, idempotent
close; plus what only Redis has (SETRANGE, one half of an entry deleted by hand, redis-cli visible layout)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
import redis
import redis.cluster
import torch
from remote_fixtures import (
    SHAPE,
    assert_round_trip,
    chunk,
    chunk_tensor,
    key,
    make_ctx,
    open_tier,
    read_checked,
    release_all,
    url_for,
)
from servers import ServerProc, ValkeyCluster, ValkeySentinel, valkey_server

from kvpipe.config import Config
from kvpipe.connectors.inspect import inspect_remote
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.keys import ChunkKey
from kvpipe.memory.pool import MemoryObj
from kvpipe.serde.entry import EntryHeader
from kvpipe.tiers.remote import RemoteTier


async def test_round_trip_bit_identical(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    try:
        keys = [key(key_model, i) for i in range(4)]
        objs = [chunk(i) for i in range(4)]
        assert await tier.put_many(keys, objs) == 4
        assert await tier.contains_many(keys) == [True] * 4
        got = await tier.get_many(keys)
        assert all(g is not None for g in got)
        for g, o in zip(got, objs, strict=True):
            assert g is not None
            assert g.tensor.dtype == o.tensor.dtype and g.tensor.shape == o.tensor.shape
            assert torch.equal(g.tensor, o.tensor)
            assert g.num_tokens == o.num_tokens
        release_all(got)
        assert tier.ctx.pool.used == 0  # every region came back
        s = tier.statistics()
        assert s.hits == 4 and s.puts == 4 and s.available
    finally:
        await tier.aclose()


async def test_dtypes_and_mla_shapes(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    try:
        cases = [((2, 2, 16, 2, 8), torch.float16), ((2, 2, 16, 2, 8), torch.bfloat16), ((3, 1, 16, 32), torch.float32)]
        keys = [key(key_model, i, dtype=str(dt).removeprefix("torch.")) for i, (_, dt) in enumerate(cases)]
        objs = [chunk(i, shape, dt) for i, (shape, dt) in enumerate(cases)]
        assert await tier.put_many(keys, objs) == 3
        got = await tier.get_many(keys)
        for g, o in zip(got, objs, strict=True):
            assert g is not None and torch.equal(g.tensor, o.tensor)
        release_all(got)
    finally:
        await tier.aclose()


async def test_misses_and_duplicates(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    try:
        k0, k1 = key(key_model, 0), key(key_model, 1)
        assert await tier.get_many([k0, k1]) == [None, None]
        assert await tier.contains_many([k0]) == [False]
        assert await tier.put_many([k0], [chunk(0)]) == 1
        got = await tier.get_many([k1, k0, k0])
        assert got[0] is None and got[1] is not None and got[2] is not None
        assert torch.equal(got[1].tensor, chunk_tensor(0)) and torch.equal(got[2].tensor, chunk_tensor(0))
        release_all(got)
        assert tier.ctx.pool.used == 0
        assert await tier.get_many([]) == [] and await tier.put_many([], []) == 0
    finally:
        await tier.aclose()


async def test_deleted_underneath_is_a_miss(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    other = await open_tier(remote_url, connector=None)
    try:
        k = key(key_model, 0)
        await tier.put_many([k], [chunk(0)])
        # For mock:// the second tier shares the store only when the URL names it; the URL is the same here.
        assert await other.delete_many([k]) == 1
        assert await tier.get_many([k]) == [None]
        assert await tier.delete_many([k]) == 0
    finally:
        await tier.aclose()
        await other.aclose()


def _entry(k: str, t: torch.Tensor, num_tokens: int = 16) -> tuple[bytes, bytes]:
    payload = t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    return EntryHeader.for_payload(k, "naive", t, num_tokens, payload, len(payload)).to_bytes(), payload


async def test_corrupt_truncated_foreign_entries_are_misses_and_cleaned(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    try:
        keys = [key(key_model, i) for i in range(6)]
        s = [k.to_string() for k in keys]
        good_h, good_p = _entry(s[0], chunk_tensor(0))
        h1, p1 = _entry(s[1], chunk_tensor(1))
        flipped = bytearray(p1)
        flipped[100] ^= 0xFF
        h2, p2 = _entry(s[2], chunk_tensor(2))
        h3, p3 = _entry(s[0], chunk_tensor(3))  # an entry of key 0 stored under key 3: foreign
        h5, p5 = _entry(s[5], chunk_tensor(5))
        items = [
            (s[0], good_h, memoryview(good_p)),
            (s[1], h1, memoryview(bytes(flipped))),       # payload bit flip
            (s[2], h2, memoryview(p2[: len(p2) // 2])),    # truncated payload
            (s[3], h3, memoryview(p3)),                    # foreign
            (s[4], b"\x00" * 80, memoryview(p2)),          # garbage header
            (s[5], h5, memoryview(p5 + b"tail")),          # too long
        ]
        assert await tier.connector.put_many(items) == 6
        got = await tier.get_many(keys)
        assert got[0] is not None and torch.equal(got[0].tensor, chunk_tensor(0))
        assert got[1:] == [None] * 5
        release_all(got)
        assert tier.ctx.pool.used == 0
        assert tier.statistics().corrupt == 5
        assert await tier.contains_many(keys) == [True] + [False] * 5  # cleaned up
    finally:
        await tier.aclose()


async def test_other_serde_is_a_plain_miss_not_deleted(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    try:
        k = key(key_model, 0)
        t = chunk_tensor(0)
        payload = t.view(-1).view(torch.uint8).numpy().tobytes()
        h = EntryHeader.for_payload(k.to_string(), "cachegen", t, 16, payload, len(payload)).to_bytes()
        await tier.connector.put_many([(k.to_string(), h, memoryview(payload))])
        assert await tier.get_many([k]) == [None]
        assert await tier.contains_many([k]) == [True]
    finally:
        await tier.aclose()


async def test_full_pool_is_a_plain_miss(remote_url: str, key_model: str) -> None:
    ctx = make_ctx(pool_bytes=8192)  # room for two 4 KiB chunks
    tier = await open_tier(remote_url, ctx)
    try:
        keys = [key(key_model, i) for i in range(3)]
        await tier.put_many(keys, [chunk(i) for i in range(3)])
        got = await tier.get_many(keys)
        assert sum(g is not None for g in got) == 2
        release_all(got)
        assert await tier.contains_many(keys) == [True] * 3  # nothing deleted
    finally:
        await tier.aclose()


async def test_close_is_idempotent_and_closed_tier_misses(remote_url: str, key_model: str) -> None:
    tier = await open_tier(remote_url)
    await tier.aclose()
    await tier.aclose()
    k = key(key_model, 0)
    assert await tier.get_many([k]) == [None]
    assert await tier.put_many([k], [chunk(0)]) == 0
    assert await tier.contains_many([k]) == [False]


# -- Redis specifics ----------------------------------------------------------------------------------------------
async def test_redis_layout_setrange_and_half_entries(valkey: ServerProc, key_model: str) -> None:
    url = f"redis://127.0.0.1:{valkey.port}"
    r = redis.Redis(port=valkey.port)
    tier = await open_tier(url)
    try:
        keys = [key(key_model, i) for i in range(3)]
        await tier.put_many(keys, [chunk(i) for i in range(3)])
        s = [k.to_string() for k in keys]
        # LMCache's layout, visible to redis-cli users.
        assert sorted(r.keys(f"*{key_model}*")) == sorted([(x + sfx).encode() for x in s
                                                          for sfx in ("kv_bytes", "metadata")])
        assert r.strlen(s[0] + "metadata") == 80 and r.strlen(s[0] + "kv_bytes") == 4096
        r.setrange(s[0] + "kv_bytes", 10, b"\xde\xad\xbe\xef")  # corrupt the payload in place
        r.delete(s[1] + "metadata")  # half an entry: payload without header
        r.delete(s[2] + "kv_bytes")  # and header without payload
        assert await tier.get_many(keys) == [None, None, None]
        assert r.keys(f"*{key_model}*") == []  # everything cleaned up
        assert tier.statistics().corrupt == 1
    finally:
        await tier.aclose()
        r.close()


async def test_redis_expired_entries_and_halves_are_misses(valkey: ServerProc, key_model: str) -> None:
    # Users set TTLs on LMCache's keys (EXPIRE by hand, or a key policy): whole entries, or one half, expire.
    r = redis.Redis(port=valkey.port)
    tier = await open_tier(f"redis://127.0.0.1:{valkey.port}")
    try:
        keys = [key(key_model, i) for i in range(4)]
        assert await tier.put_many(keys, [chunk(i) for i in range(4)]) == 4
        s = [k.to_string() for k in keys]
        r.pexpire(s[0] + "kv_bytes", 50)
        r.pexpire(s[0] + "metadata", 50)  # the whole entry
        r.pexpire(s[1] + "kv_bytes", 50)  # its payload only
        r.pexpire(s[2] + "metadata", 50)  # its header only
        with anyio.fail_after(10):
            while r.exists(s[0] + "kv_bytes", s[0] + "metadata", s[1] + "kv_bytes", s[2] + "metadata"):
                await anyio.sleep(0.02)
        got = await tier.get_many(keys)
        assert got[:3] == [None, None, None]
        assert got[3] is not None and torch.equal(got[3].tensor, chunk_tensor(3))
        release_all(got)
        assert await tier.contains_many(keys) == [False, False, False, True]
        assert r.exists(s[1] + "metadata", s[2] + "kv_bytes") == 0  # the halves left were cleaned up
    finally:
        await tier.aclose()
        r.close()


async def test_redis_mixed_batch_half_entries_anywhere(valkey: ServerProc, key_model: str) -> None:
    """A batch read asks for each payload only once the one before it arrives (and only for entries with a
    header): hits stay paired with their own entries whatever the misses and half entries around them, including
    a header-less payload in first place (whose payload is asked for before its header is seen)."""
    url = f"redis://127.0.0.1:{valkey.port}"
    r = redis.Redis(port=valkey.port)
    tier = await open_tier(url)
    try:
        keys = [key(key_model, i) for i in range(7)]
        objs = [chunk(i) for i in range(7)]
        assert await tier.put_many(keys, objs) == 7
        s = [k.to_string() for k in keys]
        r.delete(s[0] + "metadata")  # payload without header, first in the batch
        r.delete(s[2] + "metadata", s[2] + "kv_bytes")  # gone entirely: a plain miss
        r.delete(s[4] + "kv_bytes")  # header without payload
        r.delete(s[6] + "metadata")  # payload without header, last in the batch
        got = await tier.get_many(keys)
        assert [g is not None for g in got] == [False, True, False, True, False, True, False]
        for i in (1, 3, 5):
            g = got[i]
            assert g is not None and torch.equal(g.tensor, objs[i].tensor)
        release_all(got)
        left = sorted(r.keys(f"*{key_model}*"))
        assert left == sorted((s[i] + sfx).encode() for i in (1, 3, 5) for sfx in ("kv_bytes", "metadata"))
        assert tier.statistics().corrupt == 0
    finally:
        await tier.aclose()
        r.close()


async def test_cluster_spreads_entries_and_cleans_half_entries(cluster: ValkeyCluster, key_model: str) -> None:
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    tier = await open_tier(cluster.url)
    try:
        keys = [key(key_model, i) for i in range(12)]
        await tier.put_many(keys, [chunk(i) for i in range(12)])
        per_node = [redis.Redis(port=n.port).dbsize() for n in cluster.nodes]
        assert sum(1 for c in per_node if c > 0) >= 2  # the entries really are spread
        s = [k.to_string() for k in keys]
        rc.delete(s[0] + "metadata")
        rc.delete(s[1] + "kv_bytes")
        rc.setrange(s[2] + "kv_bytes", 0, b"XXXX")
        got = await tier.get_many(keys)
        assert got[:3] == [None] * 3 and all(g is not None for g in got[3:])
        for i, g in enumerate(got[3:], start=3):
            assert g is not None and torch.equal(g.tensor, chunk_tensor(i))
        release_all(got)
        assert not any(rc.exists(s[i] + sfx) for i in range(3) for sfx in ("kv_bytes", "metadata"))
        entries = await tier.connector.list_entries(f"*{key_model}*")  # type: ignore[attr-defined]
        assert len(entries) == 9 and all(size == 4096 + 80 for _, size in entries)
    finally:
        await tier.aclose()
        rc.close()


async def test_cluster_payload_being_written_is_left_alone(cluster: ValkeyCluster, key_model: str) -> None:
    """In a cluster an entry's two keys live on different nodes: the payload is written first, with a time to
    live, and made persistent once the header is there. A payload with its time to live and no header (another
    engine's write caught mid-way) is a plain miss and is left alone; a persistent payload without header is half
    an entry, and is cleaned up. Stored entries are persistent."""
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.nodes[0].port)
    tier = await open_tier(cluster.url)
    try:
        keys = [key(key_model, i) for i in range(3)]
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
        s = [k.to_string() for k in keys]
        assert [rc.pttl(s[i] + sfx) for i in range(3) for sfx in ("kv_bytes", "metadata")] == [-1] * 6
        header = rc.get(s[0] + "metadata")
        rc.delete(s[0] + "metadata")  # entry 0: as a writer leaves it after its first step
        rc.pexpire(s[0] + "kv_bytes", 60_000)
        rc.delete(s[1] + "metadata")  # entry 1: a persistent payload whose header went (DEL by hand)
        got = await tier.get_many(keys)
        assert got[0] is None and got[1] is None and got[2] is not None
        release_all(got)
        assert 0 < rc.pttl(s[0] + "kv_bytes") <= 60_000  # left alone
        assert rc.exists(s[1] + "kv_bytes") == 0  # cleaned up
        rc.set(s[0] + "metadata", header)  # the writer goes on: header, then PERSIST
        rc.persist(s[0] + "kv_bytes")
        got = await tier.get_many(keys[:1])
        assert got[0] is not None and torch.equal(got[0].tensor, chunk_tensor(0))
        release_all(got)
    finally:
        await tier.aclose()
        rc.close()


async def test_cluster_entries_written_while_others_read_them_are_kept(cluster: ValkeyCluster,
                                                                      key_model: str) -> None:
    """Two engines write the same entries (a shared system prompt) while two others read them. No reader takes a
    write in progress for half an entry and deletes it: once the writers are done, every entry is there. (Readers
    used to delete a payload seen without its header: 3 of 600 entries were lost that way in one run.)"""
    url = cluster.url
    tiers = [await open_tier(url, make_ctx(timeout=10.0)) for _ in range(4)]
    writers, readers = tiers[:2], tiers[2:]
    shape = (2, 2, 256, 4, 16)  # 256 KiB: a payload takes a while to land
    try:
        for r in range(3):
            keys = [key(f"{key_model}-{r}", i) for i in range(40)]

            async def write(t: RemoteTier, w: int, keys: list[ChunkKey] = keys, r: int = r) -> None:
                for i in random.Random(10 * w + r).sample(range(40), 40):
                    await t.put_many([keys[i]], [chunk(i, shape)])

            async def read(t: RemoteTier, w: int, keys: list[ChunkKey] = keys, r: int = r) -> None:
                rng = random.Random(77 * w + r)
                for _ in range(120):
                    i = rng.randrange(40)
                    assert await read_checked(t, [keys[i]], [i], shape) in ([True], [False])

            async with anyio.create_task_group() as tg:
                for w, t in enumerate(writers):
                    tg.start_soon(write, t, w)
                for w, t in enumerate(readers):
                    tg.start_soon(read, t, w)
            assert await read_checked(readers[0], keys, list(range(40)), shape) == [True] * 40
    finally:
        for t in tiers:
            await t.aclose()


@pytest.mark.parametrize("kind", ["redis", "cluster", "lm", "mooncake"])
async def test_a_chunk_of_a_70b_model_round_trips(kind: str, request: pytest.FixtureRequest, key_model: str) -> None:
    """One 256-token chunk of a 70B-class model (80 layers, 8 KV heads, head_dim 128, bf16) is 80 MiB: stored and
    read back bit-identical on every remote (``lm://`` used to refuse the GET reply as over 64 MiB, take the tier
    down, and do so again at every retry)."""
    tier = await open_tier(url_for(kind, request), make_ctx(timeout=30.0, pool_bytes=200 << 20))
    try:
        kv = chunk_tensor(7, (80, 2, 256, 8, 128), torch.bfloat16)
        k = key(key_model, 0)
        assert await tier.put_many([k], [MemoryObj.detached(kv, 256)]) == 1
        (got,) = await tier.get_many([k])
        assert got is not None and torch.equal(got.tensor, kv)
        got.release()
        assert tier.available and tier.statistics().extra["down_events"] == 0
    finally:
        await tier.aclose()


async def test_redis_maxmemory_eviction_is_a_miss(fresh_valkey: ServerProc, key_model: str) -> None:
    r = redis.Redis(port=fresh_valkey.port)
    r.config_set("maxmemory", 3 << 20)
    r.config_set("maxmemory-policy", "allkeys-lru")
    tier = await open_tier(f"redis://127.0.0.1:{fresh_valkey.port}")
    try:
        shape = (2, 2, 64, 8, 32)  # 256 KiB a chunk: 40 of them overflow 3 MiB
        keys = [key(key_model, i) for i in range(40)]
        for i, k in enumerate(keys):
            await tier.put_many([k], [chunk(i, shape)])
        got = await tier.get_many(keys)
        hits = [i for i, g in enumerate(got) if g is not None]
        assert 0 < len(hits) < 40
        for i in hits:
            assert torch.equal(got[i].tensor, chunk_tensor(i, shape))  # type: ignore[union-attr]
        release_all(got)
        # `kvpipe inspect --remote` says so, as `redis-cli INFO` does
        rep = await inspect_remote(f"redis://127.0.0.1:{fresh_valkey.port}", Config())
        srv = rep["server"]
        assert srv["evicted_keys"] == r.info("stats")["evicted_keys"] > 0 and srv["masters"] == 1
        assert srv["maxmemory"] == 3 << 20 and srv["maxmemory_policy"] == "allkeys-lru"
        assert 0 < srv["used_memory"] <= r.info("memory")["used_memory"] * 2
    finally:
        await tier.aclose()
        r.close()


async def test_unix_socket_and_valkey_scheme(tmp_path: Path, key_model: str) -> None:
    sock = tmp_path / "v.sock"
    srv = valkey_server(tmp_path, "--unixsocket", str(sock), "--unixsocketperm", "700").start()
    try:
        for url in (f"unix://{sock}", f"valkey://127.0.0.1:{srv.port}/0"):
            tier = await open_tier(url)
            try:
                await assert_round_trip(tier, key(key_model, len(url)), 1)
            finally:
                await tier.aclose()
    finally:
        srv.stop()


@pytest.mark.parametrize("kind", ["redis", "sentinel", "lm"])
async def test_put_stream_sends_each_entry_as_it_comes(kind: str, request: pytest.FixtureRequest,
                                                       key_model: str) -> None:
    """``put_stream`` puts an entry on the server before it asks for the next one (what lets the tier hash the
    next chunk while the server takes in this one): the producer below waits, before each next entry, until a
    second connection sees the previous one stored. A connector that collected the entries first would never
    send the first one, and the wait would run out."""
    url = url_for(kind, request)
    writer = connector_for_url(url, make_ctx().config)
    reader = connector_for_url(url, make_ctx().config)
    assert writer is not None and reader is not None
    keys = [key(key_model, i).to_string() for i in range(3)]
    payloads = [memoryview(chunk_tensor(i).numpy()).cast("B") for i in range(3)]
    seen_before_next: list[bool] = []

    async def entries() -> AsyncIterator[tuple[str, bytes, memoryview]]:
        for i, (k, p) in enumerate(zip(keys, payloads, strict=True)):
            if i:
                with anyio.move_on_after(10):
                    while not (await reader.exists_many([keys[i - 1]]))[0]:
                        await anyio.sleep(0.01)
                seen_before_next.append((await reader.exists_many([keys[i - 1]]))[0])
            yield k, _header(k, p), p

    try:
        assert await writer.put_stream(entries()) == 3  # type: ignore[attr-defined]
        assert seen_before_next == [True, True]
        assert await reader.exists_many(keys) == [True] * 3
    finally:
        await writer.aclose()
        await reader.aclose()


def _header(k: str, payload: memoryview) -> bytes:
    t = torch.frombuffer(bytearray(payload), dtype=torch.float32).view(SHAPE)
    return EntryHeader.for_payload(k, "naive", t, SHAPE[2], payload, payload.nbytes).to_bytes()


async def test_tier_batch_put_streams_and_reads_back(remote_url: str, key_model: str) -> None:
    """A batch put through the tier (streamed to connectors that can, collected for the others) stores every
    chunk bit-identical and counts the bytes written."""
    tier = await open_tier(remote_url)
    try:
        keys = [key(key_model, i) for i in range(6)]
        objs = [chunk(i) for i in range(6)]
        assert await tier.put_many(keys, objs) == 6
        got = await tier.get_many(keys)
        for g, o in zip(got, objs, strict=True):
            assert g is not None and torch.equal(g.tensor, o.tensor)
        release_all(got)
        assert tier.statistics().extra["bytes_written"] == 6 * objs[0].tensor.numel() * 4
    finally:
        await tier.aclose()


def _port_of(server: str, srv: ServerProc | ValkeySentinel | ValkeyCluster) -> int:
    if isinstance(srv, ValkeySentinel):
        return srv.sentinels[0].port
    if isinstance(srv, ValkeyCluster):
        return srv.nodes[0].port
    return srv.port


@pytest.mark.parametrize(("scheme", "server", "said"), [
    # a server's address given as redis-sentinel://: the reason names the mistake, not only "no master"
    ("redis-sentinel", "valkey", ["not a Sentinel, it answered SENTINEL with", "use redis://"]),
    # a Sentinel answers PING, then refuses every GET and SET: the tier was up and each call failed
    ("redis", "sentinel", ["is a Sentinel, not a data server: use redis-sentinel://"]),
    # one node of a cluster answers MOVED for the other nodes' slots: some chunks failed, some worked
    ("redis", "cluster", ["is a Redis Cluster node", "use redis-cluster://"]),
])
async def test_a_url_of_the_wrong_kind_says_so(scheme: str, server: str, said: list[str],
                                               request: pytest.FixtureRequest, key_model: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    port = _port_of(server, request.getfixturevalue(server))
    tier = await open_tier(f"{scheme}://127.0.0.1:{port}")
    try:
        assert not tier.available  # at open, with the fix in the reason
        for words in said:
            assert words in caplog.text
        assert await tier.put_many([key(key_model, 0)], [chunk(0)]) == 0  # dropped while down, not errors
        assert tier.statistics().extra["errors"] == 0
    finally:
        await tier.aclose()
