"""SocketIO over a real socketpair: payloads land intact in the caller's buffer, and a digest fed while receiving
equals the checksum of the whole payload, whatever the split between buffered bytes, small tails and big reads."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import AsyncIterator

import anyio
import pytest

from kvpipe.connectors import sockio
from kvpipe.connectors.resp import read_reply
from kvpipe.connectors.sockio import PeerClosed, SocketIO, refuse_self_connection
from kvpipe.errors import ProtocolError
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


# -- read waits: one registration with the loop's selector, kept between waits -------------------------------------
def _echo_after(peer: socket.socket, delay: float, data: bytes) -> None:
    """Send ``data`` from the loop ``delay`` seconds from now: the reader is then surely waiting."""
    asyncio.get_running_loop().call_later(delay, peer.send, data)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[SocketIO, socket.socket]]:
    """A SocketIO over one end of a socketpair, and the other end; both closed (on the test's loop) after."""
    a, b = socket.socketpair()
    io = SocketIO(a)
    yield io, b
    io.close()
    b.close()


async def _reply(io: SocketIO, peer: socket.socket, data: bytes) -> bytes:
    """Have ``peer`` send ``data`` once ``io`` waits for it, and read it back (a hung wait fails after 5 s)."""
    _echo_after(peer, 0.001, data)
    with anyio.fail_after(5):
        return await io.read_exactly(len(data))


async def test_request_reply_waits_keep_one_registration(monkeypatch: pytest.MonkeyPatch,
                                                         pair: tuple[SocketIO, socket.socket]) -> None:
    io, b = pair
    loop = asyncio.get_running_loop()
    adds = []
    real_add = loop.add_reader
    monkeypatch.setattr(loop, "add_reader", lambda fd, cb, *args: (adds.append(fd), real_add(fd, cb, *args)))
    waits = 0
    real_wait = io._wait_readable

    async def counted() -> None:
        nonlocal waits
        waits += 1
        await real_wait()

    monkeypatch.setattr(io, "_wait_readable", counted)
    dst = memoryview(bytearray(3))
    for i in range(30):
        _echo_after(b, 0.001, b"r%02d" % i)
        with anyio.fail_after(5):
            await io.read_into(dst)
        assert bytes(dst) == b"r%02d" % i
    assert adds == [io.sock.fileno()]  # registered once, not once per wait
    # A readiness event left over from the previous reply (seen by the selector before the woken task read it)
    # must not wake the next wait: every reply here cost exactly one wait, not a useless one and another.
    assert waits == 30


async def test_close_unregisters_so_the_descriptor_number_can_come_back() -> None:
    a, b = socket.socketpair()
    io = SocketIO(a)
    fd = a.fileno()
    await _reply(io, b, b"x")
    io.close()
    b.close()
    c, d = socket.socketpair()  # Linux hands out the lowest free numbers: most likely fd again
    io2 = SocketIO(c if c.fileno() == fd else d)
    other = d if io2.sock is c else c
    try:
        assert await _reply(io2, other, b"y") == b"y"  # a stale selector entry for fd would fail this registration
    finally:
        io2.close()
        other.close()


async def test_a_wait_elsewhere_on_the_socket_does_not_leave_a_dead_registration(
        pair: tuple[SocketIO, socket.socket]) -> None:
    # anyio.wait_readable on the same descriptor replaces the reader callback and removes it afterwards; the next
    # SocketIO wait must notice and register again instead of waiting forever.
    io, b = pair
    await _reply(io, b, b"1")
    _echo_after(b, 0.001, b"2")
    with anyio.fail_after(5):
        await anyio.wait_readable(io.sock)
    assert io.sock.recv(1) == b"2"
    assert await _reply(io, b, b"3") == b"3"


async def test_eof_on_an_idle_socket_drops_the_registration(pair: tuple[SocketIO, socket.socket]) -> None:
    io, b = pair
    await _reply(io, b, b"x")
    assert io._reader is not None and io._reader.registered
    b.close()  # the peer goes away while nobody reads: readable (EOF) for good
    for _ in range(10):
        await asyncio.sleep(0.005)
    assert not io._reader.registered  # no callback spinning on every loop iteration
    with pytest.raises(PeerClosed):
        await io.read_exactly(1)


def test_one_socket_read_from_two_event_loops_in_turn() -> None:
    a, b = socket.socketpair()
    io = SocketIO(a)

    try:
        assert asyncio.run(_reply(io, b, b"first")) == b"first"
        assert asyncio.run(_reply(io, b, b"second")) == b"second"  # the first loop (closed) kept nothing that matters
    finally:
        io.close()
        b.close()


async def test_read_waits_without_a_selector_loop_use_anyio(monkeypatch: pytest.MonkeyPatch,
                                                            pair: tuple[SocketIO, socket.socket]) -> None:
    # Backends without add_reader (trio, a proactor loop) wait through anyio.wait_readable each time.
    monkeypatch.setattr(sockio, "_selector_loop", lambda: None)
    io, b = pair
    for data in (b"p", b"q"):
        assert await _reply(io, b, data) == data
    assert io._reader is None



@pytest.mark.parametrize(("reply", "said"), [
    (b"$1000000000000\r\n", "bulk reply of 1000000000000 bytes"),
    (b"*99999999999\r\n", "array reply of 99999999999 items"),
    (b"$-5\r\n", "bulk reply of -5 bytes"),
    (b"$3\r\nabcXY", "not terminated by CRLF"),
])
async def test_a_reply_no_redis_sends_is_a_protocol_error(pair: tuple[SocketIO, socket.socket], reply: bytes,
                                                          said: str) -> None:
    """Lengths a Redis reply never has (a stream out of step, another service at the address) are refused as they
    are read: a "$1000000000000" reply used to be allocated, and raised MemoryError into the engine."""
    io, peer = pair
    peer.sendall(reply)
    with anyio.fail_after(5), pytest.raises(ProtocolError, match=said):
        await read_reply(io)
