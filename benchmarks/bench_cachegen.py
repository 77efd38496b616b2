"""CacheGen serde: compression ratio, encode/decode throughput and quality on the real model, on CPU.

Measures, in one run:

* synthetic 8B-class chunks (32 layers, 8 KV heads, head_dim 128, 256 tokens, fp16 and bf16): ratio vs
  ``naive`` and vs plain per-channel 8-bit quantization; encode/decode GB/s of original KV (median, p99), with
  ``naive`` encode+decode measured in the same run as the baseline;
* SmolLM2-135M-Instruct (fp32) KV of real text (the demo's shipped report, plus GPL-3 and MPL-2.0 from
  ``/usr/share/common-licenses`` in a full run, or ``--text``): ratio, GB/s, and quality vs an fp32 full prefill
  over a continuation (1024-token context + 512 positions per text; --quick: 512 + 128 on the report):
  per-position top-1 agreement (with the reference's top-1/top-2 margin at each miss, to tell near-ties apart),
  KL divergence of the next-token distributions, greedy match length; side by side for a plain fp16 cast and bf16
  cast of the KV (the floor any codec is judged against), plain per-channel int8, and CacheGen.

Writes ``benchmarks/results/cachegen.json``. ``--quick`` shrinks repetitions and text lengths.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from kvpipe.serde.cachegen import CacheGenSerde
from kvpipe.serde.cachegen.quality import measure_quality, prefill_kv
from kvpipe.serde.naive import NaiveSerde


def _stats(times: list[float], nbytes: int) -> dict[str, float]:
    times = sorted(times)
    med = statistics.median(times)
    p99 = times[min(len(times) - 1, round(0.99 * (len(times) - 1)))]
    return {"median_ms": med * 1e3, "p99_ms": p99 * 1e3, "gbps_median": nbytes / med / 1e9}


def _int8_bytes(kv: torch.Tensor) -> int:
    """Plain 8-bit quantization: one byte per element + a 2-byte scale per (layer, K/V, channel)."""
    n_l, n_s = kv.shape[:2]
    c = kv[0, 0, 0].numel()
    return kv.numel() + n_l * n_s * c * 2


def int8_roundtrip(kv: torch.Tensor) -> torch.Tensor:
    """Plain symmetric per-channel 8-bit quantization over the chunk's tokens (the simple baseline)."""
    x = kv.float()
    scale = (x.abs().amax(dim=2, keepdim=True) / 127).clamp_min(1e-12)
    return ((x / scale).round() * scale).to(kv.dtype)


def time_serde(serde: Any, kv: torch.Tensor, reps: int) -> dict[str, Any]:
    """Encode/decode timings (after one warm-up) and the payload size."""
    out = torch.empty_like(kv)
    payload = serde.encode(kv)
    serde.decode_into(memoryview(payload), out)
    enc, dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        payload = serde.encode(kv)
        t1 = time.perf_counter()
        serde.decode_into(memoryview(payload), out)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    nbytes = kv.numel() * kv.element_size()
    return {"payload_bytes": len(payload), "encode": _stats(enc, nbytes), "decode": _stats(dec, nbytes)}


def synthetic_kv(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """An 8B-class chunk with KV-like statistics: per-channel offsets and scales, token locality, a sink token."""
    g = torch.Generator().manual_seed(seed)
    shape = (32, 2, 256, 8, 128)
    x = torch.randn(shape, generator=g)
    x = 0.6 * x + 0.4 * x.cumsum(2) / torch.arange(1, 257).sqrt().view(1, 1, -1, 1, 1)
    x = x * (torch.rand(shape[3:], generator=g) * 2 + 0.2) + torch.randn(shape[3:], generator=g)
    x[:, :, 0] *= 6
    return x.to(dtype)


def bench_synthetic(reps: int) -> dict[str, Any]:
    """Ratio and throughput on synthetic 8B-class chunks."""
    res: dict[str, Any] = {}
    for dtype in (torch.float16, torch.bfloat16):
        kv = synthetic_kv(dtype)
        nbytes = kv.numel() * kv.element_size()
        cg = time_serde(CacheGenSerde(), kv, reps)
        naive = time_serde(NaiveSerde(), kv, reps)
        name = str(dtype).removeprefix("torch.")
        res[name] = {
            "shape": list(kv.shape), "kv_bytes": nbytes, "cachegen": cg, "naive": naive,
            "ratio_vs_naive": nbytes / cg["payload_bytes"],
            "ratio_vs_int8": _int8_bytes(kv) / cg["payload_bytes"],
        }
        print(f"synthetic 8B {name}: ratio {res[name]['ratio_vs_naive']:.2f}x vs naive, "
              f"{res[name]['ratio_vs_int8']:.2f}x vs int8; encode {cg['encode']['gbps_median']:.3f} GB/s, "
              f"decode {cg['decode']['gbps_median']:.3f} GB/s (naive decode "
              f"{naive['decode']['gbps_median']:.2f} GB/s)", flush=True)
    return res


def default_text() -> str:
    """The demo's shipped report (real prose), else a system license text."""
    try:
        return (importlib.resources.files("kvpipe") / "data" / "harbor_report.txt").read_text()
    except (FileNotFoundError, ModuleNotFoundError):
        return Path("/usr/share/common-licenses/GPL-3").read_text()


def _texts(args: argparse.Namespace) -> dict[str, str]:
    if args.text:
        return {Path(args.text).stem: Path(args.text).read_text()}
    texts = {"harbor_report": default_text()}
    if not args.quick:
        for name in ("GPL-3", "MPL-2.0"):
            path = Path("/usr/share/common-licenses") / name
            if path.is_file():
                texts[name] = path.read_text()
    return texts


def bench_model(args: argparse.Namespace, reps: int) -> dict[str, Any]:
    """Ratio, throughput and quality on SmolLM2 KV of real text (quality summed over every text)."""
    from kvpipe.integrations.model import load_model

    model, tok = load_model(args.model)
    texts = {name: tok(text, return_tensors="pt").input_ids for name, text in _texts(args).items()}
    n_ctx, n_cont = (512, 128) if args.quick else (1024, 512)
    texts = {name: ids for name, ids in texts.items() if ids.shape[1] >= n_ctx + n_cont}
    if not texts:
        raise SystemExit(f"text too short: need {n_ctx + n_cont} tokens")
    first = next(iter(texts.values()))
    kv32 = prefill_kv(model, first[:, :n_ctx])
    res: dict[str, Any] = {"model": args.model or "SmolLM2-135M-Instruct", "reference": "fp32 full prefill",
                           "texts": list(texts), "context_tokens": n_ctx, "continuation_tokens": n_cont}
    serde = CacheGenSerde()
    for dtype in (torch.float16, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        chunks = [kv32[:, :, s:s + 256].to(dtype).contiguous() for s in range(0, n_ctx, 256)]
        payload = sum(len(serde.encode(c)) for c in chunks)
        nbytes = sum(c.numel() * c.element_size() for c in chunks)
        timing = time_serde(serde, chunks[-1], reps)
        res[name] = {"kv_bytes": nbytes, "payload_bytes": payload, "ratio_vs_naive": nbytes / payload,
                     "ratio_vs_int8": sum(_int8_bytes(c) for c in chunks) / payload, "timing_one_chunk": timing}
        print(f"SmolLM2 {name}: ratio {nbytes / payload:.2f}x vs naive, "
              f"{res[name]['ratio_vs_int8']:.2f}x vs int8; encode {timing['encode']['gbps_median']:.3f} GB/s, "
              f"decode {timing['decode']['gbps_median']:.3f} GB/s", flush=True)

    sizes: dict[str, list[int]] = {"raw": [], "payload": []}

    def cachegen_fp16(kv: torch.Tensor) -> torch.Tensor:
        half = kv.to(torch.float16).contiguous()
        out = torch.empty_like(half)
        payload = serde.encode(half)
        sizes["raw"].append(half.numel() * 2)
        sizes["payload"].append(len(payload))
        serde.decode_into(memoryview(payload), out)
        return out.to(kv.dtype)

    codecs = {
        "fp16_cast": lambda kv: kv.to(torch.float16).to(kv.dtype),
        "bf16_cast": lambda kv: kv.to(torch.bfloat16).to(kv.dtype),
        "int8": lambda kv: int8_roundtrip(kv.to(torch.float16)).to(kv.dtype),
        "cachegen_fp16": cachegen_fp16,
    }
    greedy = 16 if args.quick else 64
    quality: dict[str, Any] = {}
    for name, codec in codecs.items():
        per_text = {}
        for tname, ids in texts.items():
            r = measure_quality(model, ids[:, :n_ctx], ids[:, n_ctx:n_ctx + n_cont], codec, greedy_steps=greedy)
            per_text[tname] = {"positions": r.positions, "top1_agreement": r.top1_agreement, "kl_mean": r.kl_mean,
                               "kl_max": r.kl_max, "greedy_match": r.greedy_match, "greedy_len": r.greedy_len,
                               "miss_margins_nats": list(r.miss_margins)}
        pos = sum(v["positions"] for v in per_text.values())
        agg = {"positions": pos,
               "top1_agreement": sum(v["top1_agreement"] * v["positions"] for v in per_text.values()) / pos,
               "kl_mean": sum(v["kl_mean"] * v["positions"] for v in per_text.values()) / pos,
               "kl_max": max(v["kl_max"] for v in per_text.values()),
               "greedy_match": [v["greedy_match"] for v in per_text.values()], "greedy_len": greedy,
               "misses": sum(len(v["miss_margins_nats"]) for v in per_text.values()),
               "max_miss_margin_nats": max((m for v in per_text.values() for m in v["miss_margins_nats"]),
                                           default=0.0),
               "per_text": per_text}
        quality[name] = agg
        print(f"quality {name}: top-1 agreement {agg['top1_agreement']:.4f} over {pos} positions "
              f"({agg['misses']} misses, largest reference margin {agg['max_miss_margin_nats']:.3f} nats), "
              f"KL mean {agg['kl_mean']:.5f} max {agg['kl_max']:.4f}, greedy match {agg['greedy_match']}/{greedy}",
              flush=True)
    quality["cachegen_fp16"]["ratio_vs_naive"] = sum(sizes["raw"]) / sum(sizes["payload"])
    res["quality"] = quality
    return res


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions, shorter text")
    p.add_argument("--model", default=None, help="model directory or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None, help="text file for the real-KV part (default: the demo report)")
    p.add_argument("--no-model", action="store_true", help="skip the real-model part")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "cachegen.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    reps = 3 if args.quick else 10
    load_before = os.getloadavg()
    result: dict[str, Any] = {
        "benchmark": "cachegen", "quick": args.quick, "torch_threads": args.threads,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.python_version()}",
        "note": "CPU only; taken on a shared 2-core machine that other jobs were using (timings are noisy, "
                "lower bounds of what the code does on an idle machine)",
        "synthetic_8b": bench_synthetic(reps),
    }
    if not args.no_model:
        result["smollm2"] = bench_model(args, reps)
    # Throughput figures are only as good as the machine was quiet: record the load around the run.
    result["loadavg_before"] = list(load_before)
    result["loadavg_after"] = list(os.getloadavg())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
