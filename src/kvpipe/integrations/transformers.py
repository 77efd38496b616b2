"""Run a Hugging Face causal LM with kvpipe as its prefix cache.

Per request: ``retrieve`` the longest cached prefix of the prompt (the core's lookup runs inside it, one thread hop)
straight into a ``DynamicCache``, run the model only on the remaining tokens (always at least the last one, for
its logits; ``logits_to_keep=1`` so the output layer runs over one position, not the whole prompt), emit the first
token, then ``store`` the prompt's new chunks (the hit prefix is masked out, so only new chunks are gathered).
Decoding continues on the same ``DynamicCache``; with ``save_decode_cache`` the generated tokens' chunks are
stored at the end too.

The core logs the per-request INFO lines (``Reqid: …, Total tokens N, kvpipe hit tokens: H, need to load: L`` and
``Storing KV cache for X out of Y tokens``); this module adds only DEBUG timings.

Works for Llama-family models whose cache is a plain ``DynamicCache`` (full attention, batch 1); other cache types
raise :class:`~kvpipe.layouts.hf.UnsupportedCache` when the :class:`CachedLM` is built.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import attrs
import torch

from kvpipe.config import Config
from kvpipe.errors import ConfigError
from kvpipe.layouts.hf import (
    UnsupportedCache,
    cache_kwargs,
    check_dynamic_cache,
    dynamic_cache_from_kv,
    kv_from_dynamic_cache,
    kv_shape_for,
)
from kvpipe.serde.entry import dtype_from_name, dtype_name

if TYPE_CHECKING:
    from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

    from kvpipe.api import Cache

__all__ = [
    "CachedLM",
    "GenerationResult",
    "PrefillResult",
    "SamplingParams",
    "TextCallback",
    "cache_config_for",
    "chat_prompt_ids",
]

log = logging.getLogger(__name__)

_req_ids = itertools.count(1)

TextCallback = Callable[[str], None]
"""Called with each new piece of generated text (never empty). Text is held back while a multi-byte character or a
possible stop string is incomplete, so the pieces joined equal :attr:`GenerationResult.text`."""


def cache_config_for(model: PreTrainedModel, config: Config | None = None, *, model_name: str | None = None
                     ) -> Config:
    """``config`` (default: ``Config.load()``) with ``model_name`` and ``kv_dtype`` set from the model wherever
    they were left at their defaults, so keys name the model and its KV dtype."""
    config = Config.load() if config is None else config
    changes: dict[str, Any] = {}
    if config.source_of("model_name") == "default":
        changes["model_name"] = model_name or _model_name(model)
    if config.source_of("kv_dtype") == "default":
        changes["kv_dtype"] = dtype_name(model.dtype)
    return config.replace(**changes) if changes else config


def _model_name(model: PreTrainedModel) -> str:
    raw = str(getattr(model.config, "_name_or_path", "") or model.config.model_type)
    name = raw.rstrip("/").rsplit("/", 1)[-1]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "model"


def chat_prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> list[int]:
    """The token ids of ``messages`` rendered with the tokenizer's chat template, ending with the assistant turn's
    opening (``add_generation_prompt``).

    :raises ConfigError: when the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("the model's tokenizer has no chat template; use the completions endpoint instead")
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    # The template already holds the special tokens; adding them again would prepend a second BOS.
    return list(tokenizer(str(text), add_special_tokens=False).input_ids)


def _str_tuple(value: Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class SamplingParams:
    """How to pick tokens. ``temperature == 0`` is greedy (argmax); ``seed`` makes sampling reproducible."""

    max_new_tokens: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    temperature: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    top_p: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    stop: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)
    stop_token_ids: tuple[int, ...] | None = None
    seed: int | None = None


@attrs.frozen
class PrefillResult:
    """The outcome of one prefill: the last position's logits (fp32, ``[vocab]``) and where the prompt came
    from. ``hit_tokens`` is what kvpipe served (whole chunks), ``computed_tokens`` what the model ran on (at least
    the last prompt token, even on a full hit)."""

    req_id: str
    logits: torch.Tensor = attrs.field(eq=False)
    past_key_values: Any = attrs.field(eq=False, repr=False)
    prompt_tokens: int
    hit_tokens: int
    computed_tokens: int
    hits_by_tier: dict[str, int]
    stored_tokens: int
    prefill_s: float


@attrs.frozen
class GenerationResult:
    """One finished generation."""

    req_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    hit_tokens: int
    hits_by_tier: dict[str, int]
    stored_tokens: int
    ttft_s: float
    total_s: float


class _TextStream:
    """Turns generated ids into text deltas: holds back an incomplete UTF-8 character and any tail that could
    still become a stop string, and cuts the text at the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str]) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = str(self._tok.decode(self._ids, skip_special_tokens=True))
        if text.endswith("\ufffd"):  # a multi-byte character split across tokens
            return ""
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            text = text[:cut]
            safe = len(text)
        else:
            hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            safe = len(text) - hold
        if safe <= len(self.emitted):
            return ""
        delta = text[len(self.emitted) : safe]
        self.emitted = text[:safe]
        return delta

    def finish(self) -> str:
        """The held-back tail once generation ends without a stop string."""
        if self.stopped:
            return ""
        text = str(self._tok.decode(self._ids, skip_special_tokens=True))
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta


def _sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # Keep the smallest set whose mass reaches top_p (the token crossing the threshold included).
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


@attrs.define(eq=False)
class CachedLM:
    """A causal LM, its tokenizer and (optionally) a synchronous :class:`kvpipe.Cache` as its prefix cache.

    Not thread-safe: one request at a time (the server serializes them). ``cache=None`` runs plain transformers
    (the miss-overhead baseline).

    :raises UnsupportedCache: when the model's cache is not a plain full-attention ``DynamicCache``.
    :raises ConfigError: when the cache's chunk layout cannot hold this model's KV (MLA).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    cache: Cache | None = None
    save_decode_cache: bool = False
    _kv_dtype: torch.dtype = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        if getattr(self.model.config, "is_encoder_decoder", False):
            raise UnsupportedCache(f"{type(self.model).__name__} is an encoder-decoder model: only decoder-only "
                                   "causal LMs are supported")
        kv_shape_for(self.model.config, 0)
        check_dynamic_cache(self._new_cache())
        self._kv_dtype = (dtype_from_name(self.cache.config.kv_dtype) if self.cache is not None
                          else self.model.dtype)

    def _new_cache(self) -> DynamicCache:
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    @property
    def chunk_size(self) -> int:
        """The cache's chunk size (0 without a cache)."""
        return self.cache.config.chunk_size if self.cache is not None else 0

    # ------------------------------------------------------------------ prefill
    def _forward(self, ids: torch.Tensor, past: DynamicCache) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kwargs(self.model, past))
        return out.logits[0, -1].float()

    def _restore(self, tokens: list[int], req_id: str) -> tuple[DynamicCache, int, int, dict[str, int]]:
        """The cache to run the suffix on, how many tokens it holds (used), how many kvpipe served, by tier."""
        if self.cache is None:
            return self._new_cache(), 0, 0, {}
        res = self.cache.retrieve(tokens, req_id=req_id)
        # Always recompute the last prompt token: its logits are what the first generated token comes from.
        used = min(res.num_tokens, len(tokens) - 1)
        if used <= 0 or res.kv is None:
            return self._new_cache(), 0, 0, {}
        kv = res.kv if used == res.num_tokens else res.kv[:, :, :used]
        expected = kv_shape_for(self.model.config, used)
        if tuple(kv.shape) != expected:
            # Same key prefix, different model: a config mistake (model_name), not worth crashing a request.
            log.warning("Reqid: %s: cached KV shape %s does not match the model's %s (is model_name %r shared "
                        "by two models?); recomputing", req_id, tuple(kv.shape), expected,
                        self.cache.config.model_name)
            return self._new_cache(), 0, 0, {}
        past = dynamic_cache_from_kv(kv, self.model.config, dtype=self.model.dtype, device=self.model.device)
        return past, used, res.num_tokens, dict(res.hits_by_tier)

    def _store(self, tokens: list[int], past: DynamicCache, already: int, req_id: str) -> int:
        """Store the chunks of ``tokens`` (all of whose KV is in ``past``) after the first ``already`` tokens."""
        if self.cache is None or not tokens:
            return 0
        cs = self.cache.config.chunk_size
        skip = already - already % cs
        end = len(tokens) if self.cache.config.save_unfull_chunk else len(tokens) - len(tokens) % cs
        # store() takes KV for all of ``tokens`` but reads only the unmasked full chunks (the last partial one
        # only with save_unfull_chunk): fill just that span of an uninitialized buffer (untouched pages of a large
        # torch.empty cost nothing). Called even when nothing is new, so every request logs its store line.
        kv = torch.empty(kv_shape_for(self.model.config, len(tokens)), dtype=self._kv_dtype)
        if end > skip:
            kv[:, :, skip:end] = kv_from_dynamic_cache(past, skip, end, dtype=self._kv_dtype)
        mask = torch.ones(len(tokens), dtype=torch.bool)
        mask[:skip] = False
        return self.cache.store(tokens, kv, mask=mask, req_id=req_id)

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int], *, store: bool = True, req_id: str | None = None
                ) -> PrefillResult:
        """Prefill ``prompt_ids`` (restoring the cached prefix) and return the last position's logits; with
        ``store`` the new chunks are stored.

        :raises ValueError: for an empty prompt.
        """
        tokens = [int(t) for t in prompt_ids]
        if not tokens:
            raise ValueError("prompt_ids: the prompt is empty")
        req = req_id or f"hf-{next(_req_ids)}"
        t0 = time.perf_counter()
        past, used, hit, by_tier = self._restore(tokens, req)
        t1 = time.perf_counter()
        ids = torch.tensor([tokens[used:]], dtype=torch.long, device=self.model.device)
        logits = self._forward(ids, past)
        t2 = time.perf_counter()
        stored = self._store(tokens, past, hit, req) if store else 0
        log.debug("Reqid: %s: restore %d tokens %.1f ms, forward %d tokens %.1f ms, store %.1f ms", req, used,
                  (t1 - t0) * 1e3, len(tokens) - used, (t2 - t1) * 1e3, (time.perf_counter() - t2) * 1e3)
        return PrefillResult(req, logits, past, len(tokens), hit, len(tokens) - used, by_tier, stored, t2 - t0)

    # ------------------------------------------------------------------ generation
    def _stop_ids(self, params: SamplingParams) -> set[int]:
        if params.stop_token_ids is not None:
            return set(params.stop_token_ids)
        ids: set[int] = set()
        for src in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(src, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif isinstance(eos, (list, tuple)):
                ids.update(int(e) for e in eos)
        return ids

    @torch.inference_mode()
    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None, *,
                 on_text: TextCallback | None = None, req_id: str | None = None) -> GenerationResult:
        """Generate up to ``params.max_new_tokens`` tokens after ``prompt_ids``, streaming text to ``on_text``.

        TTFT is measured from the call until the first token is picked (and handed to ``on_text``); the prompt's
        chunks are stored right after that, so storing never delays the first token. Generation ends at an
        end-of-sequence token (``finish_reason="stop"``), a stop string (cut from the text, ``"stop"``) or
        ``max_new_tokens`` (``"length"``).

        :raises ValueError: for an empty prompt.
        """
        params = params or SamplingParams()
        tokens = [int(t) for t in prompt_ids]
        if not tokens:
            raise ValueError("prompt_ids: the prompt is empty")
        req = req_id or f"hf-{next(_req_ids)}"
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stop_ids = self._stop_ids(params)
        stream = _TextStream(self.tokenizer, params.stop)
        t0 = time.perf_counter()
        pre = self.prefill(tokens, store=False, req_id=req)
        past, logits = pre.past_key_values, pre.logits
        out: list[int] = []
        finish: Literal["stop", "length"] = "length"
        ttft, stored = 0.0, 0
        while True:
            tok = _sample(logits, params, gen)
            if tok in stop_ids:
                finish = "stop"
                break
            out.append(tok)
            delta = stream.push(tok)
            if delta and on_text is not None:
                on_text(delta)
            if len(out) == 1:
                ttft = time.perf_counter() - t0
                stored = self._store(tokens, past, pre.hit_tokens, req)
            if stream.stopped:
                finish = "stop"
                break
            if len(out) >= params.max_new_tokens:
                break
            logits = self._forward(torch.tensor([[tok]], dtype=torch.long, device=self.model.device), past)
        if not out:
            ttft = time.perf_counter() - t0
            stored = self._store(tokens, past, pre.hit_tokens, req)
        tail = stream.finish()
        if tail and on_text is not None:
            on_text(tail)
        if self.save_decode_cache and out:
            # The cache holds KV for the prompt and every generated token that was fed back (not the last one
            # when generation ended on length or a stop string).
            seq = (tokens + out)[: past.get_seq_length()]
            stored += self._store(seq, past, len(tokens), req)
        return GenerationResult(req, tuple(out), stream.emitted, finish, len(tokens), pre.hit_tokens,
                                pre.hits_by_tier, stored, ttft, time.perf_counter() - t0)
