"""The DynamicCache layout adapter and CachedLM's model-side logic, on tiny random transformers models (no real
model, no files): round trips, restored-prefix logits, warm == cold generation, decode-cache storing, stop strings,
sampling, and refusal of unsupported cache types."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, StaticCache

import kvpipe
from kvpipe.config import Config
from kvpipe.integrations.transformers import CachedLM, SamplingParams, _sample, _TextStream, cache_config_for
from kvpipe.layouts.hf import (
    UnsupportedCache,
    cache_kwargs,
    dynamic_cache_from_kv,
    kv_from_dynamic_cache,
    kv_shape_for,
)

CHUNK = 16


class CharTokenizer:
    """Token i decodes to one letter; 0 is end of sequence."""

    eos_token_id = 0
    chat_template = None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + (i - 1) % 26) for i in ids if i != 0)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=0, bos_token_id=1, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def cache(model: LlamaForCausalLM) -> Iterator[kvpipe.Cache]:
    cfg = cache_config_for(model, Config(chunk_size=CHUNK, max_local_cpu_size=0.01), model_name="tiny-llama")
    with kvpipe.Cache(cfg) as c:
        yield c


def prompt(n: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 64, (n,), generator=g).tolist()


# ------------------------------------------------------------------------------------------- layout adapter
def test_chunk_tensor_round_trips_through_dynamic_cache(model: LlamaForCausalLM) -> None:
    shape = kv_shape_for(model.config, 20)
    assert shape == (2, 2, 20, 2, 8)
    kv = torch.randn(shape)
    cache = dynamic_cache_from_kv(kv, model.config)
    assert cache.get_seq_length() == 20
    assert tuple(cache.layers[0].keys.shape) == (1, 2, 20, 8)
    torch.testing.assert_close(cache.layers[1].values[0, :, 5], kv[1, 1, 5], rtol=0, atol=0)
    assert torch.equal(kv_from_dynamic_cache(cache), kv)
    assert torch.equal(kv_from_dynamic_cache(cache, 4, 12), kv[:, :, 4:12])
    assert kv_from_dynamic_cache(cache, dtype=torch.float16).dtype == torch.float16


def test_adapter_matches_the_models_own_cache(model: LlamaForCausalLM) -> None:
    ids = torch.tensor([prompt(24)])
    with torch.inference_mode():
        own = DynamicCache(config=model.config)
        model(ids, use_cache=True, **cache_kwargs(model, own))
        kv = kv_from_dynamic_cache(own)
        again = dynamic_cache_from_kv(kv.clone(), model.config)
    for a, b in zip(own.layers, again.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_adapter_rejects_wrong_shapes_and_cache_types(model: LlamaForCausalLM) -> None:
    with pytest.raises(UnsupportedCache, match="does not match"):
        dynamic_cache_from_kv(torch.zeros(3, 2, 4, 2, 8), model.config)
    with pytest.raises(ValueError, match="layers, 2, tokens"):
        dynamic_cache_from_kv(torch.zeros(2, 4, 2, 8))
    with pytest.raises(UnsupportedCache, match="StaticCache"):
        kv_from_dynamic_cache(StaticCache(config=model.config, max_cache_len=32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outside"):
        kv_from_dynamic_cache(dynamic_cache_from_kv(torch.zeros(2, 2, 4, 2, 8)), 0, 9)


def test_sliding_window_models_are_refused_with_a_clear_error() -> None:
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8)
    with pytest.raises(UnsupportedCache, match="sliding"):
        CachedLM(MistralForCausalLM(cfg).eval(), CharTokenizer())


# ------------------------------------------------------------------------------------------- CachedLM
def test_restored_prefix_logits_equal_full_prefill(model: LlamaForCausalLM, cache: kvpipe.Cache) -> None:
    ids = prompt(40)
    want = CachedLM(model, CharTokenizer()).prefill(ids)
    lm = CachedLM(model, CharTokenizer(), cache)
    cold = lm.prefill(ids)
    assert (cold.hit_tokens, cold.stored_tokens) == (0, 32)
    warm = lm.prefill(ids)
    assert (warm.hit_tokens, warm.computed_tokens, warm.hits_by_tier) == (32, 8, {"cpu": 32})
    assert float((warm.logits - want.logits).abs().max()) <= 1e-5


def test_a_fully_cached_prompt_still_recomputes_its_last_token(model: LlamaForCausalLM,
                                                               cache: kvpipe.Cache) -> None:
    ids = prompt(32, seed=2)  # exactly two chunks
    want = CachedLM(model, CharTokenizer()).prefill(ids)
    lm = CachedLM(model, CharTokenizer(), cache)
    lm.prefill(ids)
    warm = lm.prefill(ids)
    assert (warm.hit_tokens, warm.computed_tokens) == (32, 1)
    assert float((warm.logits - want.logits).abs().max()) <= 1e-5


def test_greedy_generation_warm_equals_cold_and_streams_the_text(model: LlamaForCausalLM,
                                                                  cache: kvpipe.Cache) -> None:
    ids = prompt(50, seed=3)
    lm = CachedLM(model, CharTokenizer(), cache)
    pieces: list[str] = []
    cold = lm.generate(ids, SamplingParams(max_new_tokens=12, stop_token_ids=()), on_text=pieces.append)
    warm = lm.generate(ids, SamplingParams(max_new_tokens=12, stop_token_ids=()))
    assert len(cold.token_ids) == 12 and cold.finish_reason == "length"
    assert warm.token_ids == cold.token_ids
    assert "".join(pieces) == cold.text == warm.text
    assert (cold.hit_tokens, warm.hit_tokens) == (0, 48)


def test_save_decode_cache_stores_generated_chunks(model: LlamaForCausalLM, cache: kvpipe.Cache) -> None:
    ids = prompt(20, seed=4)
    lm = CachedLM(model, CharTokenizer(), cache, save_decode_cache=True)
    res = lm.generate(ids, SamplingParams(max_new_tokens=30, stop_token_ids=()))
    # Prompt: chunk 0 (16). Then prompt + 29 fed-back generated tokens = 49 tokens -> chunks 1 and 2 (up to 48).
    assert res.stored_tokens == 48
    follow_up = ids + list(res.token_ids)
    assert cache.lookup(follow_up) == 48


def test_stop_strings_cut_the_text_and_end_generation(model: LlamaForCausalLM) -> None:
    lm = CachedLM(model, CharTokenizer())
    ids = prompt(10, seed=5)
    full = lm.generate(ids, SamplingParams(max_new_tokens=10, stop_token_ids=()))
    stop = full.text[3:5]
    pieces: list[str] = []
    res = lm.generate(ids, SamplingParams(max_new_tokens=10, stop=(stop,), stop_token_ids=()),
                      on_text=pieces.append)
    cut = full.text.find(stop)
    assert res.finish_reason == "stop"
    assert res.text == full.text[:cut]
    assert "".join(pieces) == res.text


def test_text_stream_holds_back_a_possible_stop_string() -> None:
    stream = _TextStream(CharTokenizer(), ["cd"])
    assert stream.push(1) == "a"  # "a"
    assert stream.push(3) == ""  # "ac": "c" may start "cd"
    assert stream.push(5) == "ce"  # "ace": it did not
    assert stream.push(3) == ""
    assert stream.push(4) == ""  # "acecd": stop
    assert stream.stopped and stream.emitted == "ace"


def test_sampling_is_seeded_and_top_p_keeps_the_head() -> None:
    logits = torch.tensor([0.0, 3.0, 2.9, -5.0])
    p = SamplingParams(temperature=1.0, seed=7)
    a = [_sample(logits, p, torch.Generator().manual_seed(7)) for _ in range(5)]
    b = [_sample(logits, p, torch.Generator().manual_seed(7)) for _ in range(5)]
    assert a == b
    tiny_p = SamplingParams(temperature=1.0, top_p=0.01)
    assert {_sample(logits, tiny_p, torch.Generator().manual_seed(i)) for i in range(20)} == {1}
    assert _sample(logits, SamplingParams(), None) == 1


def test_cache_config_for_fills_model_name_and_dtype_only_when_unset(model: LlamaForCausalLM) -> None:
    cfg = cache_config_for(model, Config(chunk_size=CHUNK), model_name="m1")
    assert (cfg.model_name, cfg.kv_dtype) == ("m1", "float32")
    explicit = Config.load(None, env={}, model_name="mine", kv_dtype="float16")
    cfg2 = cache_config_for(model, explicit, model_name="m1")
    assert (cfg2.model_name, cfg2.kv_dtype) == ("mine", "float16")


def test_a_cache_in_another_kv_dtype_converts(model: LlamaForCausalLM) -> None:
    ids = prompt(40, seed=6)
    want = CachedLM(model, CharTokenizer()).prefill(ids)
    cfg: Any = Config.load(None, env={}, chunk_size=CHUNK, max_local_cpu_size=0.01, kv_dtype="bfloat16",
                           model_name="tiny-bf16")
    with kvpipe.Cache(cfg) as c:
        lm = CachedLM(model, CharTokenizer(), c)
        lm.prefill(ids)
        warm = lm.prefill(ids)
    assert warm.hit_tokens == 32
    assert int(warm.logits.argmax()) == int(want.logits.argmax())
    assert float((warm.logits - want.logits).abs().max()) < 0.1


def test_the_cache_goes_under_the_name_forward_takes(model: LlamaForCausalLM) -> None:
    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns on each call, and goes in
    # 5.40); whichever this version takes, a prefill through CachedLM passes it without a deprecation warning.
    import inspect
    import warnings

    params = inspect.signature(model.forward).parameters
    (name,) = cache_kwargs(model, None)
    assert name in params or "past_key_values" == name
    assert name == ("cache" if "cache" in params and "past_key_values" not in params else "past_key_values")
    lm = CachedLM(model, CharTokenizer(), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.prefill(prompt(20))
    assert not [w for w in caught if "past_key_values" in str(w.message)]
