"""Layout adapter between kvpipe's chunk tensor and Hugging Face transformers' ``DynamicCache``.

kvpipe moves KV as ``[num_layers, 2, tokens, num_kv_heads, head_dim]`` (K at index 0, V at 1). transformers 5.x
keeps one ``DynamicLayer`` per decoder layer whose ``keys``/``values`` are ``[batch, num_kv_heads, seq,
head_dim]``. Only batch 1 and plain full-attention ``DynamicLayer`` s are supported: a sliding-window layer drops
old positions, a quantized or offloaded layer stores something else, and a static cache has a fixed length, so a
restored prefix would not mean the same thing there. Those raise :class:`UnsupportedCache` instead of silently
producing wrong logits.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from kvpipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import DynamicCache

__all__ = [
    "UnsupportedCache",
    "cache_kwargs",
    "check_dynamic_cache",
    "dynamic_cache_from_kv",
    "kv_from_dynamic_cache",
    "kv_shape_for",
]


_CACHE_ARG: dict[type, str] = {}


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``cache`` as the keyword argument ``model``'s forward takes it: ``cache`` since transformers 5.24, which
    deprecated ``past_key_values`` (a FutureWarning on every call; removed in 5.40), ``past_key_values`` before.
    The cache object is updated in place either way."""
    kind = type(model)
    name = _CACHE_ARG.get(kind)
    if name is None:
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}  # type: ignore[assignment]
        name = _CACHE_ARG[kind] = ("cache" if "cache" in params and "past_key_values" not in params
                                   else "past_key_values")
    return {name: cache}


class UnsupportedCache(ConfigError):
    """The model's cache type or layout cannot be restored from kvpipe chunks (sliding window, quantized, static,
    offloaded, batch > 1, MLA)."""


def check_dynamic_cache(cache: object) -> None:
    """Check that ``cache`` is a ``DynamicCache`` made only of plain full-attention ``DynamicLayer`` s.

    :raises UnsupportedCache: naming the cache or layer type that is not supported.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache):
        raise UnsupportedCache(f"cache type {type(cache).__name__} is not supported: kvpipe restores prefixes into "
                               "a transformers DynamicCache only (no StaticCache, QuantizedCache, encoder-decoder "
                               "or linear-attention caches)")
    if getattr(cache, "offloading", False):
        raise UnsupportedCache("an offloading DynamicCache is not supported by the kvpipe transformers integration")
    for i, layer in enumerate(cache.layers):
        # Exact type: subclasses (sliding window, quantized, indexed, linear attention) keep different contents.
        if type(layer) is not DynamicLayer:
            raise UnsupportedCache(f"cache layer {i} is a {type(layer).__name__}: only full-attention "
                                   "DynamicLayer caches can take a restored prefix (sliding-window and "
                                   "quantized layers are not supported)")


def kv_shape_for(model_config: Any, num_tokens: int) -> tuple[int, int, int, int, int]:
    """The chunk-tensor shape ``[layers, 2, num_tokens, kv_heads, head_dim]`` for a transformers model config.

    :raises UnsupportedCache: for configs without the usual attention fields (e.g. MLA models).
    """
    cfg = model_config.get_text_config(decoder=True) if hasattr(model_config, "get_text_config") else model_config
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    except AttributeError as exc:
        raise UnsupportedCache(f"model config {type(cfg).__name__} has no standard attention shape: {exc}") from None
    if getattr(cfg, "kv_lora_rank", None):
        raise UnsupportedCache(f"{type(cfg).__name__}: MLA (latent) attention is not supported by the transformers "
                               "integration")
    return layers, 2, num_tokens, heads, head_dim


def kv_from_dynamic_cache(cache: DynamicCache, start: int = 0, end: int | None = None, *,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gather tokens ``[start, end)`` of a batch-1 ``DynamicCache`` into a new contiguous chunk tensor
    ``[layers, 2, end - start, kv_heads, head_dim]`` (one copy; ``dtype`` converts on the way).

    :raises UnsupportedCache: for an unsupported cache, batch > 1, or layers of different lengths.
    :raises ValueError: for a span outside the cached sequence.
    """
    check_dynamic_cache(cache)
    layers: list[Any] = list(cache.layers)  # all DynamicLayer (checked); transformers types them as a union
    if not layers or not layers[0].is_initialized:
        raise ValueError("kv_from_dynamic_cache: the cache is empty")
    k0 = layers[0].keys
    batch, heads, seq, head_dim = k0.shape
    if batch != 1:
        raise UnsupportedCache(f"batch size {batch}: the kvpipe transformers integration handles one sequence")
    end = seq if end is None else end
    if not 0 <= start <= end <= seq:
        raise ValueError(f"kv_from_dynamic_cache: span [{start}, {end}) outside the {seq} cached tokens")
    out = torch.empty((len(layers), 2, end - start, heads, head_dim), dtype=dtype or k0.dtype)
    for i, layer in enumerate(layers):
        if layer.keys.shape != k0.shape or layer.values.shape != k0.shape:
            raise UnsupportedCache(f"cache layer {i} has shape {tuple(layer.keys.shape)}, layer 0 "
                                   f"{tuple(k0.shape)}: layers of different shapes are not supported")
        # [1, heads, seq, dim] -> [seq, heads, dim]: copy_ handles the strided source in one pass.
        out[i, 0].copy_(layer.keys[0, :, start:end].transpose(0, 1))
        out[i, 1].copy_(layer.values[0, :, start:end].transpose(0, 1))
    return out


def dynamic_cache_from_kv(kv: torch.Tensor, model_config: Any | None = None, *,
                          dtype: torch.dtype | None = None, device: torch.device | str | None = None
                          ) -> DynamicCache:
    """A batch-1 ``DynamicCache`` holding ``kv`` (``[layers, 2, tokens, kv_heads, head_dim]``) as its prefix.

    No copy on CPU when ``dtype``/``device`` match: each layer's keys/values are transposed views of ``kv``
    (the model's next forward concatenates them with the new tokens, which makes the one contiguous copy), so
    ``kv`` must not be modified while the cache is in use.

    :raises UnsupportedCache: when ``model_config`` asks for layer types other than full attention, or the layer
        count / head shape does not match it.
    :raises ValueError: for a tensor that is not a 5-D chunk tensor.
    """
    from transformers import DynamicCache

    if kv.dim() != 5 or kv.shape[1] != 2:
        raise ValueError(f"kv: expected [layers, 2, tokens, heads, head_dim], got {tuple(kv.shape)}")
    if model_config is not None:
        expected = kv_shape_for(model_config, kv.shape[2])
        if tuple(kv.shape) != expected:
            raise UnsupportedCache(f"kv shape {tuple(kv.shape)} does not match the model's "
                                   f"[layers, 2, tokens, kv_heads, head_dim] = {expected}")
    cache = DynamicCache(config=model_config) if model_config is not None else DynamicCache()
    check_dynamic_cache(cache)
    if kv.dtype != (dtype or kv.dtype) or (device is not None and kv.device != torch.device(device)):
        kv = kv.to(device=device, dtype=dtype)
    if not cache.layers:
        # No config: DynamicCache grows layers lazily; build them now, one per kv layer.
        from transformers.cache_utils import DynamicLayer

        cache.layers = [DynamicLayer() for _ in range(kv.shape[0])]
    if len(cache.layers) != kv.shape[0]:
        raise UnsupportedCache(f"kv has {kv.shape[0]} layers, the model's cache {len(cache.layers)}")
    layers: list[Any] = list(cache.layers)
    for i, layer in enumerate(layers):
        k = kv[i, 0].transpose(0, 1).unsqueeze(0)  # [tokens, heads, dim] -> [1, heads, tokens, dim]
        v = kv[i, 1].transpose(0, 1).unsqueeze(0)
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache
