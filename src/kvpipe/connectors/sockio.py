"""Lean socket I/O for the remote connectors and the ``lm://`` server: non-blocking sockets driven by anyio.

Why not anyio/asyncio streams: a stream's ``receive()`` allocates a fresh ``bytes`` per read and the asyncio
``StreamReader`` copies into its own buffer (~1 GB/s here), while ``recv_into`` a preallocated buffer moves
~4 GB/s over loopback. So a :class:`SocketIO` reads small things (RESP lines, frame headers) through a reusable
staging buffer and big payloads straight into the caller's memory, and writes with ``sendmsg`` scatter-gather so
a 4 MiB value is never concatenated with its command header. Readiness comes from ``anyio.wait_readable`` /
``anyio.wait_writable``, so the code runs on every anyio backend.

A :class:`SocketIO` is used by one task at a time. If an operation is interrupted (cancelled, deadline, error)
the stream position is unknown: the owner must close it; :class:`ConnectionPool` does that.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

import anyio
import attrs

__all__ = ["ConnectionPool", "PeerClosed", "SocketIO", "connect_tcp", "connect_unix"]

log = logging.getLogger(__name__)

_STAGING = 256 << 10
# SO_RCVLOWAT cap for big payload reads: one wake-up per MiB instead of one per burst of segments (CPU per
# 4 MiB GET here: 0.50 ms with wake-ups on every burst, 0.33 ms with this).
_LOWAT_MAX = 1 << 20
_LOWAT_MIN = 128 << 10
# Measured here (4 MiB lm:// PUT): 1.5-1.8 ms with a 4 MiB send buffer, 2.9-4.6 ms with the autotuned default.
_SNDBUF = int(os.environ.get("KVPIPE_SNDBUF", str(4 << 20)))
# Linux caps one sendmsg at IOV_MAX (1024) buffers.
_IOV_MAX = 512
# TLS: an SSLSocket has no sendmsg, so every buffer would be its own SSL_write (a TLS record and a syscall each);
# runs of small buffers (pipelined commands, RESP headers) are joined up to this size first. 0 turns it off.
_TLS_JOIN = 64 << 10
_TLS_SMALL = 16 << 10
_WANT_READ = (BlockingIOError, InterruptedError, ssl.SSLWantReadError)
_WANT_WRITE = (ssl.SSLWantWriteError,)

Buffer = bytes | bytearray | memoryview


class Digest(Protocol):
    """A streaming hasher (``xxhash.xxh3_64()``)."""

    def update(self, data: Buffer, /) -> None: ...


class PeerClosed(ConnectionResetError):
    """The peer closed the connection (EOF) in the middle of a message."""


class SocketIO:
    """Buffered reads and scatter-gather writes over one non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._buf = bytearray(_STAGING)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._tls = isinstance(sock, ssl.SSLSocket)
        self.closed = False
        self._lowat = False
        self.bytes_in = 0
        self.bytes_out = 0

    # -- reading ------------------------------------------------------------------------------------------------
    async def _recv_into(self, view: memoryview, need: int = 1) -> int:
        """Receive into ``view``; ``need``: bytes the caller surely expects, so the wait can ask the kernel to
        report readiness only once that many are queued (``SO_RCVLOWAT``: one wake-up per big payload instead of
        one per segment burst).

        Always read first and wait only after the socket said "would block": over TLS, OpenSSL may hold
        decrypted bytes of a record that did not fit the last ``view`` (``sock.pending()``), which the selector
        cannot see (``test_socketio_tls_tail_left_inside_openssl_is_read`` hangs if this waits first). No
        ``SO_RCVLOWAT`` on TLS sockets either: the kernel counts encrypted bytes."""
        while True:
            try:
                n = self.sock.recv_into(view)
            except _WANT_READ:
                # Half of what is still to come: the last wake-up then has little left to copy and hash after
                # the last byte arrived (the tail: waking only once all of it is there costs that much more).
                want = min(need // 2, _LOWAT_MAX) if need >= _LOWAT_MIN and not self._tls else 1
                if want > 1:
                    # At most a third of the receive buffer: asked for more than about half of it, Linux grows
                    # the buffer and clamps the TCP window to the low-water mark for good (tcp_set_rcvlowat), and
                    # the sender then stops at each mark until this side reads (4 MiB lm:// GETs were ~10%
                    # slower that way, measured here). The buffer autotunes upwards as data flows.
                    want = min(want, self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 3)
                if want > 1:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                    self._lowat = True
                elif self._lowat:
                    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                    self._lowat = False
                await anyio.wait_readable(self.sock)
                continue
            except _WANT_WRITE:  # TLS renegotiation
                await anyio.wait_writable(self.sock)
                continue
            if n == 0:
                raise PeerClosed("connection closed by peer")
            self.bytes_in += n
            return n

    async def _fill(self) -> None:
        """Read more into the staging buffer (compacting it first when the free tail is small)."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < 4096:
            n = self._end - self._start
            self._buf[:n] = self._buf[self._start : self._end]
            self._start, self._end = 0, n
            if n == len(self._buf):  # a line longer than the buffer: grow (bounded by the callers' limits)
                self._buf.extend(bytes(len(self._buf)))
                self._view = memoryview(self._buf)
        self._end += await self._recv_into(self._view[self._end :])

    @property
    def buffered(self) -> int:
        """Bytes received and not yet consumed."""
        return self._end - self._start

    async def at_eof(self) -> bool:
        """Wait for the next byte; ``True`` when the peer closed cleanly at a message boundary."""
        if self.buffered:
            return False
        try:
            await self._fill()
        except PeerClosed:
            return True
        return False

    async def readline(self, limit: int = 1 << 20) -> bytes:
        """One ``\\r\\n``-terminated line, without the terminator.

        :raises PeerClosed: on EOF.  :raises ValueError: when no terminator comes within ``limit`` bytes.
        """
        scan = self._start
        while True:
            i = self._buf.find(b"\r\n", scan, self._end)
            if i >= 0:
                line = bytes(self._view[self._start : i])
                self._start = i + 2
                return line
            if self._end - self._start > limit:
                raise ValueError(f"line longer than {limit} bytes")
            scan = max(self._start, self._end - 1)
            before = self._start
            await self._fill()
            scan += self._start - before  # the buffer may have been compacted

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes. :raises PeerClosed: on EOF."""
        if n <= self.buffered:
            out = bytes(self._view[self._start : self._start + n])
            self._start += n
            return out
        out_buf = bytearray(n)
        await self.read_into(memoryview(out_buf))
        return bytes(out_buf)

    async def read_into(self, dst: memoryview, digest: Digest | None = None) -> None:
        """Fill ``dst`` completely: first from what is buffered, then with ``recv_into`` straight into ``dst``.

        ``digest`` (an ``xxhash`` hasher) is updated with each part as it lands, while the rest is still in
        flight, so checking a payload costs almost nothing after the last byte (vs ~0.14 ms per 4 MiB after).
        """
        dst = dst.cast("B") if dst.format != "B" or dst.ndim != 1 else dst
        n = len(dst)
        have = min(n, self.buffered)
        if have:
            dst[:have] = self._view[self._start : self._start + have]
            self._start += have
        pos = have
        while pos < n:
            if n - pos < 16384:  # small tails go through the staging buffer (fewer syscalls for what follows)
                await self._fill()
                take = min(n - pos, self.buffered)
                dst[pos : pos + take] = self._view[self._start : self._start + take]
                self._start += take
                pos += take
            else:
                got = await self._recv_into(dst[pos:], n - pos)
                if digest is not None:
                    digest.update(dst[pos - have : pos + got])
                    have = 0
                pos += got
                continue
            if digest is not None:  # hashed with the next big part, or at the end
                have += take
        if digest is not None and have:
            digest.update(dst[n - have : n])

    async def skip(self, n: int) -> None:
        """Consume and discard ``n`` bytes."""
        while n > 0:
            if not self.buffered:
                await self._fill()
            take = min(n, self.buffered)
            self._start += take
            n -= take

    # -- writing ------------------------------------------------------------------------------------------------
    async def send_all(self, buffers: Sequence[Buffer]) -> None:
        """Send every buffer, in order, without concatenating them (``sendmsg`` scatter-gather)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        if self._tls and _TLS_JOIN and len(views) > 1:
            views = _join_small(views)
        i = 0
        while i < len(views):
            batch = views[i : i + _IOV_MAX]
            try:
                if self._tls:  # SSLSocket has no sendmsg
                    sent = self.sock.send(batch[0])
                else:
                    sent = self.sock.sendmsg(batch)
            except (BlockingIOError, InterruptedError, ssl.SSLWantWriteError):
                await anyio.wait_writable(self.sock)
                continue
            except ssl.SSLWantReadError:
                await anyio.wait_readable(self.sock)
                continue
            self.bytes_out += sent
            while sent:
                v = views[i]
                if sent >= len(v):
                    sent -= len(v)
                    i += 1
                else:
                    views[i] = v[sent:]
                    sent = 0

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if not self.closed:
            self.closed = True
            try:
                self.sock.close()
            except OSError:
                pass


def _join_small(views: list[memoryview]) -> list[memoryview]:
    """``views`` with each run of small buffers copied into one buffer of at most ``_TLS_JOIN`` bytes (big
    buffers are kept as they are: never copied)."""
    out: list[memoryview] = []
    cur = bytearray()
    for v in views:
        if len(v) >= _TLS_SMALL:
            if cur:
                out.append(memoryview(cur))
                cur = bytearray()
            out.append(v)
            continue
        if len(cur) + len(v) > _TLS_JOIN:
            out.append(memoryview(cur))
            cur = bytearray()
        cur += v
    if cur:
        out.append(memoryview(cur))
    return out


def tune_socket(sock: socket.socket) -> None:
    """TCP_NODELAY (pipelined small commands must not wait for Nagle), and a send buffer big enough for one
    4 MiB chunk, so a big send completes in one or two calls instead of one wake-up per drained burst."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if _SNDBUF:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)


def refuse_self_connection(sock: socket.socket, addr: Any) -> None:
    """Raise ``ConnectionRefusedError`` when ``sock`` is connected to itself.

    TCP simultaneous open: when nothing listens on a local port inside the ephemeral range, the kernel may pick
    that very port as the source of a connection to it, and the "connection" echoes every request back (an
    ``lm://`` PING would seem answered, a GET would read its own frame). It is a refused connection.
    """
    if sock.getsockname() == sock.getpeername():
        raise ConnectionRefusedError(errno.ECONNREFUSED, f"connect to {addr}: connected to itself (nothing listens)")


async def _connect_sock(family: int, addr: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            raise OSError(err, f"connect to {addr}: {os.strerror(err)}")
        if err:
            await anyio.wait_writable(sock)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, f"connect to {addr}: {os.strerror(err)}")
        if family != socket.AF_UNIX:
            refuse_self_connection(sock, addr)
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_tcp(host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                      server_hostname: str | None = None) -> SocketIO:
    """Open a TCP connection (optionally TLS) and wrap it.

    :raises OSError: when the connection cannot be made.
    """
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    last: OSError = OSError(f"no address for {host}:{port}")
    for family, _type, _proto, _canon, addr in infos:
        try:
            sock = await _connect_sock(family, addr)
            break
        except OSError as exc:
            last = exc
    else:
        raise last
    tune_socket(sock)
    if ssl_context is not None:
        tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname or host, do_handshake_on_connect=False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await anyio.wait_readable(tls)
                except ssl.SSLWantWriteError:
                    await anyio.wait_writable(tls)
        except BaseException:
            tls.close()
            raise
        return SocketIO(tls)
    return SocketIO(sock)


async def connect_unix(path: str) -> SocketIO:
    """Open a Unix-domain stream connection. :raises OSError: when it cannot be made."""
    return SocketIO(await _connect_sock(socket.AF_UNIX, path))


@attrs.define(eq=False)
class ConnectionPool:
    """A bounded pool of :class:`SocketIO` connections to one endpoint.

    ``max_connections`` bounds concurrency: callers beyond it wait for a connection (a semaphore), unlike
    redis-py's asyncio pool which raises when full. A connection whose use raised or was cancelled is closed,
    never returned: its position in the byte stream is unknown.
    """

    connect: Callable[[], Awaitable[SocketIO]]
    max_connections: int = 8
    on_connect: Callable[[SocketIO], Awaitable[Any]] | None = None
    _idle: list[SocketIO] = attrs.field(factory=list)
    _sem: anyio.Semaphore | None = None
    _generation: int = 0
    closed: bool = False

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[SocketIO]:
        """A connection for one exchange (connecting when none is idle).

        :raises OSError: when a new connection cannot be made.
        """
        if self.closed:
            raise ConnectionAbortedError("connection pool closed")
        if self._sem is None:
            # fast_acquire: a free permit is taken without yielding to the event loop. anyio's default makes every
            # acquire a full loop iteration (a checkpoint), one more per remote call: 2 of the 3 loop iterations
            # of a small lm:// GET here were checkpoints, not I/O.
            self._sem = anyio.Semaphore(self.max_connections, fast_acquire=True)
        async with self._sem:
            gen = self._generation
            if self._idle:
                conn = self._idle.pop()
            else:
                conn = await self.connect()
                try:
                    if self.on_connect is not None:
                        await self.on_connect(conn)
                except BaseException:
                    conn.close()
                    raise
            try:
                yield conn
            except BaseException:
                conn.close()
                raise
            if self.closed or gen != self._generation or conn.closed:
                conn.close()
            else:
                self._idle.append(conn)

    def reset(self) -> None:
        """Close idle connections and make busy ones close when returned (after a failover or an error)."""
        self._generation += 1
        idle, self._idle = self._idle, []
        for c in idle:
            c.close()

    def close(self) -> None:
        """Close everything; idempotent."""
        self.closed = True
        self.reset()
