"""End-to-end TTFT of the real model (SmolLM2-135M-Instruct, CPU) with its prefix served from the ``lm://`` remote
tier, ``remote_serde: cachegen`` vs ``remote_serde: naive``, and the bytes each moves.

One real ``kvpipe server 127.0.0.1 PORT`` subprocess on a free loopback port holds every entry. Per prompt length
and serde: a cold request (full prefill, first 16 greedy tokens, store) through a cache with ``local_cpu`` and the
remote tier, then ``cache.flush()`` so the write-behind reaches the server; then, per warm run, a FRESH cache object
(empty CPU tier, no disk tier) so the whole prefix comes from the remote: warm TTFT (median of a few), then one more
fresh-cache warm request generating 16 greedy tokens to compare with the cold output. Bytes are taken from the
server's ``STATS`` counters (``put_bytes``/``get_bytes``, entry headers included) and the remote tier's own
``bytes_written``/``bytes_read`` (payloads only). The baseline, interleaved in the same run, is a full prefill with
no kvpipe at all (plain transformers) on the same prompt. Each serde uses its own ``model_name`` so their keys never
collide. TTFT is the generate call to the first token; opening the fresh cache (connecting) is not counted.

    python benchmarks/bench_cachegen_e2e.py [--quick] [--sizes 2048,4096] [--repeats N] [--threads 1]

Writes ``benchmarks/results/cachegen_e2e.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from servers import LmServerProc, free_port  # noqa: E402

import kvpipe  # noqa: E402
from kvpipe.config import Config  # noqa: E402
from kvpipe.integrations.context import build_prompt_ids  # noqa: E402
from kvpipe.integrations.model import load_model  # noqa: E402
from kvpipe.integrations.transformers import CachedLM, GenerationResult, SamplingParams, cache_config_for  # noqa: E402
from kvpipe.lm.protocol import FRAME_SIZE, Frame, Op, Status  # noqa: E402
from timing import loadavg, summary_s  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ONE = SamplingParams(max_new_tokens=1)
SIXTEEN = SamplingParams(max_new_tokens=16, stop_token_ids=())  # greedy; never stop early, compare all 16
SERDES = ("naive", "cachegen")


def server_stats(port: int | None) -> dict[str, int]:
    """The ``lm://`` server's ``STATS`` counters (``kvpipe_server_`` prefix dropped); none for a ``mock://`` link."""
    if port is None:
        return {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(Frame(Op.STATS, 1).to_bytes())
        buf = b""
        while len(buf) < FRAME_SIZE:
            part = s.recv(FRAME_SIZE - len(buf))
            if not part:
                raise RuntimeError("lm server closed the connection")
            buf += part
        f = Frame.from_bytes(buf)
        if f.status != Status.OK:
            raise RuntimeError(f"STATS answered {f.status}")
        body = b""
        while len(body) < f.payload_len:
            part = s.recv(f.payload_len - len(body))
            if not part:
                raise RuntimeError("lm server closed the connection")
            body += part
    out: dict[str, int] = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("kvpipe_server_")] = int(float(value))
    return out


def _delta(after: dict[str, int], before: dict[str, int], *names: str) -> dict[str, int]:
    return {n: after.get(n, 0) - before.get(n, 0) for n in names}


def _remote_extra(cache: kvpipe.Cache) -> dict[str, float]:
    stats = cache.statistics().tiers
    remote = [t for name, t in stats.items() if name not in ("cpu", "disk")]
    return dict(remote[0].extra) if remote else {}


def bench_serde(model: Any, tok: Any, cfg: Config, port: int | None, ids: list[int], repeats: int,
                plain_runs: list[float], plain_max: int, plain_tokens: tuple[int, ...]) -> dict[str, Any]:
    """Cold store then fresh-cache warm requests for one serde (``cfg.remote_serde``)."""
    s0 = server_stats(port)
    with kvpipe.Cache(cfg) as cache:
        cold = CachedLM(model, tok, cache).generate(ids, SIXTEEN)
        assert cold.hit_tokens == 0, "cold run hit the cache"
        t0 = time.perf_counter()
        cache.flush()
        flush_s = time.perf_counter() - t0
        written = _remote_extra(cache)
    s1 = server_stats(port)
    warm: list[float] = []
    hits: dict[str, int] = {}
    hit_tokens = 0
    read: dict[str, float] = {}
    plain = CachedLM(model, tok, None)
    for i in range(repeats):
        with kvpipe.Cache(cfg) as cache:  # empty CPU tier: the prefix comes from the remote
            cache.wait_resident()  # no timing against the pool's background prefault
            res = CachedLM(model, tok, cache).generate(ids, ONE)
            warm.append(res.ttft_s)
            hits, hit_tokens = dict(res.hits_by_tier), res.hit_tokens
            if i == 0:
                read = _remote_extra(cache)
        if i == 0:
            # The first warm run's server traffic: exactly one request's reads.
            s2 = server_stats(port)
        if len(plain_runs) < plain_max and i == 1:
            # Interleave a no-kvpipe full prefill with each serde's warm runs, so load from other processes hits
            # both alike.
            plain_runs.append(plain.generate(ids, ONE).ttft_s)
    with kvpipe.Cache(cfg) as cache:
        agree: GenerationResult = CachedLM(model, tok, cache).generate(ids, SIXTEEN)
    warm_med = statistics.median(warm)
    first_diff = next((i for i, (a, b) in enumerate(zip(agree.token_ids, cold.token_ids)) if a != b), None)
    return {
        "remote_serde": cfg.remote_serde,
        "kv_dtype": cfg.kv_dtype,
        "cold": {"ttft_s": cold.ttft_s, "total_s_16_tokens": cold.total_s, "stored_tokens": cold.stored_tokens,
                 "flush_s": flush_s},
        "warm_remote": {**summary_s(warm), "hits_by_tier": hits, "hit_tokens": hit_tokens},
        "bytes": {
            "server_put": _delta(s1, s0, "put_bytes", "puts")["put_bytes"],
            "server_get_one_warm_request": _delta(s2, s1, "get_bytes")["get_bytes"],
            "server_puts": _delta(s1, s0, "puts")["puts"],
            "tier_bytes_written": int(written.get("bytes_written", 0)),
            "tier_bytes_read_one_warm_request": int(read.get("bytes_read", 0)),
            "raw_kv_bytes": _raw_kv_bytes(model, cfg, cold.stored_tokens),
        },
        "speedup_vs_plain_prefill": statistics.median(plain_runs) / warm_med if plain_runs else None,
        "agreement": {
            "warm_equals_cold_16": list(agree.token_ids) == list(cold.token_ids),
            "first_differing_index": first_diff,
            "cold_equals_plain_16": list(cold.token_ids) == list(plain_tokens),
            "tokens_compared": len(cold.token_ids),
            "warm_hit_tokens": agree.hit_tokens,
            "cold_text": cold.text, "warm_text": agree.text,
        },
    }


def _raw_kv_bytes(model: Any, cfg: Config, tokens: int) -> int:
    from kvpipe.layouts.hf import kv_shape_for

    return int(np.prod(kv_shape_for(model.config, tokens))) * _elem(cfg.kv_dtype)


def _elem(kv_dtype: str) -> int:
    from kvpipe.serde.entry import dtype_from_name

    return torch.empty((), dtype=dtype_from_name(kv_dtype)).element_size()


def base_config(model: Any, remote_url: str, kw: dict[str, Any]) -> Config:
    """The cache config for ``model``: ``kw`` applied as explicit arguments, so that ``cache_config_for`` fills
    only what was left at its default (a plain ``Config(kv_dtype=...)`` records no source, and
    ``cache_config_for`` used to replace that ``kv_dtype`` with the model's, silently ignoring ``--kv-dtype``)."""
    return cache_config_for(model, Config().replace(remote_url=remote_url, **kw))


def bench_size(model: Any, tok: Any, base: Config, port: int | None, n: int, repeats: int, plain_max: int
               ) -> dict[str, Any]:
    ids = build_prompt_ids(tok, n, system=f"You are a careful reader. Session {n}-{time.time_ns()}.")
    plain = CachedLM(model, tok, None)
    ref = plain.generate(ids, SIXTEEN)  # also the first no-kvpipe full prefill
    plain_runs = [ref.ttft_s]
    out: dict[str, Any] = {"prompt_tokens": n, "serdes": {}}
    for serde in SERDES:
        cfg = base.replace(remote_serde=serde, model_name=f"{base.model_name}-{serde}-{n}")
        out["serdes"][serde] = bench_serde(model, tok, cfg, port, ids, repeats, plain_runs, plain_max,
                                          ref.token_ids)
    out["plain_full_prefill"] = summary_s(plain_runs)
    base_med = statistics.median(plain_runs)
    for r in out["serdes"].values():
        r["speedup_vs_plain_prefill"] = base_med / r["warm_remote"]["median_s"]
    nv, cg = out["serdes"]["naive"], out["serdes"]["cachegen"]
    out["cachegen_vs_naive"] = {
        "bytes_ratio_tier_read": (nv["bytes"]["tier_bytes_read_one_warm_request"]
                                  / max(1, cg["bytes"]["tier_bytes_read_one_warm_request"])),
        "bytes_ratio_server_put": nv["bytes"]["server_put"] / max(1, cg["bytes"]["server_put"]),
        "bytes_ratio_server_get": (nv["bytes"]["server_get_one_warm_request"]
                                   / max(1, cg["bytes"]["server_get_one_warm_request"])),
        "warm_ttft_ratio": cg["warm_remote"]["median_s"] / nv["warm_remote"]["median_s"],
        # The usual CacheGen figure is against fp16 KV; with an fp32 cache the naive entries are twice that.
        "cachegen_ratio_vs_fp16_kv": (cg["bytes"]["raw_kv_bytes"] * 2 / _elem(base.kv_dtype)
                                      / max(1, cg["bytes"]["tier_bytes_written"])),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1024 tokens, 3 warm runs")
    p.add_argument("--sizes", help="comma-separated prompt lengths (default 2048,4096; quick 1024)")
    p.add_argument("--repeats", type=int, help="fresh-cache warm runs per size and serde (default 5, quick 3)")
    p.add_argument("--plain-repeats", type=int,
                   help="no-kvpipe full prefills per size, the baseline (default 3, quick 1; at most 1 + serdes)")
    p.add_argument("--kv-dtype", help="KV dtype stored in the cache (default: the model's, fp32); the transformers "
                   "path converts the model's KV to it on store and back on restore")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared busy machine it avoids OpenMP stalls)")
    p.add_argument("--out", type=Path, default=RESULTS / "cachegen_e2e.json")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    p.add_argument("--link-gbps", help="instead of the lm:// server, a simulated bandwidth-limited remote "
                   "(mock://, in-process) per comma-separated link speed in Gbit/s, e.g. 1,10")
    p.add_argument("--latency-ms", type=float, default=0.5, help="per-call latency of the mock:// link")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else ([1024] if args.quick else [2048, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    plain_max = args.plain_repeats or (1 if args.quick else 3)

    model, tok = load_model()
    kw: dict[str, Any] = {"chunk_size": 256, "local_cpu": True, "max_local_cpu_size": 1.0, "local_disk": None,
                          "model_name": f"bench-cg-e2e-{os.getpid()}"}
    if args.kv_dtype:
        kw["kv_dtype"] = args.kv_dtype
    if args.link_gbps:
        return _main_links(args, model, tok, kw, sizes, repeats, plain_max)
    workdir = Path(tempfile.mkdtemp(prefix="kvpipe-bench-cg-e2e-"))
    port = free_port()
    kvpipe_bin = shutil.which("kvpipe", path=str(Path(sys.executable).parent)) or shutil.which("kvpipe")
    argv_srv = ([kvpipe_bin] if kvpipe_bin else [sys.executable, "-m", "kvpipe.cli"]) + [
        "server", "127.0.0.1", str(port), "--max-size", "3"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"),
                                                                    os.environ.get("PYTHONPATH")]))}
    server = LmServerProc(argv_srv, port, workdir, "kvpipe-server", env=env).start()
    try:
        base = base_config(model, server.url, kw)
        CachedLM(model, tok, None).generate(build_prompt_ids(tok, 256), ONE)  # warm-up: one-time costs
        load_before = loadavg()
        t0 = time.perf_counter()
        results = []
        for n in sizes:
            r = bench_size(model, tok, base, port, n, repeats, plain_max)
            results.append(r)
            nv, cg = r["serdes"]["naive"], r["serdes"]["cachegen"]
            print(f"{n:>6} tokens: plain prefill {r['plain_full_prefill']['median_s']:.3f} s | warm from lm:// "
                  f"naive {nv['warm_remote']['median_s']:.3f} s ({nv['speedup_vs_plain_prefill']:.1f}x), "
                  f"cachegen {cg['warm_remote']['median_s']:.3f} s ({cg['speedup_vs_plain_prefill']:.1f}x) | "
                  f"bytes put naive {nv['bytes']['server_put'] / 1e6:.1f} MB, cachegen "
                  f"{cg['bytes']['server_put'] / 1e6:.1f} MB ({r['cachegen_vs_naive']['bytes_ratio_server_put']:.2f}x)"
                  f" | 16-token agreement naive {nv['agreement']['warm_equals_cold_16']}, "
                  f"cachegen {cg['agreement']['warm_equals_cold_16']}", flush=True)
        load_after = loadavg()
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    busy = bool(load_before and load_after and max(load_before[0], load_after[0]) > (os.cpu_count() or 1) * 0.75)
    doc = {
        "benchmark": "cachegen_e2e",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), fp32, CPU",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "config": {"chunk_size": 256, "kv_dtype": base.kv_dtype, "sizes": sizes, "warm_repeats": repeats,
                   "plain_repeats": plain_max, "quick": args.quick,
                   "remote": "kvpipe server (lm://) on 127.0.0.1, subprocess",
                   "cachegen": {k: getattr(base, k) for k in ("cachegen_bins", "cachegen_key_bins",
                                                              "cachegen_value_bins", "cachegen_anchor_group",
                                                              "cachegen_anchor_bins", "cachegen_coder")}},
        "loadavg_before": load_before, "loadavg_after": load_after, "busy_machine": busy,
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "notes": ("Warm TTFT = generate() call to first token with a fresh cache (empty CPU tier, no disk): remote "
                  "GET + deserialize + suffix prefill (last token) + sampling; connecting is not counted. Baseline "
                  "= plain transformers full prefill on the same prompt, same run. server_put/get = lm server STATS "
                  "byte counters (header + payload); tier_bytes_* = the client's remote tier counters (payload). "
                  "Agreement: first 16 greedy tokens of a fresh-cache warm request vs the cold request's. "
                  + ("Taken on a busy shared machine (other agents' jobs running): absolute times are inflated and "
                     "noisy. " if busy else "") + args.note).strip(),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


def _main_links(args: argparse.Namespace, model: Any, tok: Any, kw: dict[str, Any], sizes: list[int], repeats: int,
                plain_max: int) -> int:
    """The bandwidth-limited case CacheGen is for: the remote is ``mock://`` with a set latency and bandwidth."""
    CachedLM(model, tok, None).generate(build_prompt_ids(tok, 256), ONE)  # warm-up: one-time costs
    load_before = loadavg()
    t0 = time.perf_counter()
    links = []
    for gbps in [float(v) for v in args.link_gbps.split(",")]:
        url = f"mock://bench-cg-e2e-{os.getpid()}-{gbps:g}?latency_ms={args.latency_ms:g}&bandwidth_gbps={gbps:g}"
        base = base_config(model, url, kw)
        results = []
        for n in sizes:
            r = bench_size(model, tok, base, None, n, repeats, plain_max)
            results.append(r)
            nv, cg = r["serdes"]["naive"], r["serdes"]["cachegen"]
            print(f"{gbps:g} Gbit/s {n:>6} tokens: plain prefill {r['plain_full_prefill']['median_s']:.3f} s | warm "
                  f"naive {nv['warm_remote']['median_s']:.3f} s, cachegen {cg['warm_remote']['median_s']:.3f} s | "
                  f"read naive {nv['bytes']['tier_bytes_read_one_warm_request'] / 1e6:.1f} MB, cachegen "
                  f"{cg['bytes']['tier_bytes_read_one_warm_request'] / 1e6:.1f} MB | 16-token agreement naive "
                  f"{nv['agreement']['warm_equals_cold_16']}, cachegen {cg['agreement']['warm_equals_cold_16']}",
                  flush=True)
        links.append({"link_gbps": gbps, "latency_ms": args.latency_ms, "remote_url": url, "results": results})
    load_after = loadavg()
    doc = {
        "benchmark": "cachegen_e2e_links",
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), fp32, CPU",
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "config": {"chunk_size": 256, "kv_dtype": base.kv_dtype, "sizes": sizes, "warm_repeats": repeats,
                   "plain_repeats": plain_max,
                   "remote": "mock:// (in-process store; each connector call sleeps latency + bytes / bandwidth)"},
        "loadavg_before": load_before, "loadavg_after": load_after, "elapsed_s": round(time.perf_counter() - t0, 1),
        "notes": ("Simulated link: kvpipe's mock:// connector, not a real network (none with a set bandwidth exists "
                  "here). Calls that overlap sleep concurrently, so this is a per-call bandwidth model. Bytes = the "
                  "remote tier's counters (payload). Warm TTFT as in cachegen_e2e.json. " + args.note).strip(),
        "links": links,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
