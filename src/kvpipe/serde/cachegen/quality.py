"""Measure a KV codec's effect on a real causal LM (transformers, CPU): top-1 agreement, KL, greedy match.

The reference is a full prefill of ``context + continuation``; the candidate restores the context's KV through
the codec (chunk by chunk, ``[L, 2, T, H, D]`` as kvpipe stores it) and runs the continuation on top of it,
teacher-forced, so every continuation position has a next-token distribution from both. Used by
``benchmarks/bench_cachegen.py`` and the e2e quality test; transformers is imported lazily.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import torch

from kvpipe.layouts.hf import cache_kwargs

__all__ = ["QualityReport", "cache_from_chunks", "chunks_from_cache", "measure_quality", "prefill_kv"]

Codec = Callable[[torch.Tensor], torch.Tensor]
"""Round-trips one chunk ``[L, 2, T, H, D]`` through a serde (encode then decode)."""


@attrs.frozen
class QualityReport:
    """Next-token agreement between a codec-restored cache and a full prefill."""

    positions: int
    top1_agreement: float
    kl_mean: float
    kl_max: float
    greedy_match: int
    greedy_len: int
    miss_margins: tuple[float, ...] = ()
    """For each disagreeing position, the reference's top-1 minus top-2 log-probability (nats): small values mean
    near-ties that any perturbation (even a cast to bf16) may flip."""


def prefill_kv(model: Any, ids: torch.Tensor) -> torch.Tensor:
    """The KV of ``ids`` (``[1, n]``) as ``[L, 2, n, heads, head_dim]`` in the model's dtype."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache))
    return chunks_from_cache(cache)


def chunks_from_cache(cache: Any) -> torch.Tensor:
    """A transformers ``DynamicCache`` (batch 1) → ``[L, 2, T, heads, head_dim]``."""
    layers = []
    for layer in cache.layers:
        k, v = layer.keys[0], layer.values[0]  # [heads, T, head_dim]
        layers.append(torch.stack([k.transpose(0, 1), v.transpose(0, 1)]))
    return torch.stack(layers)


def cache_from_chunks(kv: torch.Tensor, config: Any) -> Any:
    """``[L, 2, T, heads, head_dim]`` → a fresh ``DynamicCache`` (batch 1)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(kv.shape[0]):
        cache.update(kv[i, 0].transpose(0, 1).unsqueeze(0).contiguous(),
                     kv[i, 1].transpose(0, 1).unsqueeze(0).contiguous(), i)
    return cache


def roundtrip_chunks(kv: torch.Tensor, codec: Codec, chunk_size: int) -> torch.Tensor:
    """``kv`` after each ``chunk_size``-token chunk went through ``codec`` (the last chunk may be partial)."""
    parts = [codec(kv[:, :, s:s + chunk_size].contiguous()) for s in range(0, kv.shape[2], chunk_size)]
    return torch.cat(parts, dim=2)


def _greedy(model: Any, cache: Any, first: torch.Tensor, steps: int) -> list[int]:
    tokens: list[int] = []
    nxt = first
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(nxt))
            out = model(input_ids=nxt.view(1, 1), use_cache=True, **cache_kwargs(model, cache))  # cache: in place
            nxt = out.logits[0, -1].argmax()
    return tokens


def measure_quality(model: Any, context: torch.Tensor, continuation: torch.Tensor, codec: Codec, *,
                    chunk_size: int = 256, greedy_steps: int = 32) -> QualityReport:
    """Compare the codec-restored context against a full prefill over ``continuation`` (both ``[1, n]`` ids).

    Position ``i`` of the continuation is predicted from ``context + continuation[:i]``; the first position is
    predicted from the context's last logits, which both sides compute from the context itself, so it is taken
    from the continuation pass: ``len(continuation)`` positions are compared, each with the codec in play.
    """
    n_ctx = context.shape[1]
    full_ids = torch.cat([context, continuation], dim=1)
    with torch.no_grad():
        ref_logits = model(input_ids=full_ids, use_cache=False).logits[0, n_ctx - 1:-1].float()
        kv = prefill_kv(model, context[:, :-1])
        restored = roundtrip_chunks(kv, codec, chunk_size)
        cache = cache_from_chunks(restored, model.config)
        # Re-run the context's last token on the restored cache (as an engine recomputes at least one token).
        ids = torch.cat([context[:, -1:], continuation[:, :-1]], dim=1)
        out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
        got_logits = out.logits[0].float()
    ref_lp = torch.log_softmax(ref_logits, dim=-1)
    got_lp = torch.log_softmax(got_logits, dim=-1)
    kl = (ref_lp.exp() * (ref_lp - got_lp)).sum(-1)
    same = ref_logits.argmax(-1) == got_logits.argmax(-1)
    agree = same.float().mean().item()
    top2 = ref_lp.topk(2, dim=-1).values
    margins = tuple(round(m, 4) for m in (top2[:, 0] - top2[:, 1])[~same].tolist())
    # Greedy generation from the context alone: reference cache vs restored cache.
    with torch.no_grad():
        ref_cache = cache_from_chunks(kv, model.config)
        tail = context[:, -1:]
        ref_first = model(input_ids=tail, use_cache=True, **cache_kwargs(model, ref_cache))
        got_cache = cache_from_chunks(restored, model.config)
        got_first = model(input_ids=tail, use_cache=True, **cache_kwargs(model, got_cache))
        ref_tokens = _greedy(model, ref_cache, ref_first.logits[0, -1].argmax(), greedy_steps)
        got_tokens = _greedy(model, got_cache, got_first.logits[0, -1].argmax(), greedy_steps)
    match = next((i for i, (a, b) in enumerate(zip(ref_tokens, got_tokens, strict=True)) if a != b), greedy_steps)
    kl_mean = kl.mean().item()
    return QualityReport(positions=int(kl.numel()), top1_agreement=agree,
                         kl_mean=kl_mean if math.isfinite(kl_mean) else float("inf"),
                         kl_max=kl.max().item(), greedy_match=match, greedy_len=greedy_steps, miss_margins=margins)
