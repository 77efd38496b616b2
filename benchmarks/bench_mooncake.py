"""PUT/GET of big chunks through kvpipe's ``mooncakestore://`` tier vs Mooncake's own Python client, same store, same
run: a real ``mooncake_master`` and a ``mooncake_client`` storage node on loopback (TCP transport), and clients in
this process that lend no memory (so every byte crosses a socket to the node).

Baselines: ``get_into``/``put_from`` on a registered buffer (Mooncake's zero-copy API, the fastest a Python
client gets) and ``get``/``put`` of ``bytes`` (its simple API). The tier adds a worker-thread hop, a copy through
its staging buffer (so a call a deadline gives up on can never write into pool memory) and the entry checksum.
Methods are interleaved in rounds; ratios are medians over ``--repeat`` runs.

    python benchmarks/bench_mooncake.py [--quick] [--sizes 4,32] [--out benchmarks/results/mooncake.json]
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "benchmarks"))

from mooncake_servers import mooncake_missing, mooncake_store  # noqa: E402

from bench_remote import FreshChunks, MiB, _summary, _timed, median_run, print_size, size_args, write_results  # noqa: E402
from kvpipe.config import Config  # noqa: E402
from kvpipe.connectors.mooncake import MooncakeConnector, load_store_class  # noqa: E402
from kvpipe.keys import KeyPrefix  # noqa: E402
from kvpipe.memory.pool import create_pool  # noqa: E402
from kvpipe.serde.naive import NaiveSerde  # noqa: E402
from kvpipe.tiers.base import TierContext  # noqa: E402
from kvpipe.tiers.remote import RemoteTier, open_remote_tier  # noqa: E402

BATCH = 4  # chunks per get_many/put_many in the batch methods (the connector's default number of transfer buffers)


class RawMooncake:
    """Mooncake's Python client as an application would use it directly, on a registered buffer."""

    def __init__(self, url: str, size: int) -> None:
        s = MooncakeConnector.from_url(url).settings
        self.store = load_store_class()()
        # get/put of bytes go through the client's local buffer: room for a few values
        rc = self.store.setup(s.local_hostname, s.metadata_server, 0, 4 * size + s.local_buffer_size, s.protocol,
                              s.device_name, s.master)
        assert rc == 0, f"setup failed: {rc}"
        # [source value | GET destination | BATCH batch GET destinations]
        total = (2 + BATCH) * size
        self.mem = mmap.mmap(-1, total)
        self._c = (ctypes.c_char * total).from_buffer(self.mem)
        self.ptr = ctypes.addressof(self._c)
        assert self.store.register_buffer(self.ptr, total) == 0
        self.size = size

    def fill(self, data: memoryview) -> None:
        memoryview(self.mem)[: self.size] = data

    def put_from(self, key: str) -> None:
        rc = self.store.put_from(key, self.ptr, self.size)
        assert rc == 0, rc

    def get_into(self, key: str) -> None:
        n = self.store.get_into(key, self.ptr + self.size, self.size)
        assert n == self.size, n

    def batch_put_from(self, keys: list[str]) -> None:
        rcs = self.store.batch_put_from(keys, [self.ptr] * len(keys), [self.size] * len(keys))
        assert list(rcs) == [0] * len(keys), rcs

    def batch_get_into(self, keys: list[str]) -> None:
        ns = self.store.batch_get_into(keys, [self.ptr + (2 + i) * self.size for i in range(len(keys))],
                                       [self.size] * len(keys))
        assert list(ns) == [self.size] * len(keys), ns

    def close(self) -> None:
        self.store.unregister_buffer(self.ptr)
        self._c = None
        self.store.close()


async def bench_size(url: str, size: int, iters: int, warmup: int) -> dict[str, Any]:
    numel = size // 4
    kv = torch.randn(numel, dtype=torch.float32).view(1, 2, numel // 2, 1, 1)
    data = memoryview(kv.view(-1).view(torch.uint8).numpy())
    raw = RawMooncake(url, size)
    raw.fill(data)
    k = KeyPrefix("bench", f"mc{size}", 1, 0, "float32").key("cd" * 32)
    ctx = TierContext(Config(blocking_timeout_secs=30), create_pool((2 + BATCH) * size + MiB), NaiveSerde())
    tier: RemoteTier = await open_remote_tier(url, ctx, MooncakeConnector.from_url(url))
    chunks = FreshChunks(kv, 1)
    batch_chunks = FreshChunks(kv, BATCH)
    bkeys = [KeyPrefix("bench", f"mcb{size}", 1, 0, "float32").key(f"{i:064x}") for i in range(BATCH)]
    rbkeys = [f"bench-raw-batch-{size}-{i}" for i in range(BATCH)]
    n_put = [0]
    written: list[str] = []  # keys the PUTs wrote, removed after each round (outside the timing)

    async def tier_get() -> None:
        (got,) = await tier.get_many([k])
        assert got is not None
        got.release()

    async def tier_put() -> None:
        # Mooncake keeps the first object written under a key: every PUT writes a new key (deleted at the end).
        n_put[0] += 1
        pk = KeyPrefix("bench", f"mcput{size}", 1, 0, "float32").key(f"{n_put[0]:064x}")
        written.append(pk.to_string())
        (o,) = chunks.take()
        try:
            assert await tier.put_many([pk], [o]) == 1
        finally:
            o.release()

    async def tier_get_batch() -> None:
        got = await tier.get_many(bkeys)
        assert all(g is not None for g in got)
        for g in got:
            assert g is not None
            g.release()

    async def tier_put_batch() -> None:
        pks = []
        for _ in range(BATCH):
            n_put[0] += 1
            pks.append(KeyPrefix("bench", f"mcput{size}", 1, 0, "float32").key(f"{n_put[0]:064x}"))
        written.extend(pk.to_string() for pk in pks)
        objs = batch_chunks.take()
        try:
            assert await tier.put_many(pks, objs) == BATCH
        finally:
            for o in objs:
                o.release()

    def raw_put_batch() -> None:
        ks = []
        for _ in range(BATCH):
            n_put[0] += 1
            ks.append(f"bench-raw-put-{size}-{n_put[0]}")
        written.extend(ks)
        raw.batch_put_from(ks)

    def raw_put() -> None:
        n_put[0] += 1
        written.append(f"bench-raw-put-{size}-{n_put[0]}")
        raw.put_from(written[-1])

    def raw_put_bytes() -> None:
        n_put[0] += 1
        written.append(f"bench-raw-put-{size}-{n_put[0]}")
        rc = raw.store.put(written[-1], data)
        assert rc == 0, rc

    def clean() -> None:
        if written:
            raw.store.batch_remove(written, True)
            written.clear()

    rkey = f"bench-raw-{size}"
    raw.put_from(rkey)
    methods: dict[str, Callable[[], Any]] = {
        "tier_get": tier_get,
        "tier_put": tier_put,
        "mooncake_get_into": lambda: raw.get_into(rkey),
        "mooncake_put_from": raw_put,
        "mooncake_get_bytes": lambda: raw.store.get(rkey),
        "mooncake_put_bytes": raw_put_bytes,
        f"tier_get_x{BATCH}": tier_get_batch,
        f"tier_put_x{BATCH}": tier_put_batch,
        f"mooncake_batch_get_into_x{BATCH}": lambda: raw.batch_get_into(rbkeys),
        f"mooncake_batch_put_from_x{BATCH}": raw_put_batch,
    }
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in methods}
    gc.collect()
    gc.freeze()
    (o,) = chunks.take()
    assert await tier.put_many([k], [o]) == 1
    o.release()
    objs = batch_chunks.take()
    assert await tier.put_many(bkeys, objs) == BATCH
    for o in objs:
        o.release()
    raw.batch_put_from(rbkeys)
    for fn in methods.values():
        for _ in range(warmup):
            await _timed(fn)
        clean()
    per_round = min(5, iters)
    for _ in range(max(1, iters // per_round)):
        for m, fn in methods.items():
            for _ in range(per_round):
                samples[m].append(await _timed(fn))
            clean()
    out: dict[str, Any] = {m: _summary(v, size * (BATCH if m.endswith(f"_x{BATCH}") else 1))
                           for m, v in samples.items()}
    (got,) = await tier.get_many([k])
    assert got is not None and torch.equal(got.tensor, kv), "the tier read back different KV"
    got.release()
    raw.store.batch_remove([rkey, k.to_string(), *rbkeys, *(b.to_string() for b in bkeys)], True)
    await tier.aclose()
    raw.close()
    gc.unfreeze()

    def ratio(a: str, b: str) -> float:
        return float(out[a]["gbps"] / out[b]["gbps"])

    out["ratios"] = {
        "tier_get_vs_get_into": ratio("tier_get", "mooncake_get_into"),
        "tier_put_vs_put_from": ratio("tier_put", "mooncake_put_from"),
        "tier_get_vs_get_bytes": ratio("tier_get", "mooncake_get_bytes"),
        "tier_put_vs_put_bytes": ratio("tier_put", "mooncake_put_bytes"),
        f"tier_get_x{BATCH}_vs_batch_get_into": ratio(f"tier_get_x{BATCH}", f"mooncake_batch_get_into_x{BATCH}"),
        f"tier_put_x{BATCH}_vs_batch_put_from": ratio(f"tier_put_x{BATCH}", f"mooncake_batch_put_from_x{BATCH}"),
    }
    return out


def main(argv: list[str] | None = None) -> int:
    args = size_args(__doc__, "mooncake.json").parse_args(argv)
    why = mooncake_missing()
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    sizes = [4] if args.quick else [int(x) for x in args.sizes.split(",")]
    repeat = 1 if args.quick else args.repeat
    warmup = 1 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="kvpipe-bench-mc-"))
    store = mooncake_store(work, segment="2GB")
    results: dict[str, Any] = {
        "benchmark": "mooncake", "quick": args.quick,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                 "loadavg_at_start": os.getloadavg()},
        "note": "loopback TCP, a real mooncake_master + mooncake_client node; clients lend no memory. Baselines: "
                "Mooncake's own client on a registered buffer (get_into/put_from) and with bytes (get/put). Ratios: "
                "medians over --repeat runs, methods interleaved in rounds of 5 calls",
        "sizes": {},
    }
    try:
        for mib in sizes:
            iters = args.iters or (5 if args.quick else max(20, 400 // mib))
            runs = [anyio.run(bench_size, store.url, mib * MiB, iters, warmup) for _ in range(repeat)]
            res = median_run(runs, "tier_get_vs_get_into")
            res["iters"] = iters
            results["sizes"][f"{mib}MiB"] = res
            print(f"\n== {mib} MiB chunks (median of {iters} calls; ratios: median of {repeat} runs) ==")
            print_size(res, 20, 28)
    finally:
        store.stop()
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
