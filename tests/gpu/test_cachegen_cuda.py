"""CacheGen on CUDA: the lossy stage runs on the GPU, the container is the same, entries cross devices."""

from __future__ import annotations

import pytest
import torch

from kvpipe.serde.cachegen import CacheGenSerde

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="CacheGen CUDA path needs a CUDA device"),
]


def _kv(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn((8, 2, 256, 4, 64), generator=g).cumsum(2) * 0.1
    x = x * (torch.rand((4, 64), generator=g) * 2 + 0.2) + torch.randn((4, 64), generator=g)
    x[:, :, 0] *= 6
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_encode_cpu_decode_and_back(dtype: torch.dtype) -> None:
    serde = CacheGenSerde()
    kv = _kv(dtype)
    cpu_payload = bytes(serde.encode(kv))
    gpu_payload = bytes(serde.encode(kv.cuda()))
    # The same codec on either device: the containers decode anywhere, to (nearly) the same tensor.
    outs = []
    for payload in (cpu_payload, gpu_payload):
        for dev in ("cpu", "cuda"):
            out = torch.empty(kv.shape, dtype=dtype, device=dev)
            serde.decode_into(memoryview(payload), out)
            outs.append(out.cpu().float())
    ref = kv.float()
    tol = (ref.abs().amax() * 0.1).item()
    for out in outs:
        assert (out - ref).abs().max().item() < tol
    # Decoding one payload on CPU and on GPU gives the same values up to fp32 rounding (FMA vs mul+add).
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)
    assert torch.allclose(outs[2], outs[3], rtol=1e-3, atol=1e-3)
    # Sizes agree within rounding differences of the quantizer.
    assert abs(len(cpu_payload) - len(gpu_payload)) < 0.02 * len(cpu_payload)


def test_gpu_lossless_exact_across_devices() -> None:
    serde = CacheGenSerde(lossless=True)
    kv = _kv(torch.bfloat16)
    payload = bytes(serde.encode(kv.cuda()))
    assert payload == bytes(serde.encode(kv))
    out = torch.empty(kv.shape, dtype=kv.dtype, device="cuda")
    serde.decode_into(memoryview(payload), out)
    assert torch.equal(out.cpu().view(torch.uint8), kv.view(torch.uint8))
