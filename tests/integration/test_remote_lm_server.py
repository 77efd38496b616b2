"""``kvpipe server`` (the ``lm://`` cache server) as a real subprocess: bad frames close only their connection,
auth, LRU under ``--max-size``, STATS, ``GET /metrics`` over HTTP, many concurrent clients, and the
``lmcache_server`` argument form."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import torch
from remote_fixtures import assert_round_trip, chunk, chunk_tensor, key, make_ctx, open_tier, release_all
from servers import LmServerProc, ServerProc, free_port, lm_server

from kvpipe.connectors.lm import LmConnector
from kvpipe.errors import TierUnavailable
from kvpipe.lm.protocol import FRAME_SIZE, RESP_REFUSAL, Frame, Op, Status, parse_metrics


def _recv_all_or_eof(s: socket.socket) -> bytes:
    s.settimeout(10)
    data = b""
    while True:
        chunk_ = s.recv(65536)
        if not chunk_:
            return data
        data += chunk_


@pytest.mark.parametrize("garbage", [
    b"SSH-2.0-OpenSSH_9.6\r\n" + b"x" * 64,                              # not our protocol
    b"GARBAGE\r\n\r\n" + b"x" * 64,                                      # nor HTTP, though it starts with G
    b"GET /metrics HTTP/1.1\r\n" + b"x" * 20000 + b"\r\n\r\n",            # an HTTP header line too long
    Frame(Op.GET, 1, key_len=1 << 20).to_bytes(),                        # oversized key
    Frame(Op.PUT, 1, key_len=1, payload_len=1 << 50).to_bytes() + b"k",  # oversized payload
    Frame(Op.GET, 1, version=7).to_bytes(),                              # future version
])
async def test_bad_frames_close_only_their_connection(lm: LmServerProc, garbage: bytes, key_model: str) -> None:
    tier = await open_tier(lm.url)
    try:
        k = key(key_model, 0)
        assert await tier.put_many([k], [chunk(0)]) == 1
        with socket.create_connection(("127.0.0.1", lm.port)) as s:
            s.sendall(garbage)
            assert _recv_all_or_eof(s) == b""  # closed without an answer
        got = await tier.get_many([k])  # the server and the other client carry on
        assert got[0] is not None and torch.equal(got[0].tensor, chunk_tensor(0))
        release_all(got)
        stats = await tier.connector.stats()  # type: ignore[attr-defined]
        assert stats["kvpipe_server_rejected_frames"] >= 1
        assert "closing connection" in lm.log_tail()
    finally:
        await tier.aclose()


async def test_auth_token(tmp_path: Path, key_model: str) -> None:
    srv = lm_server(tmp_path, "--auth-token", "s3cret").start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port)) as s:  # no AUTH first: refused and closed
            s.sendall(Frame(Op.GET, 1, 1).to_bytes() + b"k")
            data = _recv_all_or_eof(s)
            assert Frame.from_bytes(data[:FRAME_SIZE]).status == Status.UNAUTHORIZED
        bad = await open_tier(f"lm://127.0.0.1:{srv.port}?auth_token=wrong")
        assert not bad.available and await bad.get_many([key(key_model, 0)]) == [None]
        await bad.aclose()
        for url in (f"lm://127.0.0.1:{srv.port}?auth_token=s3cret", f"lm://:s3cret@127.0.0.1:{srv.port}"):
            tier = await open_tier(url)
            try:
                assert tier.available
                assert await tier.put_many([key(key_model, 1)], [chunk(1)]) == 1
                got = await tier.get_many([key(key_model, 1)])
                assert got[0] is not None and torch.equal(got[0].tensor, chunk_tensor(1))
                release_all(got)
            finally:
                await tier.aclose()
        assert "wrong auth token" in srv.log_tail()
    finally:
        srv.stop()


def _http_get(port: int, path: str, *headers: str) -> tuple[str, dict[str, str], str]:
    """``GET path`` over a plain socket: (status line, headers, body); the server closes after one request."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall("".join(f"{line}\r\n" for line in (f"GET {path} HTTP/1.1", "Host: x", *headers, "")).encode())
        head, _, body = _recv_all_or_eof(s).partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    assert int(hdrs["content-length"]) == len(body)
    return status, hdrs, body.decode()


async def test_http_metrics(lm: LmServerProc, tmp_path: Path, key_model: str) -> None:
    tier = await open_tier(lm.url)
    try:
        before = await tier.connector.stats()  # type: ignore[attr-defined]
        assert await tier.put_many([key(key_model, i) for i in range(3)], [chunk(i) for i in range(3)]) == 3
        status, hdrs, body = _http_get(lm.port, "/metrics")
        assert status == "HTTP/1.1 200 OK" and hdrs["content-type"].startswith("text/plain; version=0.0.4")
        scraped = parse_metrics(body)  # the same counters as STATS, in Prometheus' text format
        assert scraped["kvpipe_server_puts"] == before["kvpipe_server_puts"] + 3
        assert scraped["kvpipe_server_entries"] == before["kvpipe_server_entries"] + 3
        assert "# TYPE kvpipe_server_puts counter" in body and "# TYPE kvpipe_server_entries gauge" in body
        status, _, body = _http_get(lm.port, "/")
        assert status == "HTTP/1.1 404 Not Found" and "GET /metrics" in body
        assert (await tier.connector.stats())["kvpipe_server_metrics_requests"] >= 1  # type: ignore[attr-defined]
        assert tier.available and await tier.contains_many([key(key_model, 0)]) == [True]  # lm:// unaffected
    finally:
        await tier.aclose()
    srv = lm_server(tmp_path, "--auth-token", "s3cret").start()
    try:
        status, _, body = _http_get(srv.port, "/metrics")
        assert status == "HTTP/1.1 401 Unauthorized" and "Bearer" in body and "kvpipe_server" not in body
        status, _, _ = _http_get(srv.port, "/metrics", "Authorization: Bearer wrong")
        assert status == "HTTP/1.1 401 Unauthorized"
        status, _, body = _http_get(srv.port, "/metrics", "Authorization: Bearer s3cret")
        assert status == "HTTP/1.1 200 OK" and parse_metrics(body)["kvpipe_server_entries"] == 0
    finally:
        srv.stop()


async def test_lru_eviction_under_max_size(tmp_path: Path, key_model: str) -> None:
    srv = lm_server(tmp_path, max_size_gb=1 / 1024).start()  # 1 MiB
    conn = LmConnector.from_url(srv.url)
    try:
        payload = memoryview(bytes(200 << 10))
        hdr = bytes(80)
        for i in range(10):  # 10 x 200 KiB into 1 MiB: the oldest go
            assert await conn.put_many([(f"{key_model}-{i}", hdr, payload)]) == 1
            if i == 2:
                assert await conn.exists_many([f"{key_model}-0"]) == [True]  # touch: not least recent
                await conn.get_many([f"{key_model}-0"], lambda h, k=None: None)
        present = await conn.exists_many([f"{key_model}-{i}" for i in range(10)])
        assert present[9] and present[8] and not present[1]
        stats = await conn.stats()
        assert stats["kvpipe_server_evictions"] >= 5
        assert stats["kvpipe_server_bytes_used"] <= stats["kvpipe_server_capacity_bytes"] <= (1 << 20)
        info = await conn.server_info()  # what `kvpipe inspect --remote` prints of the server
        assert info == {"entries": stats["kvpipe_server_entries"], "used_memory": stats["kvpipe_server_bytes_used"],
                        "maxmemory": stats["kvpipe_server_capacity_bytes"],
                        "evicted_keys": stats["kvpipe_server_evictions"]}
        # A frame bigger than the whole store is an oversized frame: that connection is closed, the server lives on.
        with pytest.raises(TierUnavailable):
            await conn.put_many([("huge", hdr, memoryview(bytes(2 << 20)))])
        await conn.ping()
        entries = await conn.list_entries(f"{key_model}-*")
        assert all(size == 80 + (200 << 10) for _, size in entries)
    finally:
        await conn.aclose()
        srv.stop()


async def test_many_concurrent_clients(lm: LmServerProc, key_model: str) -> None:
    tiers = [await open_tier(lm.url) for _ in range(8)]
    try:
        async def client(j: int) -> None:
            t = tiers[j]
            keys = [key(key_model, j * 100 + i) for i in range(10)]
            assert await t.put_many(keys, [chunk(j * 100 + i) for i in range(10)]) == 10
            got = await t.get_many(keys)
            for i, g in enumerate(got):
                assert g is not None and torch.equal(g.tensor, chunk_tensor(j * 100 + i))
            release_all(got)

        async with anyio.create_task_group() as tg:
            for j in range(8):
                tg.start_soon(client, j)
    finally:
        for t in tiers:
            await t.aclose()


def test_lmcache_server_arguments(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kvpipe.lm.server", "127.0.0.1", "0", "cuda"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "device='cuda'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "kvpipe.lm.server", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "--max-size" in r.stdout and "--auth-token" in r.stdout


@pytest.mark.parametrize("entry", [["-m", "kvpipe.cli", "server"], ["-m", "kvpipe.lm.server"]])
def test_an_address_it_cannot_listen_on_is_one_line(entry: list[str]) -> None:
    """A port in use, or an address that is not this machine's: one line naming the address, exit 2, no
    traceback (the bind used to fail inside the server's task group and print an exception group)."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for host, why in (("127.0.0.1", "Address already in use"), ("192.0.2.1", "Cannot assign requested address")):
            r = subprocess.run([sys.executable, *entry, host, str(port if host == "127.0.0.1" else 45678)],
                               capture_output=True, text=True, timeout=60)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1, r.stderr
            assert f"cannot listen on {host}:" in lines[0] and why in lines[0] and "Traceback" not in r.stderr


async def test_the_installed_lmcache_server_command_serves(tmp_path: Path, key_model: str) -> None:
    # The user guide's `lmcache_server <host> <port> [device]`, as installed by the package.
    script = Path(sys.executable).parent / "lmcache_server"
    if not script.exists():
        pytest.skip("lmcache_server is not installed next to this interpreter (pip install -e .)")
    port = free_port()
    d = tmp_path / "lmcache-server"
    d.mkdir()
    server = LmServerProc([str(script), "127.0.0.1", str(port), "cpu"], port, d, "lmcache_server").start()
    tier = await open_tier(f"lm://127.0.0.1:{port}")
    try:
        await assert_round_trip(tier, key(key_model, 0), 0)
    finally:
        await tier.aclose()
        server.stop()
    assert f"lm server listening on 127.0.0.1:{port}" in server.log_tail()


async def test_a_redis_client_is_told_it_reached_an_lm_server(lm: LmServerProc, key_model: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    # A redis:// URL given the lm:// server's address: the server answers the first RESP byte with a RESP error
    # and closes, so the tier goes down at once with a reason that says why, instead of waiting out its deadline
    # (the Redis PING is 14 bytes: a frame reader would have waited for 32).
    with socket.create_connection(("127.0.0.1", lm.port)) as s:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert _recv_all_or_eof(s) == RESP_REFUSAL
    with anyio.fail_after(60):  # far below the deadline: not waited out
        tier = await open_tier(f"redis://127.0.0.1:{lm.port}", make_ctx(timeout=600))
    try:
        assert not tier.available
        assert "use an lm:// URL" in caplog.text
    finally:
        await tier.aclose()
    ok = await open_tier(lm.url)  # the server carries on
    try:
        await assert_round_trip(ok, key(key_model, 0), 0)
    finally:
        await ok.aclose()


async def test_an_lm_url_at_a_redis_server_says_so(valkey: ServerProc, caplog: pytest.LogCaptureFixture) -> None:
    # Redis never answers an lm:// frame (it waits for a line end), so the tier saw only its deadline pass. An
    # unanswered PING now makes the client ask with one Redis PING: the reason names the fix.
    with anyio.fail_after(60):
        tier = await open_tier(f"lm://127.0.0.1:{valkey.port}", make_ctx(timeout=600))
    try:
        assert not tier.available
        assert f"a Redis server answers there (PING: b'+PONG'), not an lm:// server: use " \
               f"redis://127.0.0.1:{valkey.port}" in caplog.text
    finally:
        await tier.aclose()


async def test_the_probe_does_not_take_an_lm_server_for_redis(lm: LmServerProc) -> None:
    # The probe's own RESP PING reaches a real lm:// server: its refusal line is recognised, nothing is raised.
    await LmConnector.from_url(lm.url)._refuse_resp_server()
    with anyio.fail_after(10):  # the server logs after its refusal line went out: wait for the line, not a time
        while "a Redis client (RESP) connected" not in lm.log_tail():
            await anyio.sleep(0.05)
