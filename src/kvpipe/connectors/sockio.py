"""Lean socket I/O for the remote connectors and the ``lm://`` server: non-blocking sockets driven by anyio.

Why not anyio/asyncio streams: a stream's ``receive()`` allocates a fresh ``bytes`` per read and the asyncio
``StreamReader`` copies into its own buffer (~1 GB/s here), while ``recv_into`` a preallocated buffer moves
~4 GB/s over loopback. So a :class:`SocketIO` reads small things (RESP lines, frame headers) through a reusable
staging buffer and big payloads straight into the caller's memory, and writes with ``sendmsg`` scatter-gather so
a 4 MiB value is never concatenated with its command header. Readiness comes from ``anyio.wait_readable`` /
``anyio.wait_writable``, so the code runs on every anyio backend; on asyncio a socket's read interest stays
registered between waits (:class:`_Reader`).

A :class:`SocketIO` is used by one task at a time. If an operation is interrupted (cancelled, deadline, error)
the stream position is unknown: the owner must close it; :class:`ConnectionPool` does that.
"""

from __future__ import annotations

import asyncio
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

from kvpipe.errors import ConfigError

__all__ = ["ConnectionPool", "PeerClosed", "SocketIO", "connect_tcp", "connect_unix", "listen_tcp"]

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
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # as a plain int: OR-ing the IntFlag members costs ~2 us a call
_WANT_READ = (BlockingIOError, InterruptedError, ssl.SSLWantReadError)
_WANT_WRITE = (ssl.SSLWantWriteError,)

Buffer = bytes | bytearray | memoryview


class Digest(Protocol):
    """A streaming hasher (``xxhash.xxh3_64()``)."""

    def update(self, data: Buffer, /) -> None: ...


class PeerClosed(ConnectionResetError):
    """The peer closed the connection (EOF) in the middle of a message."""


class _Reader:
    """One socket's read interest, kept registered with an asyncio loop between waits.

    ``anyio.wait_readable`` registers the socket with the loop's selector for each wait and removes it after:
    two ``epoll_ctl`` calls per wait, and a 4 MiB GET waits 4-6 times (the reply header, then the payload in
    ``SO_RCVLOWAT`` steps). Measured here: 37 us of CPU per wait on an already readable socket, 27 us for a bare
    ``add_reader``/``remove_reader`` round, 10 us for a wait through this. This keeps the registration while the
    socket is in use: a wait sets a future that the reader callback resolves. Through the ``lm://`` tier, one call
    at a time, alternating with the old waits in one process: a 4 KiB GET 236 vs 256 us of client CPU, a 4 MiB GET
    1586 vs 1637 and 1592 vs 1642 us (medians of 600 each).

    The selector is level-triggered, so the callback also runs when bytes are waiting and nobody waits for them
    (after a wake-up, before the woken task read them; or a peer's EOF on a pooled connection): the second such
    call in a row removes the registration, and the next wait registers again. Only the loop's own thread
    touches the registration.
    """

    __slots__ = ("fd", "idle", "loop", "peek", "registered", "sock", "waiter")

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        # The socket is held while registered: were it collected unclosed, its descriptor number could come back
        # as another socket while the selector still held this one's entry.
        self.sock = sock
        self.fd = fd = sock.fileno()
        # plain sockets are peeked at before a waiter is woken (below); a TLS socket's bytes are records, any
        # of which may let the reader progress, so any readiness wakes it
        self.peek = not isinstance(sock, ssl.SSLSocket)
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.idle = 0
        loop.add_reader(fd, self.fire)
        self.registered = True

    def fire(self) -> None:
        w = self.waiter
        if w is not None:
            if not w.done() and self._queued():
                w.set_result(None)
            return
        self.idle += 1
        if self.idle >= 2:
            self.unregister()

    def _queued(self) -> bool:
        """Whether bytes (or EOF) are waiting now. A readiness event may be stale: the selector saw bytes that
        the task it woke has read since, and the event reached this callback after that task had started its
        next wait (each small request/reply paid one useless wake-up and a second wait that way)."""
        if not self.peek:
            return True
        try:
            self.sock.recv(1, _PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # an error to report: the woken reader's recv raises it
        return True

    def intact(self) -> bool:
        """Whether the loop's selector still calls :meth:`fire` for this descriptor: a wait elsewhere on the same
        socket (``anyio.wait_readable``) would have replaced the callback and then removed the registration, and
        a wait on that would never end."""
        if not self.registered:
            return False
        try:
            handle = self.loop._selector.get_key(self.fd).data[0]  # type: ignore[attr-defined]
            return handle is not None and not handle.cancelled() and handle._callback == self.fire
        except (KeyError, AttributeError, TypeError, IndexError):
            return False

    def unregister(self) -> None:
        if self.registered:
            self.registered = False
            self.loop.remove_reader(self.fd)

    def drop(self) -> None:
        """Unregister before the socket is closed (a closed descriptor left in the selector breaks the next
        registration of its number): from the loop's own thread, or handed to it when another thread closes."""
        if not self.registered or self.loop.is_closed():
            self.registered = False
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.unregister()
        else:
            self.registered = False
            try:
                self.loop.call_soon_threadsafe(self.loop.remove_reader, self.fd)
            except RuntimeError:  # closed meanwhile: its selector is gone with it
                pass


def _selector_loop() -> asyncio.AbstractEventLoop | None:
    """The running asyncio loop when it has a selector (``add_reader``), else ``None`` (trio, proactor)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return loop if isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop) else None


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
        self._reader: _Reader | None = None
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
                await self._wait_readable()
                continue
            except _WANT_WRITE:  # TLS renegotiation
                await anyio.wait_writable(self.sock)
                continue
            if n == 0:
                raise PeerClosed("connection closed by peer")
            self.bytes_in += n
            return n

    async def _wait_readable(self) -> None:
        """Until the socket is readable: through a :class:`_Reader` kept registered on asyncio selector loops,
        ``anyio.wait_readable`` on other backends. Every read wait of this socket goes through here (a second
        registration of the descriptor would replace the reader's callback)."""
        loop = _selector_loop()
        if loop is None:
            await anyio.wait_readable(self.sock)
            return
        r = self._reader
        if r is None or r.loop is not loop or not r.intact():
            if r is not None and r.loop is not loop:
                r.drop()
            r = self._reader = _Reader(self.sock, loop)
        fut: asyncio.Future[None] = loop.create_future()
        r.waiter = fut
        r.idle = 0
        try:
            await fut
        finally:
            r.waiter = None

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

    def peek(self, n: int) -> bytes:
        """Up to ``n`` of the bytes received and not yet consumed (without consuming them; no I/O)."""
        return bytes(self._view[self._start : min(self._end, self._start + n)])

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
                await self._wait_readable()
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
            r, self._reader = self._reader, None
            if r is not None:
                r.drop()
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


def listen_tcp(host: str, port: int, *, backlog: int = 1024) -> socket.socket:
    """A listening socket on ``host:port`` (an IPv6 literal listens on IPv6), blocking as created.

    :raises ConfigError: one line naming the address when it cannot be bound (in use, not an address of this
        machine, a privileged port).
    """
    try:
        return socket.create_server((host, port), backlog=backlog,
                                    family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None


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
