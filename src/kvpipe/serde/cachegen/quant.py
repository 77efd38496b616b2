"""CacheGen's lossy stage: anchor/delta quantization along tokens, with per-layer bin counts.

Everything here is torch on the tensor's own device (CPU or CUDA), so the GPU path is the same code; only the
entropy coder runs on the host. All arithmetic is fp32; anchor scales and residual steps are stored as 8-bit
log-domain codes (1/8 octave apart, :func:`kvpipe.serde.cachegen.container.scale_values`) and the quantizer uses
the coded values, mid-ranges as bf16.

For each layer ``l`` and plane ``s`` (K or V) the tokens are cut into groups of ``G``; the first token of each
group is its *anchor*:

* anchors are quantized symmetrically with ``2a+1`` levels and a per-channel scale (max |anchor| / a);
* every token (anchors included, their residual is tiny) is then coded as a residual against a *reference*,
  with a per-channel step (values: max |residual| / h; keys: closer to uniform, see :func:`_steps`) and at most
  ``2h+1`` levels. The reference is chosen per channel: the
  group's *reconstructed* anchor ``â`` (CacheGen's delta), or the channel's mid-range ``m`` over the chunk
  (centered direct coding), whichever leaves the smaller range. Measured on SmolLM2's KV (post-RoPE keys), the
  anchor delta has the smaller range in only ~11% of key channels and ~1% of value channels at ``G = 16`` (token
  locality is weaker than the paper's larger models show), so a fixed delta would cost 30-40% more range than
  necessary. Because residuals are taken against ``â``, anchor error never propagates: each token's error is
  half a step at most. Anchor tokens always use their own ``â`` as reference (residual = rounding error only):
  this keeps outlier tokens such as the attention sink near-exact. Measured on SmolLM2: without this, mean KL
  to full prefill rose 5x at the same size.

``h`` comes from the per-layer bin counts: more bins in the layers measured most sensitive (see
:func:`default_bins`), not simply the first ones as the paper's (and LMCache's) configs have it.
"""

from __future__ import annotations

import math

import attrs
import numpy as np
import torch

from kvpipe.serde.cachegen.container import (
    SCALE_BASE_MAX,
    SCALE_BASE_MIN,
    SCALE_CODES_PER_OCTAVE,
    scale_values,
)

__all__ = ["Quantized", "default_bins", "dequantize_into", "quantize"]

# Default bins per layer, measured on SmolLM2-135M (30 layers) real KV: each layer's K (then V) alone was cut
# to 16 bins with every other plane at 254, and the rise of mean next-token KL vs a full prefill was recorded;
# bins were then set proportional to sqrt(rise) (the allocation that minimises the summed KL at a fixed
# log2(bins) budget), 16 at least. Sensitivity is far from "early layers first": K peaks in layers 17-24 and
# 7-8, V in layers 3-8. LMCache's schedule (K 32 bins in the first 10/32 layers, V in the first 2/32, 16 after)
# gave 3.51x at 95.3% top-1 / KL 0.0054 here; this one gives ~3.5x at ~98-99% / KL ~0.0007-0.0014 (bench
# quality section, two texts). Other depths sample the profile at the same relative depth.
_PROFILE_KEY = (16, 16, 18, 16, 16, 16, 16, 42, 38, 26, 24, 16, 16, 16, 26, 22, 16, 44, 60, 16, 66, 38, 26, 72, 40,
                16, 18, 16, 22, 16)
_PROFILE_VALUE = (16, 16, 16, 58, 64, 40, 46, 56, 48, 26, 20, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 16, 26,
                  20, 16, 16, 16, 16, 16)
# Keeps pathological fp32 inputs (inf, 1e38) from overflowing the fp32 delta arithmetic.
_CLAMP = 1e30


def _resample(profile: tuple[int, ...], layers: int) -> np.ndarray:
    src = np.asarray(profile, np.int64)
    # Layer i of an n-layer model takes the profile's layer at the same relative depth (centre of the layer).
    idx = np.minimum(((np.arange(layers) + 0.5) * len(src) / layers).astype(np.int64), len(src) - 1)
    return src[idx]


def default_bins(layers: int, planes: int) -> np.ndarray:
    """Bin counts ``[layers, planes]`` (planes: K then V; MLA's single plane uses the key schedule)."""
    cols = [_resample(_PROFILE_KEY, layers)]
    if planes == 2:
        cols.append(_resample(_PROFILE_VALUE, layers))
    return np.stack(cols, axis=1)


@attrs.frozen
class Quantized:
    """The lossy stage's output for one chunk (tensors on the input's device)."""

    anchor_sym: torch.Tensor  # fp32 integral [L, S, Ta, C], values in [0, 2a]
    delta_sym: torch.Tensor  # fp32 integral [L, S, T, C] (a view of padded storage), values in [0, 2h_ls]
    anchor_code: torch.Tensor  # uint8 [L, S, C]: anchor scale codes
    delta_code: torch.Tensor  # uint8 [L, S, C]: residual step codes
    scale_base: int  # exponent base of the codes
    use_delta: torch.Tensor  # bool [L, S, C]: reference is the anchor (else the mid-range)
    mid: torch.Tensor  # bf16 [L, S, C]
    half: torch.Tensor  # int64 [L, S]: delta half-widths used (symbols in [0, 2h])


class _Scales:
    """8-bit log-domain scale codes for one chunk: code ``k`` is ``2 ** ((k + base) / 8)``, the base chosen so
    that the largest code covers 4x the chunk's largest magnitude (no scale can need more: a step above the
    whole range is never chosen) and the smallest is 32 octaves below it."""

    def __init__(self, amax: float, device: torch.device) -> None:
        top = max(4.0 * amax, 2.0 ** -100)
        base = math.ceil(SCALE_CODES_PER_OCTAVE * math.log2(top)) - 255
        self.base = min(max(base, SCALE_BASE_MIN), SCALE_BASE_MAX)
        self.values = torch.from_numpy(scale_values(self.base)).to(device)

    def code(self, target: torch.Tensor, *, up: bool = False) -> torch.Tensor:
        """Codes (int64) nearest to ``target`` in the log domain, or the smallest codes at least ``target``;
        zero or tiny targets get code 0 (a constant channel's symbols are all zero anyway)."""
        lg = torch.log2(target.clamp_min(1e-38)) * SCALE_CODES_PER_OCTAVE - self.base
        k = torch.ceil(lg - 1e-3) if up else torch.round(lg)
        k = k.clamp_(0, 255).to(torch.int64)
        if up:  # guard the log's rounding: the coded value must not fall below the target
            k = torch.where(self.values[k] < target, (k + 1).clamp_(max=255), k)
        return k


def quantize(x: torch.Tensor, half: torch.Tensor, anchor_group: int, anchor_half: int, key_alpha: float = 0.5,
             step_scale: float = 0.9) -> Quantized:
    """Quantize ``x`` ``[L, S, T, C]`` (any float dtype); ``half`` ``[L, S]``: the bin budget per (layer, plane)
    as half-widths (the steps follow :func:`_steps`; the half-widths actually used are in the result).

    Works on the tokens padded to whole groups (the pad repeats the last token, which changes no range), viewed
    as ``[L, S, groups, G, C]`` so that anchors broadcast over their group without a gather (``index_select``
    along tokens measured 3 s for an 8B chunk here; the broadcast costs one pass).
    """
    n_l, n_s, t, c = x.shape
    g = anchor_group
    ta = -(-t // g)
    xp = torch.empty((n_l, n_s, ta * g, c), dtype=torch.float32, device=x.device)
    xp[:, :, :t] = x
    if ta * g > t:
        xp[:, :, t:] = xp[:, :, t - 1:t]
    torch.nan_to_num(xp, nan=0.0, posinf=_CLAMP, neginf=-_CLAMP, out=xp).clamp_(-_CLAMP, _CLAMP)
    scales = _Scales(float(xp.abs().amax()), x.device)
    xg = xp.view(n_l, n_s, ta, g, c)
    anchors = xg[:, :, :, 0, :]
    acode = scales.code(anchors.abs().amax(dim=2) / float(anchor_half), up=True)
    ascale_f = scales.values[acode].unsqueeze(2)
    aq = torch.round(anchors / ascale_f).clamp_(-anchor_half, anchor_half)
    a_hat = aq * ascale_f  # [L, S, ta, C]
    anchor_resid = anchors - a_hat
    if g > 1:
        # Anchor rows always take the anchor as reference (their residual is only the anchor's rounding error)
        # and stay out of the ranges: outlier tokens such as the attention sink at position 0 then keep 8-bit
        # precision without widening every other token's step.
        rest = xg[:, :, :, 1:, :]
        hi, lo = rest.amax(dim=(2, 3)), rest.amin(dim=(2, 3))
        mid = ((hi + lo) * 0.5).to(torch.bfloat16)
        mid_f = mid.float()
        centered_range = torch.maximum(hi - mid_f, mid_f - lo)
        delta_rest = rest - a_hat.unsqueeze(3)
        delta_range = torch.maximum(delta_rest.amax(dim=(2, 3)), -delta_rest.amin(dim=(2, 3)))
        del delta_rest
        use_delta = delta_range <= centered_range
        rng = torch.where(use_delta, delta_range, centered_range)
        ref = torch.where(use_delta.unsqueeze(2), a_hat, mid_f.unsqueeze(2))
    else:
        mid = torch.zeros((n_l, n_s, c), dtype=torch.bfloat16, device=x.device)
        use_delta = torch.ones((n_l, n_s, c), dtype=torch.bool, device=x.device)
        rng = torch.zeros((n_l, n_s, c), device=x.device)
        ref = a_hat
    rng = torch.maximum(rng, anchor_resid.abs().amax(dim=2))
    dcode, used_half = _steps(rng, half.to(device=x.device, dtype=torch.float32), key_alpha, step_scale, scales)
    resid = xg.sub_(ref.unsqueeze(3))
    resid[:, :, :, 0, :] = anchor_resid
    hb = used_half.float()[:, :, None, None, None].expand(n_l, n_s, 1, 1, c)
    dq = resid.div_(scales.values[dcode][:, :, None, None, :]).round_()
    dq = torch.clamp_(dq, min=-hb, max=hb).add_(hb)
    return Quantized(anchor_sym=aq.add_(anchor_half), delta_sym=dq.view(n_l, n_s, ta * g, c)[:, :, :t],
                     anchor_code=acode.to(torch.uint8), delta_code=dcode.to(torch.uint8), scale_base=scales.base,
                     use_delta=use_delta, mid=mid, half=used_half)


def _steps(rng: torch.Tensor, half: torch.Tensor, key_alpha: float, step_scale: float, scales: _Scales
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual step code per channel (int64 ``[L, S, C]``) and the half-width each (layer, plane) then needs.

    The bin count ``2h+1`` of a (layer, plane) sets its typical step, ``g / h`` with ``g`` the geometric mean of
    the channels' residual ranges; channel ``c`` gets ``step_scale * g / h * (range_c / g) ** alpha``. Values use
    ``alpha = 1`` (step proportional to the range: every channel gets ``2h+1`` bins, as in CacheGen); keys use
    ``key_alpha`` (0.5 by default): with entropy coding a narrow channel's extra bins cost bits while its error
    is already small, and a wide (outlier) channel's step would be large, so steps closer to uniform spend the
    bits where the error is. Measured on SmolLM2 (3 texts, 1536 positions, same ratio): mean KL 0.00095 ->
    0.00082 with alpha_k 0.5 (0: 0.00074 but 2% larger; 0.75 and 1.5 worse; re-checked with container v2 and
    anchor group 256: alpha_k 0.25 / 0.75 and alpha_v 0.75 all worse). ``step_scale`` 0.9 spends what container v2
    and the 256-token anchor group saved on finer steps: 3.54x at KL 0.00053 (1.05 with v1 and G = 64: 3.53x at
    0.00082). The step codes are 1/8 octave apart, so KL is not monotone in ``step_scale`` at this resolution
    (0.85: 3.48x, 0.00056). No channel gets more than 255 levels (step >= range / 127); ``h`` is then what the
    widest channel needs, at most 127.
    """
    n_s = rng.shape[1]
    alpha = torch.tensor([key_alpha, 1.0][:n_s], device=rng.device).view(1, n_s, 1)
    r = rng.clamp_min(1e-30)
    gmean = r.log().mean(dim=-1, keepdim=True).exp()
    step = (step_scale * gmean / half.unsqueeze(-1)) * (r / gmean).pow(alpha)
    # The nearest code, but never below what keeps range / step <= 127.
    code = torch.maximum(scales.code(step), scales.code(rng * (1.0 / 127), up=True))
    used = torch.ceil(rng / scales.values[code] - 1e-4).amax(dim=-1).clamp_(1, 127).to(torch.int64)
    return code, used


def dequantize_into(out: torch.Tensor, anchor_sym: torch.Tensor, delta_sym: torch.Tensor, half: torch.Tensor,
                    anchor_scale: torch.Tensor, delta_scale: torch.Tensor, use_delta: torch.Tensor,
                    mid: torch.Tensor, anchor_group: int, anchor_half: int) -> None:
    """Reconstruct into ``out`` viewed as ``[L, S, T, C]``.

    ``delta_sym`` is any integer tensor ``[L, S, T, C]`` or ``[L, S, T, ng, g]`` (e.g. a permuted view of the
    decoded table order); it is converted to fp32 while being laid out, so the layout costs no extra pass.
    """
    n_l, n_s, t = delta_sym.shape[:3]
    c = anchor_sym.shape[-1]
    dev = out.device
    ta = -(-t // anchor_group)
    ascale = anchor_scale.to(dev).float().unsqueeze(2)
    dscale = delta_scale.to(dev).float()
    hb = half.to(device=dev, dtype=torch.float32)[:, :, None, None]
    # bias[l, s, a, c] = reference - h * scale, so that x = q * scale + bias: one fused multiply-add per element.
    a_hat = (anchor_sym.to(dev).float() - anchor_half).mul_(ascale)
    ref = torch.where(use_delta.to(dev).unsqueeze(2), a_hat, mid.to(dev).float().unsqueeze(2))
    shift = hb * dscale.unsqueeze(2)
    bias = ref.sub_(shift)
    work = torch.empty((n_l, n_s, ta * anchor_group, c), dtype=torch.float32, device=dev)
    work[:, :, :t].view(delta_sym.shape).copy_(delta_sym)
    grouped = work.view(n_l, n_s, ta, anchor_group, c)
    # Anchor rows are residuals against â whatever the channel's reference: reconstruct them apart (1/G rows).
    anchor_rows = torch.addcmul(a_hat.sub_(shift), grouped[:, :, :, 0, :], dscale.unsqueeze(2))
    torch.addcmul(bias.unsqueeze(3), grouped, dscale[:, :, None, None, :], out=grouped)
    grouped[:, :, :, 0, :] = anchor_rows
    out.view(n_l, n_s, t, c).copy_(work[:, :, :t])
