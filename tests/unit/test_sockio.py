"""SocketIO over a real socketpair: payloads land intact in the caller's buffer, and a digest fed while receiving
equals the checksum of the whole payload, whatever the split between buffered bytes, small tails and big reads."""

from __future__ import annotations

import os
import socket
import threading

import anyio
import pytest

from kvpipe.connectors.sockio import SocketIO, refuse_self_connection
from kvpipe.serde.entry import payload_checksum, payload_digest

pytestmark = pytest.mark.unit


def _send_in_pieces(sock: socket.socket, data: bytes, pieces: list[int]) -> None:
    pos = 0
    for p in [*pieces, len(data)]:
        sock.sendall(data[pos : pos + p])
        pos += p
        if pos >= len(data):
            break


@pytest.mark.parametrize("size,prefix,pieces", [
    (4 << 20, 0, [1 << 20, 7, 3 << 19]),   # big reads straight into the buffer
    (300_000, 5000, [20, 100_000]),        # part already buffered with the line before it
    (10_000, 0, [1, 2, 3, 4096]),          # small: only through the staging buffer
    (1 << 20, 65_536, [16383, 16385, 1]),  # tails around the 16 KiB staging threshold
])
async def test_read_into_with_digest_matches_payload(size: int, prefix: int, pieces: list[int]) -> None:
    payload = os.urandom(size)
    a, b = socket.socketpair()
    io = SocketIO(a)
    try:
        wire = b"LINE\r\n" + payload + b"NEXT\r\n"
        t = threading.Thread(target=_send_in_pieces, args=(b, wire, [6 + prefix, *pieces]))
        t.start()
        assert await io.readline() == b"LINE"
        dst = memoryview(bytearray(size))
        digest = payload_digest()
        await io.read_into(dst, digest)
        assert await io.readline() == b"NEXT"  # nothing of what follows was consumed
        with anyio.fail_after(10):
            await anyio.to_thread.run_sync(t.join)
        assert bytes(dst) == payload
        assert digest.intdigest() == payload_checksum(payload)
    finally:
        io.close()
        b.close()


def test_a_self_connection_is_refused() -> None:
    # The TCP simultaneous open the kernel can produce when nothing listens on a port inside the ephemeral range
    # and it picks that port as the source: made here on purpose (bind, then connect to the bound address).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.connect(s.getsockname())
        s.sendall(b"PING")
        assert s.recv(4) == b"PING"  # it echoes: without the check an lm:// PING would look answered
        with pytest.raises(ConnectionRefusedError, match="connected to itself"):
            refuse_self_connection(s, s.getsockname())
    with socket.create_server(("127.0.0.1", 0)) as srv, socket.create_connection(srv.getsockname()) as c:
        refuse_self_connection(c, c.getpeername())  # a real peer passes
