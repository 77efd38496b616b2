"""Tier throughput through the public API against same-run baselines.

Chunks are 256 tokens of a Llama-3-8B-like KV shape: 32 layers x (K, V) x 256 tokens x 8 KV heads x 128 head dim
in fp16 = 32 MiB per chunk (DESIGN's chunk tensor ``[layers, 2, tokens, heads, head_dim]``); one request is
``--chunks`` chunks. Measured, each against its baseline:

- CPU store (``store()`` on a CPU-only cache) vs ``Tensor.copy_`` of the same chunk slices into preallocated memory;
- CPU retrieve (``retrieve(out=buffer)``, the engine's buffer) vs ``copy_`` back into preallocated memory, and
  ``retrieve()`` without ``out=`` vs ``torch.empty`` + ``copy_`` (both pay the page faults of a fresh tensor);
- disk store (``store()`` + ``flush()``: gather, CPU tier, write-behind) vs raw ``write`` of the same (already
  contiguous) bytes to files (no fsync, like the tier);
- disk cold read (a fresh cache, CPU tier empty, page cache of the entry files dropped with
  ``posix_fadvise(DONTNEED)`` after an fsync) vs raw ``readinto`` of the same files under the same treatment;
- ``store()`` latency with and without a disk tier (write-behind: should be about equal).

Writes ``benchmarks/results/tiers.json`` (``--out``); ``--quick`` runs small shapes in a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import torch

import kvpipe
from kvpipe.tiers.disk import _file_name

RESULTS = Path(__file__).parent / "results"


def _stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, max(0, round(0.99 * (len(s) - 1))))]
    return {"median_s": statistics.median(s), "p99_s": p99, "min_s": s[0], "n": len(s)}


def _gbps(nbytes: int, secs: float) -> float:
    return nbytes / secs / 1e9


def _drop_page_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped: write them back first (outside the timed part)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


async def _time_async(fn: Callable[[int], Awaitable[Any]], reps: int, warmup: int,
                      before: Callable[[int], Awaitable[Any]] | None = None) -> list[float]:
    out = []
    for i in range(warmup + reps):
        if before is not None:
            await before(i)
        t0 = time.perf_counter()
        await fn(i)
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


def _time_sync(fn: Callable[[int], Any], reps: int, warmup: int,
               before: Callable[[int], Any] | None = None) -> list[float]:
    out = []
    for i in range(warmup + reps):
        if before is not None:
            before(i)
        t0 = time.perf_counter()
        fn(i)
        dt = time.perf_counter() - t0
        if i >= warmup:
            out.append(dt)
    return out


async def _pair(base: Callable[[int], Any], subj: Callable[[int], Awaitable[Any]], reps: int, warmup: int,
                before_base: Callable[[int], Any] | None = None,
                before_subj: Callable[[int], Awaitable[Any]] | None = None) -> tuple[list[float], list[float]]:
    """Baseline and subject timed alternately, rep by rep, so both see the same machine load (the machine is
    shared: sequential phases would compare different loads); which one goes first alternates too (on this
    machine whichever runs second after a page-cache drop was seen to gain or lose up to 2x)."""
    b_out, s_out = [], []

    async def time_base(i: int) -> float:
        if before_base is not None:
            before_base(i)
        t0 = time.perf_counter()
        base(i)
        return time.perf_counter() - t0

    async def time_subj(i: int) -> float:
        if before_subj is not None:
            await before_subj(i)
        t0 = time.perf_counter()
        await subj(i)
        return time.perf_counter() - t0

    for i in range(warmup + reps):
        if i % 2 == 0:
            tb = await time_base(i)
            ts = await time_subj(i)
        else:
            ts = await time_subj(i)
            tb = await time_base(i)
        if i >= warmup:
            b_out.append(tb)
            s_out.append(ts)
    return b_out, s_out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    T = args.chunk * args.chunks
    shape = (args.layers, 2, T, args.heads, args.head_dim)
    dtype = torch.float16
    kv = torch.randn(shape, dtype=torch.float32).to(dtype)
    req_bytes = kv.numel() * kv.element_size()
    chunk_bytes = req_bytes // args.chunks
    n_req = args.warmup + args.reps
    tokens = [[r * 1_000_003 + i for i in range(T)] for r in range(n_req)]  # distinct first tokens: new keys
    spans = [(s, s + args.chunk) for s in range(0, T, args.chunk)]
    # Pool: two requests' worth, so the warm-up touches (page-faults) all of it before the timed reps.
    pool_gb = 2 * req_bytes / 1e9
    base = dict(chunk_size=args.chunk, max_local_cpu_size=pool_gb, kv_dtype="float16", model_name="bench")
    res: dict[str, Any] = {}

    # ---------------------------------------------------------------- memcpy baselines
    dst = [torch.empty((args.layers, 2, args.chunk, args.heads, args.head_dim), dtype=dtype) for _ in spans]
    for d in dst:
        d.zero_()  # prefault
    out_buf = torch.zeros_like(kv)

    def gather(_i: int) -> None:
        for d, (s, e) in zip(dst, spans):
            d.copy_(kv[:, :, s:e])

    def scatter(_i: int) -> None:
        for d, (s, e) in zip(dst, spans):
            out_buf[:, :, s:e].copy_(d)

    # ---------------------------------------------------------------- CPU tier
    async with kvpipe.open_cache(kvpipe.Config(**base)) as cache:
        await cache.wait_resident()  # no timing against the pool's background prefault

        async def store(i: int) -> None:
            assert await cache.store(tokens[i], kv) == T

        b, t = await _pair(gather, store, args.reps, args.warmup)
        res["memcpy_gather"], res["cpu_store"] = _stats(b), _stats(t)
        last = tokens[n_req - 1]

        async def retrieve_out(_i: int) -> None:
            r = await cache.retrieve(last, out=out_buf)
            assert r.num_tokens == T

        b, t = await _pair(scatter, retrieve_out, args.reps, args.warmup)
        res["memcpy_scatter"], res["cpu_retrieve_out"] = _stats(b), _stats(t)
        assert torch.equal(out_buf, kv)

        async def retrieve_alloc(_i: int) -> None:
            r = await cache.retrieve(last)
            assert r.num_tokens == T

        def scatter_alloc(_i: int) -> None:
            fresh = torch.empty_like(kv)  # what retrieve() without out= must do: a new tensor (page faults)
            for d, (s, e) in zip(dst, spans):
                fresh[:, :, s:e].copy_(d)

        b, t = await _pair(scatter_alloc, retrieve_alloc, args.reps, args.warmup)
        res["memcpy_scatter_alloc"], res["cpu_retrieve_alloc"] = _stats(b), _stats(t)

    # ---------------------------------------------------------------- disk tier
    root = Path(tempfile.mkdtemp(prefix="kvpipe-bench-", dir=args.dir))
    try:
        raw_dir = root / "raw"
        raw_dir.mkdir()
        disk_cfg = kvpipe.Config(**base, local_disk=str(root / "disk"), max_local_disk_size=100.0,
                                 write_queue_size=max(64, 2 * args.chunks))
        async with kvpipe.open_cache(disk_cfg) as cache, kvpipe.open_cache(kvpipe.Config(**base)) as cpu_only:
            await cache.wait_resident()
            await cpu_only.wait_resident()
            # store() latency, with and without a disk tier behind, alternately (other tokens than below).
            n_lat = args.warmup + args.latency_reps
            lat_tokens = [[r * 1_000_003 + 500_000_000 + i for i in range(T)] for r in range(n_lat)]

            def noop(_i: int) -> None:
                return None

            async def store_cpu_only(i: int) -> None:
                assert await cpu_only.store(lat_tokens[i], kv) == T

            async def store_with_disk(i: int) -> None:
                assert await cache.store(lat_tokens[i], kv) == T

            async def settle(_i: int) -> None:
                await cache.flush()  # outside the timed part: each store() meets an idle write queue

            lat_a, lat_b = [], []
            for i in range(n_lat):
                _, a1 = await _pair(noop, lambda _j, i=i: store_cpu_only(i), 1, 0)
                _, b1 = await _pair(noop, lambda _j, i=i: store_with_disk(i), 1, 0, before_subj=settle)
                if i >= args.warmup:
                    lat_a += a1
                    lat_b += b1
            res["store_latency_cpu_only"], res["store_latency_with_disk"] = _stats(lat_a), _stats(lat_b)
            await cache.flush()
            await cache.clear()

            # The bytes of each chunk, made contiguous once (the tier writes from pool memory, already contiguous).
            chunk_bytes_views = [memoryview(kv[:, :, s:e].contiguous().view(-1).view(torch.uint8).numpy())
                                 for s, e in spans]

            def raw_write(i: int) -> None:
                for j, view in enumerate(chunk_bytes_views):
                    with open(raw_dir / f"{i}-{j}", "wb", buffering=0) as f:
                        f.write(view)

            async def store_flush(i: int) -> None:
                assert await cache.store(tokens[i], kv) == T
                await cache.flush()

            b, t = await _pair(raw_write, store_flush, args.reps, args.warmup)
            res["raw_write"], res["disk_store_flush"] = _stats(b), _stats(t)
            keys = [cache.keys_for(t) for t in tokens]
        files = [[root / "disk" / _file_name(k) for k in ks] for ks in keys]
        assert all(p.exists() for ps in files for p in ps)
        raw_files = [[raw_dir / f"{i}-{j}" for j in range(len(spans))] for i in range(n_req)]

        def raw_read(i: int) -> None:
            for j, p in enumerate(raw_files[i]):
                with open(p, "rb", buffering=0) as f:
                    f.readinto(memoryview(dst[j].view(-1).view(torch.uint8).numpy()))
                out_buf[:, :, spans[j][0] : spans[j][1]].copy_(dst[j])  # the tier also scatters into out

        # Cold reads: a fresh cache (empty CPU tier); each request's files leave the page cache before its read.
        async with kvpipe.open_cache(disk_cfg) as cache:
            await cache.wait_resident()

            async def drop(i: int) -> None:
                await anyio.to_thread.run_sync(_drop_page_cache, files[i])

            async def cold_read(i: int) -> None:
                r = await cache.retrieve(tokens[i], out=out_buf)
                assert r.num_tokens == T and r.hits_by_tier == {"disk": T}, r.hits_by_tier

            b, t = await _pair(raw_read, cold_read, args.reps, args.warmup,
                               before_base=lambda i: _drop_page_cache(raw_files[i]), before_subj=drop)
            res["raw_cold_read"], res["disk_cold_read"] = _stats(b), _stats(t)
            assert torch.equal(out_buf, kv)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    def ratio(a: str, b: str) -> float:
        return res[b]["median_s"] / res[a]["median_s"]  # throughput of a relative to b

    ratios = {
        "cpu_store_vs_memcpy": ratio("cpu_store", "memcpy_gather"),
        "cpu_retrieve_out_vs_memcpy": ratio("cpu_retrieve_out", "memcpy_scatter"),
        "cpu_retrieve_alloc_vs_memcpy_alloc": ratio("cpu_retrieve_alloc", "memcpy_scatter_alloc"),
        "disk_store_flush_vs_raw_write": ratio("disk_store_flush", "raw_write"),
        "disk_cold_read_vs_raw_read": ratio("disk_cold_read", "raw_cold_read"),
        "store_latency_disk_vs_cpu_only": (res["store_latency_with_disk"]["median_s"]
                                           / res["store_latency_cpu_only"]["median_s"]),
    }
    for v in res.values():
        v["GBps_median"] = _gbps(req_bytes, v["median_s"])
    targets = {
        "cpu_store_vs_memcpy >= 0.80": ratios["cpu_store_vs_memcpy"] >= 0.80,
        "cpu_retrieve_out_vs_memcpy >= 0.80": ratios["cpu_retrieve_out_vs_memcpy"] >= 0.80,
        "disk_cold_read_vs_raw_read >= 0.85": ratios["disk_cold_read_vs_raw_read"] >= 0.85,
        "store_latency_disk_vs_cpu_only <= 1.25": ratios["store_latency_disk_vs_cpu_only"] <= 1.25,
    }
    return {
        "benchmark": "tiers",
        "quick": args.quick,
        "shape": {"layers": args.layers, "kv": 2, "chunk_tokens": args.chunk, "kv_heads": args.heads,
                  "head_dim": args.head_dim, "dtype": "float16", "chunk_bytes": chunk_bytes,
                  "chunks_per_request": args.chunks, "request_bytes": req_bytes},
        "reps": args.reps, "warmup": args.warmup, "latency_reps": args.latency_reps,
        "results": res, "ratios": ratios, "targets_met": targets,
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
                    "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "note": "taken on a shared 2-core machine (other jobs running): absolute figures are noisy; "
                            "the ratios compare against a baseline measured in the same run"},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes, a few seconds (smoke test)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    p.add_argument("--chunks", type=int, default=4, help="chunks per request")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--latency-reps", type=int, default=20,
                   help="reps of the store() latency comparison (noisy on a shared machine: more samples)")
    p.add_argument("--dir", default=None, help="directory for disk files (default: the system temp dir)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: on this busy 2-core machine torch's 2-thread copy_ runs ~50x "
                        "slower than one thread, for the baseline and the API alike)")
    p.add_argument("--out", type=Path, default=RESULTS / "tiers.json")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.chunks, args.reps, args.warmup, args.latency_reps = 4, 2, 3, 2, 3
    torch.set_num_threads(args.threads)
    report = anyio.run(run, args)
    shape = report["shape"]
    print(f"chunk {shape['chunk_bytes'] / 2**20:.0f} MiB x {shape['chunks_per_request']} per request, "
          f"{report['reps']} reps (median / p99):")
    for name, r in report["results"].items():
        print(f"  {name:<20} {r['median_s'] * 1e3:9.2f} ms  p99 {r['p99_s'] * 1e3:9.2f} ms  "
              f"{r['GBps_median']:6.2f} GB/s")
    for name, v in report["ratios"].items():
        print(f"  ratio {name:<32} {v:6.2f}")
    for name, ok in report["targets_met"].items():
        print(f"  target {name:<40} {'met' if ok else 'MISSED'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
