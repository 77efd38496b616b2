"""The real model with kvpipe as its prefix cache: restored prefixes give the same logits and the same greedy
tokens as a full prefill, from the CPU tier and from the disk tier after a restart, and a prompt sharing only a
prefix reuses exactly the shared full chunks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefill_check import PROMPT_TOKENS, assert_same_logits

import kvpipe
from kvpipe.config import Config
from kvpipe.integrations.context import build_prompt_ids
from kvpipe.integrations.transformers import CachedLM, PrefillResult, SamplingParams

pytestmark = pytest.mark.model


def test_restored_prefix_from_cpu_gives_full_prefill_logits(smol: tuple[Any, Any], prompt: list[int],
                                                            reference: PrefillResult,
                                                            cache_config: Callable[..., Config]) -> None:
    model, tok = smol
    with kvpipe.Cache(cache_config()) as cache:
        lm = CachedLM(model, tok, cache)
        cold = lm.prefill(prompt)
        assert cold.hit_tokens == 0
        assert cold.stored_tokens == 512
        assert_same_logits(cold.logits, reference.logits)

        warm = lm.prefill(prompt)
        assert warm.hit_tokens == 512
        assert warm.hits_by_tier == {"cpu": 512}
        assert warm.computed_tokens == PROMPT_TOKENS - 512
        assert warm.stored_tokens == 0
        assert_same_logits(warm.logits, reference.logits)


def test_restored_prefix_from_disk_after_restart(smol: tuple[Any, Any], prompt: list[int], reference: PrefillResult,
                                                 cache_config: Callable[..., Config], tmp_path: Path) -> None:
    model, tok = smol
    cfg = cache_config(tmp_path / "disk")
    with kvpipe.Cache(cfg) as cache:
        assert CachedLM(model, tok, cache).prefill(prompt).stored_tokens == 512
        cache.flush()
    assert len([f for f in (tmp_path / "disk").rglob("*") if f.is_file()]) >= 2
    # A fresh cache over the same directory: an empty CPU pool, the disk index rebuilt from the files.
    with kvpipe.Cache(cfg) as cache:
        warm = CachedLM(model, tok, cache).prefill(prompt)
        assert warm.hit_tokens == 512
        assert warm.hits_by_tier == {"disk": 512}
        assert_same_logits(warm.logits, reference.logits)
        # Retrieval promoted the chunks: the next request is served from the CPU tier.
        again = CachedLM(model, tok, cache).prefill(prompt)
        assert again.hits_by_tier == {"cpu": 512}
        assert_same_logits(again.logits, reference.logits)


def test_greedy_generation_warm_equals_cold(smol: tuple[Any, Any], prompt: list[int],
                                            cache_config: Callable[..., Config]) -> None:
    model, tok = smol
    with kvpipe.Cache(cache_config()) as cache:
        lm = CachedLM(model, tok, cache)
        pieces: list[str] = []
        cold = lm.generate(prompt, SamplingParams(max_new_tokens=10), on_text=pieces.append)
        warm = lm.generate(prompt, SamplingParams(max_new_tokens=10))
    assert cold.hit_tokens == 0 and warm.hit_tokens == 512
    assert warm.token_ids == cold.token_ids
    assert warm.text == cold.text == "".join(pieces)
    assert cold.stored_tokens == 512 and warm.stored_tokens == 0


def test_shared_prefix_reuses_exactly_the_shared_full_chunks(smol: tuple[Any, Any], prompt: list[int],
                                                             cache_config: Callable[..., Config]) -> None:
    model, tok = smol
    shared = 400  # one full chunk (256 tokens) lies entirely inside the shared part; the second does not
    other = prompt[:shared] + build_prompt_ids(tok, 300, question="Who was the first station manager?")[-300:]
    assert other[shared] != prompt[shared]
    want = CachedLM(model, tok, None).prefill(other)
    with kvpipe.Cache(cache_config()) as cache:
        lm = CachedLM(model, tok, cache)
        lm.prefill(prompt)
        assert cache.lookup(other) == 256
        got = lm.prefill(other)
        assert got.hit_tokens == 256
        assert got.hits_by_tier == {"cpu": 256}
        assert_same_logits(got.logits, want.logits)
        # 700 tokens -> full chunks 0 and 1; chunk 0 was already there, chunk 1 differs from the prompt's.
        assert got.stored_tokens == 256
