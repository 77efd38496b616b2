"""``kvpipe.Cache``: the synchronous API (one background event loop), same behaviour as the async one."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config


def test_round_trip_and_every_method(tmp_path: Path) -> None:
    tokens, kv = make_tokens(3 * CHUNK + 3), make_kv(3 * CHUNK + 3)
    with kvpipe.Cache(small_config(tmp_path, disk=True)) as cache:
        assert cache.config.chunk_size == CHUNK
        assert cache.wait_resident(30)  # local_cpu_prefault: the pool's pages are faulted in at open
        assert cache.lookup(tokens) == 0
        assert cache.store(tokens, kv) == 3 * CHUNK
        assert cache.lookup(tokens) == 3 * CHUNK
        res = cache.retrieve(tokens)
        assert res.num_tokens == 3 * CHUNK and torch.equal(res.kv, kv[:, :, : 3 * CHUNK])
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out=out).num_tokens == 3 * CHUNK
        assert torch.equal(out[:, :, : 3 * CHUNK], kv[:, :, : 3 * CHUNK])
        assert cache.pin(tokens) == 3 * CHUNK
        assert cache.unpin(tokens) == 3 * CHUNK
        assert len(cache.keys_for(tokens)) == 3
        cache.flush()
        assert len(list((tmp_path / "disk").glob("*.kvpe"))) == 3
        stats = cache.statistics()
        assert stats.stored_tokens == 3 * CHUNK and stats.tiers["disk"].puts == 3
        assert cache.prefetch(tokens) == 0  # already in CPU
        assert cache.clear() == 6
        assert cache.lookup(tokens) == 0
    cache.close()  # idempotent


def test_prefetch_from_disk(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, disk=True)
    tokens, kv = make_tokens(2 * CHUNK), make_kv(2 * CHUNK)
    with kvpipe.Cache(cfg) as cache:
        cache.store(tokens, kv)
    with kvpipe.Cache(cfg) as cache:  # close() flushed the disk writes
        assert cache.prefetch(tokens) == 2 * CHUNK
        res = cache.retrieve(tokens)
        assert res.hits_by_tier == {"cpu": 2 * CHUNK} and torch.equal(res.kv, kv)


def test_errors_cross_the_thread() -> None:
    with kvpipe.Cache(small_config()) as cache:
        with pytest.raises(ValueError, match="dtype"):
            cache.store(make_tokens(CHUNK), make_kv(CHUNK, dtype=torch.float16))
        assert cache.lookup(make_tokens(CHUNK)) == 0  # still usable


def test_bad_config_raises_and_leaves_no_thread() -> None:
    before = threading.active_count()
    with pytest.raises(kvpipe.ConfigError):
        kvpipe.Cache(small_config(cache_policy="MRU"))
    assert threading.active_count() <= before


def test_overrides_and_many_threads() -> None:
    with kvpipe.Cache(small_config(), chunk_size=8) as cache:
        assert cache.config.chunk_size == 8
        errors: list[str] = []

        def work(i: int) -> None:
            tokens, kv = make_tokens(32, seed=i), make_kv(32, seed=i)
            cache.store(tokens, kv)
            res = cache.retrieve(tokens)
            if res.num_tokens != 32 or not torch.equal(res.kv, kv):
                errors.append(f"thread {i}")

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert errors == [] and not any(t.is_alive() for t in threads)
