"""The engine over remote tiers: two processes sharing one Redis (and one lm:// server, one Mooncake Store) get
identical KV; an unreachable remote never makes the engine raise or hang; a chunk gone bad on disk is read from the
remote behind it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from remote_fixtures import url_for
from servers import free_port

import kvpipe
from fixtures_core import CHUNK, make_kv, make_tokens, small_config
from kvpipe.tiers.disk import _file_name

_SCRIPT = r"""
import hashlib, json, sys, torch, kvpipe
url, model, mode = sys.argv[1:4]
cfg = kvpipe.Config(chunk_size=16, max_local_cpu_size=0.004, kv_dtype="float32", model_name=model,
                    remote_url=url, blocking_timeout_secs=5)
g = torch.Generator().manual_seed(7)
tokens = torch.randint(0, 50000, (100,), generator=g).tolist()
kv = torch.randn((2, 2, 100, 2, 4), generator=g)
with kvpipe.Cache(cfg) as c:
    if mode == "store":
        n = c.store(tokens, kv)
        c.flush()
        out = {"stored": n}
    else:
        r = c.retrieve(tokens)
        out = {"hit": r.num_tokens, "tiers": r.hits_by_tier,
               "same": r.kv is not None and torch.equal(r.kv, kv[:, :, : r.num_tokens]),
               "sha": hashlib.sha256(r.kv.contiguous().numpy().tobytes()).hexdigest() if r.kv is not None else None,
               "expected_sha": hashlib.sha256(kv[:, :, : r.num_tokens].contiguous().numpy().tobytes()).hexdigest()}
print("RESULT " + json.dumps(out))
"""


def _run(url: str, model: str, mode: str) -> dict[str, object]:
    r = subprocess.run([sys.executable, "-c", _SCRIPT, url, model, mode], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["redis", "lm", "mooncake"])
def test_two_processes_share_one_remote(kind: str, request: pytest.FixtureRequest, key_model: str) -> None:
    url = url_for(kind, request)
    stored = _run(url, key_model, "store")
    assert stored["stored"] == 96  # six whole 16-token chunks of 100 tokens
    got = _run(url, key_model, "retrieve")
    assert got["hit"] == 96 and got["same"] is True and got["sha"] == got["expected_sha"]
    assert got["tiers"] == {"remote": 96}


async def test_engine_never_raises_with_remote_down(key_model: str) -> None:
    cfg = kvpipe.Config(chunk_size=16, max_local_cpu_size=0.004, kv_dtype="float32", model_name=key_model,
                        remote_url=f"redis://127.0.0.1:{free_port()}", blocking_timeout_secs=0.5)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 50000, (64,), generator=g).tolist()
    kv = torch.randn((2, 2, 64, 2, 4), generator=g)
    async with kvpipe.open_cache(cfg) as cache:
        assert await cache.store(tokens, kv) == 64
        await cache.flush()
        r = await cache.retrieve(tokens)
        assert r.num_tokens == 64 and r.kv is not None and torch.equal(r.kv, kv)
        other = torch.randint(0, 50000, (64,), generator=g).tolist()
        assert await cache.lookup(other) == 0
        assert (await cache.retrieve(other)).num_tokens == 0


@pytest.mark.parametrize("kind", ["redis", "lm"])
async def test_a_chunk_gone_bad_on_disk_is_read_from_the_remote(kind: str, request: pytest.FixtureRequest,
                                                                tmp_path: Path, key_model: str) -> None:
    """A disk entry with one payload byte flipped is found by the lookup (the file is there) and rejected by the
    read (checksum); the read then takes that chunk from the remote: the hit is whole, not cut at the bad chunk."""
    cfg = small_config(tmp_path, disk=True, model_name=key_model, remote_url=url_for(kind, request))
    tokens, kv = make_tokens(3 * CHUNK, seed=5), make_kv(3 * CHUNK, seed=5)
    async with kvpipe.open_cache(cfg) as cache:
        assert await cache.store(tokens, kv) == 3 * CHUNK
        await cache.flush()
        keys = cache.keys_for(tokens)
    bad = tmp_path / "disk" / _file_name(keys[1])
    data = bytearray(bad.read_bytes())
    data[-1] ^= 0xFF
    bad.write_bytes(bytes(data))
    async with kvpipe.open_cache(cfg) as cache:  # an empty CPU tier: the chunks are on disk and in the remote
        res = await cache.retrieve(tokens)
        assert res.num_tokens == 3 * CHUNK and torch.equal(res.kv, kv)
        assert res.hits_by_tier == {"disk": 2 * CHUNK, "remote": CHUNK}
        assert cache.statistics().tiers["disk"].corrupt == 1
