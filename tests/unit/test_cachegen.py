"""CacheGen serde: container round trips, lossy accuracy bounds, lossless exactness, coder exactness, config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvpipe.errors import ConfigError, CorruptEntry
from kvpipe.serde.base import Serde
from kvpipe.serde.cachegen import CacheGenSerde, Container, create_cachegen_serde, native
from kvpipe.serde.cachegen.container import (
    CODER_CONSTRICTION,
    CODER_NATIVE,
    MODE_LOSSLESS,
    MODE_LOSSY,
    table_layout,
)
from kvpipe.serde.cachegen.quant import default_bins
from kvpipe.serde.cachegen.serde import decode_symbols, encode_symbols


def _kv(shape: tuple[int, ...], dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    """KV-like data: per-channel offsets and scales, smooth along tokens, an outlier first token."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).cumsum(2) * 0.2
    chan = shape[3:]
    x = x * (torch.rand(chan, generator=g) * 3 + 0.1) + torch.randn(chan, generator=g) * 2
    x[:, :, 0] *= 8  # an attention-sink-like outlier token
    return x.to(dtype)


def _roundtrip(serde: CacheGenSerde, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
    payload = serde.encode(kv)
    out = torch.empty_like(kv)
    serde.decode_into(memoryview(payload), out)
    return out, len(payload)


def test_is_a_serde() -> None:
    s = CacheGenSerde()
    assert isinstance(s, Serde)
    assert (s.name, s.lossless, s.raw) == ("cachegen", False, False)
    assert CacheGenSerde(lossless=True).lossless


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(4, 2, 64, 2, 16), (3, 2, 37, 1, 8), (2, 2, 1, 2, 4), (4, 1, 50, 96)])
def test_lossy_roundtrip_bounded_error(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    kv = _kv(shape, dtype)
    s = CacheGenSerde(anchor_group=16)
    out, _ = _roundtrip(s, kv)
    assert out.shape == kv.shape and out.dtype == kv.dtype
    x = kv.float().reshape(shape[0], shape[1], shape[2], -1)
    err = (out.float().reshape(x.shape) - x).abs()
    # Every residual is at most half a step. A value step is 1.05 * (channel range) / h, a key step
    # 1.05 * sqrt(g * range) / h with g the geometric mean of the ranges (<= the widest range), h >= 8 by
    # default; plus the bf16 rounding of the step and the output dtype's own rounding.
    span = (x.amax(2) - x.amin(2)).clamp_min(1e-3)
    widest = span.amax(-1, keepdim=True)
    span_mix = torch.cat([(span[:, :1] * widest[:, :1]).sqrt(), span[:, 1:]], dim=1)
    bound = 1.06 * span_mix / 16 + x.abs().amax(2) * 2 ** -7 + 1e-3
    assert (err <= bound.unsqueeze(2)).all()


def test_lossy_compresses_smooth_kv() -> None:
    kv = _kv((8, 2, 256, 4, 32))
    _, n = _roundtrip(CacheGenSerde(), kv)
    assert kv.numel() * 2 / n > 3


def test_more_bins_less_error() -> None:
    kv = _kv((4, 2, 128, 2, 16), torch.float32)
    coarse, n_coarse = _roundtrip(CacheGenSerde(key_bins=8, value_bins=8), kv)
    fine, n_fine = _roundtrip(CacheGenSerde(key_bins=128, value_bins=128), kv)
    assert (fine - kv).abs().mean() < (coarse - kv).abs().mean() / 4
    assert n_fine > n_coarse


def test_sensitive_layers_get_more_bins() -> None:
    bins = default_bins(30, 2)
    assert bins.min() == 16 and bins.max() <= 254 and (bins % 2 == 0).all()
    # The measured profile: K most sensitive in layers 17-24, V in layers 3-8 (SmolLM2, 30 layers).
    assert bins[23, 0] == bins[:, 0].max() and bins[4, 1] == bins[:, 1].max()
    assert bins[0].tolist() == [16, 16] and bins[-1].tolist() == [16, 16]
    # Other depths sample the profile at the same relative depth.
    deep = default_bins(60, 2)
    assert deep.shape == (60, 2) and (deep[::2] == bins).all()
    assert default_bins(30, 1).shape == (30, 1) and (default_bins(30, 1)[:, 0] == bins[:, 0]).all()
    assert default_bins(1, 2).shape == (1, 2)
    half = CacheGenSerde(key_bins=[64, 32, 16], value_bins=8).half_widths(5, 2)
    assert half[:, 0].tolist() == [32, 16, 8, 8, 8] and half[:, 1].tolist() == [4] * 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_lossless_mode_is_bit_exact(dtype: torch.dtype) -> None:
    kv = _kv((3, 2, 40, 2, 8), dtype)
    flat = kv.view(-1)
    flat[0], flat[1], flat[2], flat[3] = float("inf"), float("-inf"), float("nan"), -0.0
    out, _ = _roundtrip(CacheGenSerde(lossless=True), kv)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


def test_lossless_mla_shape() -> None:
    kv = _kv((3, 1, 33, 40), torch.bfloat16)
    out, _ = _roundtrip(CacheGenSerde(lossless=True), kv)
    assert torch.equal(out.view(torch.uint8), kv.view(torch.uint8))


CODERS = [CODER_CONSTRICTION, pytest.param(CODER_NATIVE, marks=pytest.mark.skipif(
    not native.available(), reason="native rANS coder did not build (no C++ compiler)"))]


@pytest.mark.parametrize("coder", CODERS)
def test_coder_alone_is_exact(coder: int) -> None:
    rng = np.random.default_rng(1)
    half = np.array([16, 8, 4, 1], np.uint8)
    alph, counts = table_layout(MODE_LOSSY, 2, 2, 50, 12, 7, 4, 127, half)
    sym = np.concatenate([rng.integers(0, a, c, dtype=np.int32) for a, c in zip(alph, counts, strict=True)])
    sym[:100] = 0  # a skewed stretch
    freqs, seg_words, words = encode_symbols(sym, alph, counts, 4, coder, MODE_LOSSY)
    cont = Container(mode=MODE_LOSSY, coder=coder, dtype_code=1, shape=(2, 2, 50, 3, 4), layers=2,
                     planes=2, tokens=50, channels=12, anchor_group=7, table_group=4, anchor_half=127, half=half,
                     use_delta=np.zeros(48, np.uint8), anchor_scale=np.zeros(48, np.uint8),
                     delta_scale=np.zeros(48, np.uint8), mid=np.zeros(48, np.uint16), freqs=freqs,
                     seg_words=seg_words, words=words)
    back = Container.from_bytes(bytes(cont.to_bytes()))
    out = np.empty(len(sym), np.uint8 if coder == CODER_NATIVE else np.int32)
    decode_symbols(back, alph, counts, out)
    assert np.array_equal(out, sym)


@pytest.mark.parametrize("lossless", [False, True])
def test_coders_interoperate(lossless: bool) -> None:
    """Entries written with either coder decode with any serde instance (the container names its coder)."""
    if not native.available():
        pytest.skip("native rANS coder did not build (no C++ compiler)")
    kv = _kv((3, 2, 50, 2, 8), torch.bfloat16)
    a = CacheGenSerde(coder="constriction", lossless=lossless)
    b = CacheGenSerde(coder="native", lossless=lossless)
    pa, pb = a.encode(kv), b.encode(kv)
    assert Container.from_bytes(pa).coder == CODER_CONSTRICTION and Container.from_bytes(pb).coder == CODER_NATIVE
    outs = []
    for serde, payload in ((b, pa), (a, pb), (a, pa)):
        out = torch.empty_like(kv)
        serde.decode_into(memoryview(payload), out)
        outs.append(out)
    assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[2])


def test_container_roundtrip_fields() -> None:
    kv = _kv((2, 2, 20, 2, 4))
    payload = CacheGenSerde(anchor_group=5, table_group=4).encode(kv)
    c = Container.from_bytes(payload)
    assert (c.mode, c.coder, c.shape, c.layers, c.planes, c.tokens, c.channels) == \
        (MODE_LOSSY, CODER_NATIVE if native.available() else CODER_CONSTRICTION, (2, 2, 20, 2, 4), 2, 2, 20, 8)
    assert (c.anchor_group, c.table_group, c.anchor_half) == (5, 4, 127)
    assert bytes(c.to_bytes()) == bytes(payload)
    lossless = Container.from_bytes(CacheGenSerde(lossless=True).encode(kv))
    assert lossless.mode == MODE_LOSSLESS and lossless.table_group == 2


@pytest.mark.parametrize("coder", ["native", "constriction"])
def test_version_1_entries_still_decode(coder: str) -> None:
    """Containers written by the version-1 encoder (bf16 scales, byte flags, per-segment anchor tables; bytes
    captured from it in tests/data) decode to exactly what the version-1 decoder produced."""
    if coder == "native" and not native.available():
        pytest.skip("native rANS coder did not build (no C++ compiler)")
    data = np.load(Path(__file__).parent.parent / "data" / "cachegen_v1.npz", allow_pickle=False)
    payload = data[f"payload_{coder}"].tobytes()
    cont = Container.from_bytes(payload)
    assert cont.version == 1 and cont.anchor_group == 16
    out = torch.empty(data["input"].shape, dtype=torch.float16)
    CacheGenSerde().decode_into(memoryview(payload), out)
    assert np.array_equal(out.numpy(), data[f"decoded_{coder}"])
    strided = torch.empty((2 * out.shape[0], *out.shape[1:]), dtype=torch.float16)[::2]
    CacheGenSerde().decode_into(memoryview(payload), strided)  # the torch dequantization path
    assert torch.allclose(strided.float(), out.float(), rtol=2e-3, atol=1e-6)
    with pytest.raises(ValueError, match="version"):
        cont.to_bytes()  # only the current version is written


def test_version_2_side_information_is_smaller() -> None:
    """v2 stores 8-bit scale codes, bit flags and one shared anchor table: the same KV takes fewer bytes than
    its v1 entry, and every scale code's value is exactly what the encoder quantized with."""
    data = np.load(Path(__file__).parent.parent / "data" / "cachegen_v1.npz", allow_pickle=False)
    kv = torch.from_numpy(data["input"])
    payload = CacheGenSerde(coder="constriction", anchor_group=16).encode(kv)
    cont = Container.from_bytes(payload)
    assert cont.version == 2 and cont.anchor_scale.dtype == np.uint8
    assert len(payload) < len(data["payload_constriction"])
    n_l, n_s, t, c = cont.layers, cont.planes, cont.tokens, cont.channels
    assert cont.num_stored_tables() == 1 + n_l * n_s * (c // cont.table_group)
    ascale, dscale, _ = cont.scales()
    assert (ascale > 0).all() and (dscale > 0).all()
    out, _ = _roundtrip(CacheGenSerde(anchor_group=16), kv)
    # Every token is within half a residual step of the input (the residual steps bound the error).
    err = (out.float() - kv.float()).abs().view(n_l, n_s, t, c)
    bound = torch.from_numpy(dscale).view(n_l, n_s, 1, c) * 0.5 + kv.float().abs().view(n_l, n_s, t, c) * 1e-3
    assert (err <= bound).all()


def test_decode_into_wrong_target_is_corrupt() -> None:
    kv = _kv((2, 2, 16, 2, 4))
    payload = CacheGenSerde().encode(kv)
    with pytest.raises(CorruptEntry):
        CacheGenSerde().decode_into(payload, torch.empty((2, 2, 17, 2, 4), dtype=torch.float16))
    with pytest.raises(CorruptEntry):
        CacheGenSerde().decode_into(payload, torch.empty_like(kv, dtype=torch.float32))


def test_encode_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="fp16"):
        CacheGenSerde().encode(torch.zeros((2, 2, 4, 2, 2), dtype=torch.int32))
    with pytest.raises(ValueError, match="expects"):
        CacheGenSerde().encode(torch.zeros((2, 3, 4, 2, 2)))


def test_non_finite_lossy_input_does_not_crash() -> None:
    kv = _kv((2, 2, 16, 2, 4), torch.float32)
    kv[0, 0, 3, 0, 0] = float("nan")
    kv[1, 1, 5, 1, 1] = float("inf")
    out, _ = _roundtrip(CacheGenSerde(), kv)
    assert torch.isfinite(out).all()


def test_factory_reads_config_keys() -> None:
    class Cfg:
        cachegen_bins = (64, 32)
        cachegen_anchor_group = 8
        cachegen_lossless = False
        extra_config = {"cachegen_value_bins": "16", "cachegen_table_group": 4}

    s = create_cachegen_serde(Cfg())
    assert (s.key_bins, s.value_bins, s.anchor_group, s.table_group) == ([64, 32], 16, 8, 4)
    assert create_cachegen_serde(object()).anchor_group == 256


def test_factory_lossless_flag_strict() -> None:
    class Cfg:
        extra_config: dict[str, object] = {"cachegen_lossless": "yes"}

    assert create_cachegen_serde(Cfg()).lossless
    Cfg.extra_config = {"cachegen_lossless": "maybe"}  # was silently false; now the one-line error of every bool key
    with pytest.raises(ConfigError, match="cachegen_lossless: got 'maybe', expected true or false"):
        create_cachegen_serde(Cfg())


@pytest.mark.parametrize("kw", [{"key_bins": 1}, {"value_bins": [16, 300]}, {"anchor_group": 0},
                                {"anchor_bins": 255}, {"coder": "zstd"}, {"table_group": -1}])
def test_bad_config_is_config_error(kw: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        CacheGenSerde(**kw)  # type: ignore[arg-type]


def test_registered_as_plugin() -> None:
    from kvpipe.config import Config
    from kvpipe.plugins import registries

    serde = registries().serdes.get("cachegen")(Config.load(None, env={}, cachegen_anchor_group=4))
    assert isinstance(serde, CacheGenSerde) and serde.anchor_group == 4
    # Keys the config leaves at its own defaults take the codec's measured defaults.
    assert registries().serdes.get("cachegen")(Config.load(None, env={})).anchor_group == 256


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_native_fused_decode_matches_torch_path(dtype: torch.dtype) -> None:
    """The C++ fused decode+dequantize (contiguous CPU out) equals the torch dequantization (strided out)."""
    if not native.available():
        pytest.skip("native rANS coder did not build (no C++ compiler)")
    kv = _kv((3, 2, 45, 2, 16), dtype)
    payload = CacheGenSerde(coder="native", anchor_group=7).encode(kv)
    fused = torch.empty_like(kv)
    CacheGenSerde().decode_into(payload, fused)
    backing = torch.empty((6, *kv.shape[1:]), dtype=dtype)
    strided = backing[::2]
    assert not strided.is_contiguous()
    CacheGenSerde().decode_into(payload, strided)
    assert torch.allclose(fused.float(), strided.float(), rtol=2e-3, atol=1e-6)
