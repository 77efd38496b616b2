"""``cachegen``: the CacheGen KV codec (anchor/delta quantization + per-table entropy coding) as a kvpipe Serde."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from kvpipe.config import parse_bool
from kvpipe.errors import ConfigError, CorruptEntry
from kvpipe.serde.cachegen import coder as _coder
from kvpipe.serde.cachegen.container import (
    CODER_CONSTRICTION,
    CODER_NATIVE,
    CONTAINER_VERSION,
    MODE_LOSSLESS,
    MODE_LOSSY,
    Container,
    freq_offsets,
    table_layout,
)
from kvpipe.serde.cachegen.quant import default_bins, dequantize_into, quantize
from kvpipe.serde.entry import DTYPE_CODES

__all__ = ["CacheGenSerde", "decode_symbols", "encode_symbols"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CODERS = {"constriction": CODER_CONSTRICTION, "native": CODER_NATIVE, "auto": 0}


def _bins_array(spec: int | Sequence[int] | None, layers: int, default: np.ndarray) -> np.ndarray:
    if spec is None:
        return default
    if isinstance(spec, int):
        return np.full(layers, spec, np.int64)
    vals = list(spec)
    # A schedule shorter than the model repeats its last value (e.g. [32]*10 + [16] covers any depth).
    vals = (vals + [vals[-1]] * layers)[:layers]
    return np.asarray(vals, np.int64)


def _check_bins(name: str, spec: int | Sequence[int] | None) -> None:
    if spec is None:
        return
    vals = [spec] if isinstance(spec, int) else list(spec)
    if not vals or any(not isinstance(v, int) or not 2 <= v <= 254 for v in vals):
        raise ConfigError(f"{name}={spec!r}: expected bin counts (ints in 2..254), one per layer or a single int")


@attrs.define(eq=False)
class CacheGenSerde:
    """The CacheGen codec. ``encode`` returns a self-validating container (:mod:`.container`); ``decode_into``
    reconstructs into a preallocated tensor of the original shape and dtype, on CPU or CUDA.

    :param key_bins: quantization bins per layer for K (an int for all layers, or a per-layer list whose last value
        repeats); ``None``: the sensitivity-measured profile of :func:`.quant.default_bins` (16 to 72 bins).
    :param value_bins: likewise for V.
    :param anchor_group: tokens per anchor group (the first token of each group is its anchor). 256, i.e. one
        anchor row per 256-token chunk: measured on SmolLM2 (3 texts, 1536 positions, container v2), the anchor
        reference wins in < 0.1% of channels at this size and anchors every 64 or 128 tokens cost 2.1% / 0.8% more
        bytes at the same KL (0.00077); the bytes buy finer residual steps instead.
    :param anchor_bins: quantization bins of the anchors.
    :param table_group: channels per probability table; 0 = one table per head (``head_dim``; 64 for MLA).
    :param lossless: skip quantization and entropy-code the raw bytes (bit-exact; for testing the coder).
    :param coder: ``"auto"`` (native rANS when it builds here, else constriction), ``"native"`` (same fallback)
        or ``"constriction"``. The container records the coder; decoding handles either (a native entry needs
        the native coder where it is decoded: without a C++ compiler there it is a miss).
    """

    key_bins: int | Sequence[int] | None = None
    value_bins: int | Sequence[int] | None = None
    anchor_group: int = 256
    anchor_bins: int = 254
    table_group: int = 0
    lossless: bool = False
    coder: str = "auto"
    name: str = attrs.field(default="cachegen", init=False)
    raw: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        _check_bins("cachegen_key_bins", self.key_bins)
        _check_bins("cachegen_value_bins", self.value_bins)
        if not 1 <= self.anchor_group <= 65535:
            raise ConfigError(f"cachegen_anchor_group={self.anchor_group!r}: expected 1..65535")
        if not 2 <= self.anchor_bins <= 254:
            raise ConfigError(f"cachegen_anchor_bins={self.anchor_bins!r}: expected 2..254")
        if self.table_group < 0:
            raise ConfigError(f"cachegen_table_group={self.table_group!r}: expected >= 0")
        if self.coder not in _CODERS:
            raise ConfigError(f"cachegen_coder={self.coder!r}: expected one of {sorted(_CODERS)}")

    def half_widths(self, layers: int, planes: int) -> np.ndarray:
        """Delta half-widths ``h`` ``[layers, planes]`` (symbols in ``[-h, h]``) for a model of this depth."""
        default = default_bins(layers, planes)
        cols = [_bins_array(self.key_bins, layers, default[:, 0])]
        if planes == 2:
            cols.append(_bins_array(self.value_bins, layers, default[:, 1]))
        return np.stack(cols, axis=1) // 2

    def encode(self, kv: torch.Tensor) -> memoryview:
        """Encode one chunk ``[L, 2, T, H, D]`` (or MLA ``[L, 1, T, D]``) of fp16/bf16/fp32 on CPU or CUDA.

        :raises ValueError: for an unsupported shape or dtype.
        """
        if kv.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"cachegen encodes fp16/bf16/fp32 KV, not {kv.dtype}")
        if kv.dim() not in (4, 5) or kv.shape[1] not in (1, 2) or kv.numel() == 0:
            raise ValueError(f"cachegen expects [L, 2|1, T, H, D] or [L, 1, T, D], got {tuple(kv.shape)}")
        n_l, n_s, t = kv.shape[:3]
        c = int(np.prod(kv.shape[3:]))
        x = kv.reshape(n_l, n_s, t, c)
        coder = _CODERS[self.coder]
        if coder != CODER_CONSTRICTION:
            coder = CODER_NATIVE if _native_available() else CODER_CONSTRICTION
        if self.lossless:
            esize = kv.element_size()
            # Byte planes [L, S, E, T, C]: each plane of each (layer, K/V) gets its own table.
            planes = x.contiguous().view(torch.uint8).view(n_l, n_s, t, c, esize).permute(0, 1, 4, 2, 3)
            sym = planes.to(torch.int32).cpu().reshape(-1).numpy()
            half = use_delta = ascale = dscale = np.empty(0, np.uint8)
            mid = np.empty(0, np.uint16)
            group, tgroup, ahalf, sbase = 1, esize, 1, 0
        else:
            group, ahalf = self.anchor_group, self.anchor_bins // 2
            tgroup = self._table_group(kv)
            half_t = torch.from_numpy(self.half_widths(n_l, n_s))
            q = quantize(x, half_t, group, ahalf)
            ng = c // tgroup
            ta = q.anchor_sym.shape[2]
            # One int32 buffer in table order; the copies below convert and permute in the same pass.
            sym_t = torch.empty((n_l * n_s, (ta + t) * c), dtype=torch.int32, device=x.device)
            sym_t[:, : ta * c].view(n_l, n_s, ta, c).copy_(q.anchor_sym)
            sym_t[:, ta * c:].view(n_l, n_s, ng, t, tgroup).copy_(
                q.delta_sym.unflatten(3, (ng, tgroup)).permute(0, 1, 3, 2, 4))
            sym = sym_t.cpu().reshape(-1).numpy()
            half = q.half.cpu().reshape(-1).numpy().astype(np.uint8)
            ascale = q.anchor_code.cpu().reshape(-1).numpy()
            dscale = q.delta_code.cpu().reshape(-1).numpy()
            sbase = q.scale_base
            mid = _bf16_bits(q.mid)
            use_delta = q.use_delta.to(torch.uint8).cpu().reshape(-1).numpy()
        mode = MODE_LOSSLESS if self.lossless else MODE_LOSSY
        alph, counts = table_layout(mode, n_l, n_s, t, c, group, tgroup, ahalf, half)
        freqs, seg_words, words = encode_symbols(sym, alph, counts, n_l * n_s, coder, mode)
        cont = Container(mode=mode, coder=coder, dtype_code=DTYPE_CODES[kv.dtype], shape=tuple(kv.shape),
                         layers=n_l, planes=n_s, tokens=t, channels=c, anchor_group=group, table_group=tgroup,
                         anchor_half=ahalf, half=half, use_delta=use_delta, anchor_scale=ascale, delta_scale=dscale,
                         mid=mid, freqs=freqs, seg_words=seg_words, words=words, scale_base=sbase)
        return memoryview(cont.to_bytes())

    def _table_group(self, kv: torch.Tensor) -> int:
        c = int(np.prod(kv.shape[3:]))
        g = self.table_group or (kv.shape[-1] if kv.dim() == 5 else 64)
        # Fall back to one table per (layer, K/V) when the group does not divide the channels.
        return g if 0 < g <= c and c % g == 0 else c

    def decode_into(self, payload: memoryview | bytes | bytearray, out: torch.Tensor) -> None:
        """Decode ``payload`` into ``out`` (the original shape and dtype; CPU or CUDA).

        :raises CorruptEntry: when the payload is not a valid container for ``out``.
        """
        try:
            self._decode_into(payload, out)
        except CorruptEntry:
            raise
        except (ValueError, TypeError, IndexError, OverflowError, RuntimeError, MemoryError) as e:
            # Anything the container checks missed (they should not) is still a miss, never a crash.
            raise CorruptEntry(f"cachegen payload does not decode: {e}") from None

    def _decode_into(self, payload: memoryview | bytes | bytearray, out: torch.Tensor) -> None:
        cont = Container.from_bytes(payload)
        if tuple(out.shape) != cont.shape or DTYPE_CODES.get(out.dtype) != cont.dtype_code:
            raise CorruptEntry(f"cachegen payload is for {cont.shape}/dtype code {cont.dtype_code}, "
                               f"not {tuple(out.shape)}/{out.dtype}")
        n_l, n_s, t, c = cont.layers, cont.planes, cont.tokens, cont.channels
        alph, counts = cont.table_layout()
        freq_off = cont.freq_offsets()
        if cont.mode == MODE_LOSSY:
            ascale, dscale, mid = cont.scales()
        if (cont.mode == MODE_LOSSY and cont.coder == CODER_NATIVE and out.device.type == "cpu"
                and out.is_contiguous()):
            # One fused pass in C++: entropy decode, dequantize, convert to the output dtype.
            from kvpipe.serde.cachegen import native

            native.decode_lossy_into(cont, alph, counts, freq_off, ascale, dscale, mid, out.data_ptr(),
                                     str(out.dtype).removeprefix("torch."))
            return
        sym = np.empty(int(counts.sum()), np.uint8 if cont.coder == CODER_NATIVE else np.int32)
        decode_symbols(cont, alph, counts, sym)
        sym_t = torch.from_numpy(sym)
        if cont.mode == MODE_LOSSLESS:
            esize = cont.table_group
            if out.element_size() != esize:
                raise CorruptEntry(f"cachegen lossless element size {esize} does not match {out.dtype}")
            planes = sym_t.view(n_l, n_s, esize, t, c).permute(0, 1, 3, 4, 2)
            raw = torch.empty((n_l, n_s, t, c, esize), dtype=torch.uint8)
            raw.copy_(planes)
            out.copy_(raw.view(out.dtype).view(out.shape))
            return
        ta = -(-t // cont.anchor_group)
        ng = c // cont.table_group
        per_seg = sym_t.view(n_l * n_s, ta * c + t * c)
        anchors = per_seg[:, : ta * c].reshape(n_l, n_s, ta, c)
        deltas = per_seg[:, ta * c:].view(n_l, n_s, ng, t, cont.table_group).permute(0, 1, 3, 2, 4)
        if out.device.type != "cpu":
            # Symbols fit a byte: ship a quarter of the bytes to the device, laid out there.
            deltas = deltas.to(torch.uint8).to(out.device, non_blocking=True)
        dequantize_into(out, anchors, deltas, torch.from_numpy(cont.half.astype(np.int64)).view(n_l, n_s),
                        torch.from_numpy(ascale).view(n_l, n_s, c), torch.from_numpy(dscale).view(n_l, n_s, c),
                        torch.from_numpy(cont.use_delta.astype(np.bool_)).view(n_l, n_s, c),
                        torch.from_numpy(mid).view(n_l, n_s, c), cont.anchor_group, cont.anchor_half)


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().cpu().reshape(-1).view(torch.int16).numpy().view(np.uint16)


def _native_available() -> bool:
    from kvpipe.serde.cachegen import native

    return native.available()


def encode_symbols(sym: np.ndarray, alphabets: np.ndarray, counts: np.ndarray, num_segments: int,
                   coder: int, mode: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entropy-code int32 symbols in table order: ``(freqs u16, words per segment u32, words u32)``, with the
    current container version's table sharing (:func:`.container.freq_offsets`)."""
    offsets, size, _ = freq_offsets(CONTAINER_VERSION, mode, alphabets, num_segments)
    freqs = _coder.count_freqs(sym, alphabets, counts, offsets, size)
    if coder == CODER_NATIVE:
        from kvpipe.serde.cachegen import native

        seg_words, words = native.encode(sym, alphabets, counts, freqs, offsets, num_segments)
    elif coder == CODER_CONSTRICTION:
        seg_words, words = _coder.encode_constriction(sym, alphabets, counts, freqs, offsets, num_segments)
    else:
        raise ValueError(f"unsupported cachegen coder id {coder}")
    return freqs, seg_words, words


def decode_symbols(cont: Container, alphabets: np.ndarray, counts: np.ndarray, out: np.ndarray) -> None:
    """Decode a container's streams into ``out`` (table order; uint8 for the native coder, else int32).

    :raises CorruptEntry: when the streams do not decode, or need a coder that is not available here.
    """
    offsets = cont.freq_offsets()
    if cont.coder == CODER_NATIVE:
        from kvpipe.serde.cachegen import native

        native.decode(cont.seg_words, cont.words, alphabets, counts, cont.freqs, offsets, out)
        return
    _coder.decode_constriction(cont.seg_words, cont.words, alphabets, counts, cont.freqs, offsets, out)


def create_cachegen_serde(config: Any) -> CacheGenSerde:
    """Build the serde from a kvpipe config's ``cachegen_*`` keys (missing keys take the defaults, as do keys that
    a :class:`kvpipe.config.Config` reports as left at its own default: the codec's measured defaults win there).

    Keys (attributes of the config, else entries of its ``extra_config`` mapping): ``cachegen_bins`` (per-layer
    bins for K and V; the last value repeats), ``cachegen_key_bins`` / ``cachegen_value_bins`` (override per
    plane), ``cachegen_anchor_group``, ``cachegen_anchor_bins``, ``cachegen_table_group``, ``cachegen_lossless``,
    ``cachegen_coder`` (``auto`` | ``native`` | ``constriction``).

    :raises ConfigError: for an invalid value.
    """
    extra = getattr(config, "extra_config", None) or getattr(config, "extra", None) or {}

    source_of = getattr(config, "source_of", None)

    def opt(name: str, default: Any) -> Any:
        value = getattr(config, name, None)
        if callable(source_of) and source_of(name) == "default":
            value = None
        if value is None:
            value = extra.get(name, default) if isinstance(extra, dict) else default
        return default if value is None else value

    def as_bins(value: Any) -> int | list[int] | None:
        if value is None or isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                parts = [int(v) for v in value.replace(" ", "").split(",") if v]
            except ValueError:
                raise ConfigError(f"bad cachegen bins {value!r}: expected comma-separated ints") from None
            return parts[0] if len(parts) == 1 else parts
        return [int(v) for v in value]

    both = as_bins(opt("cachegen_bins", None))
    try:
        return CacheGenSerde(key_bins=as_bins(opt("cachegen_key_bins", both)),
                             value_bins=as_bins(opt("cachegen_value_bins", both)),
                             anchor_group=int(opt("cachegen_anchor_group", 256)),
                             anchor_bins=int(opt("cachegen_anchor_bins", 254)),
                             table_group=int(opt("cachegen_table_group", 0)),
                             lossless=parse_bool("cachegen_lossless", opt("cachegen_lossless", False)),
                             coder=str(opt("cachegen_coder", "auto")))
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"bad cachegen config: {e}") from None
