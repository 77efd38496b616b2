"""The ``lm://`` cache server: ``kvpipe server HOST PORT [cpu]`` (also ``lmcache_server HOST PORT [DEVICE]``).

One process, one anyio event loop, a task per connection. Entries live in one preallocated
:class:`~kvpipe.memory.pool.HostPool` bounded by ``--max-size``; a ``PUT`` payload is received with ``recv_into``
straight into its pool region (asyncio's ``StreamReader`` is ~4x slower here), and becomes visible only once it is
complete, so a reader never sees half an entry. When the pool is full the least recently used entries are evicted;
an entry being sent keeps its region (ref count) until the send ends.

A malformed, oversized or unauthenticated frame closes that connection with a logged reason; the server and the
other clients carry on.

The same port answers an HTTP ``GET /metrics`` (``curl http://HOST:PORT/metrics``, a Prometheus scrape) with the
``STATS`` counters, one request per connection; with ``--auth-token`` it takes ``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import fnmatch
import hmac
import logging
import signal
import socket
from collections import OrderedDict

import anyio
import attrs
import torch

from kvpipe.connectors.sockio import SocketIO, listen_tcp, tune_socket
from kvpipe.errors import ProtocolError
from kvpipe.lm.protocol import (
    FRAME_SIZE,
    MAGIC,
    RESP_REFUSAL,
    Frame,
    Op,
    Status,
    decode_keys,
    encode_entries,
    encode_frame,
)
from kvpipe.memory.pool import HostPool, MemoryObj, create_pool

__all__ = ["LmServer", "serve_forever"]

log = logging.getLogger(__name__)

_DEFAULT_MAX_SIZE_GB = 4.0
_HTTP_LINE = 8192  # an HTTP request line or header longer than this closes the connection
_HTTP_HEADERS = 100  # and so do more header lines than this
_HTTP_DEADLINE = 10.0  # seconds for a whole HTTP request to arrive


@attrs.define(eq=False)
class LmServer:
    """An ``lm://`` server bound to ``host:port`` (port 0 picks a free one; see :attr:`port` after start)."""

    host: str
    port: int
    max_size: int = int(_DEFAULT_MAX_SIZE_GB * (1 << 30))
    auth_token: str | None = None
    max_frame: int | None = None
    pool: HostPool = attrs.field(init=False)
    _index: OrderedDict[str, MemoryObj] = attrs.field(init=False, factory=OrderedDict)
    _counters: dict[str, int] = attrs.field(init=False, factory=dict)
    _conns: set[SocketIO] = attrs.field(init=False, factory=set)
    _lsock: socket.socket | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        self.pool = create_pool(self.max_size)
        self.pool.evictor = self._evict_lru
        if self.max_frame is None:
            self.max_frame = self.pool.capacity
        for name in ("hits", "misses", "puts", "put_bytes", "get_bytes", "deletes", "evictions", "no_space",
                     "rejected_frames", "connections_total", "metrics_requests"):
            self._counters[name] = 0

    # -- storage ------------------------------------------------------------------------------------------------
    def _evict_lru(self, _nbytes: int) -> bool:
        if not self._index:
            return False
        key, obj = self._index.popitem(last=False)
        obj.release()
        self._counters["evictions"] += 1
        log.debug("evicted %s (%d bytes)", key, obj.nbytes)
        return True

    def _store(self, key: str, obj: MemoryObj) -> None:
        old = self._index.pop(key, None)
        if old is not None:
            old.release()
        self._index[key] = obj

    def _delete(self, key: str) -> bool:
        obj = self._index.pop(key, None)
        if obj is None:
            return False
        obj.release()
        self._counters["deletes"] += 1
        return True

    def metrics_text(self) -> str:
        """Prometheus-style ``name value`` lines (the ``STATS`` reply)."""
        gauges = {"entries": len(self._index), "bytes_used": self.pool.used, "capacity_bytes": self.pool.capacity,
                  "connections_open": len(self._conns)}
        lines = ["# kvpipe lm server"]
        for kind, values in (("gauge", gauges), ("counter", self._counters)):
            for k, v in values.items():
                lines += [f"# TYPE kvpipe_server_{k} {kind}", f"kvpipe_server_{k} {v}"]
        return "\n".join(lines) + "\n"

    def close_storage(self) -> None:
        """Drop every entry (at shutdown)."""
        while self._index:
            _, obj = self._index.popitem()
            obj.release()

    # -- network ------------------------------------------------------------------------------------------------
    def bind(self) -> int:
        """Bind and listen now, before :meth:`serve` (which binds itself otherwise), so that an address that
        cannot be bound is a plain error here and not one wrapped by a task group. Returns the bound port.

        :raises ConfigError: when the address cannot be bound (in use, not local, not permitted).
        """
        if self._lsock is None:
            lsock = listen_tcp(self.host, self.port)
            lsock.setblocking(False)
            self._lsock = lsock
            self.port = lsock.getsockname()[1]
        return self.port

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Accept and serve connections until cancelled; reports the bound port through ``task_status``.

        :raises ConfigError: when the address cannot be bound.
        """
        self.bind()
        lsock, self._lsock = self._lsock, None
        assert lsock is not None
        log.info("kvpipe lm server listening on %s:%d (max size %.2f GB%s)", self.host, self.port,
                 self.pool.capacity / (1 << 30), ", auth required" if self.auth_token else "")
        try:
            async with anyio.create_task_group() as tg:
                task_status.started(self.port)
                while True:
                    await anyio.wait_readable(lsock)
                    try:
                        sock, peer = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:  # EMFILE and friends: log, back off, keep serving
                        log.warning("accept failed: %s", exc)
                        await anyio.sleep(0.1)
                        continue
                    tune_socket(sock)
                    tg.start_soon(self._handle, SocketIO(sock), f"{peer[0]}:{peer[1]}")
        finally:
            lsock.close()
            for conn in list(self._conns):
                conn.close()
            self.close_storage()

    async def _handle(self, io: SocketIO, peer: str) -> None:
        self._conns.add(io)
        self._counters["connections_total"] += 1
        authed = self.auth_token is None
        try:
            while True:
                if await io.at_eof():
                    return
                first = io.peek(1)
                if first != MAGIC[:1]:  # not a frame: fail now, not after waiting for 32 bytes that may never come
                    if first == b"G":
                        await self._http(io, peer)
                        return
                    if first == b"*":
                        await io.send_all([RESP_REFUSAL])
                        raise ProtocolError("a Redis client (RESP) connected: it was told to use an lm:// URL")
                    raise ProtocolError(f"not an lm:// frame (first byte {first!r})")
                frame = Frame.from_bytes(await io.read_exactly(FRAME_SIZE))
                frame.check_limits(self.max_frame or 0)
                key = (await io.read_exactly(frame.key_len)).decode() if frame.key_len else ""
                if not authed:
                    if frame.op != Op.AUTH:
                        await self._reply(io, frame, Status.UNAUTHORIZED)
                        raise ProtocolError(f"{frame.op.name} before AUTH")
                    if not hmac.compare_digest(key.encode(), (self.auth_token or "").encode()):
                        await self._reply(io, frame, Status.UNAUTHORIZED)
                        raise ProtocolError("wrong auth token")
                    authed = True
                    await self._reply(io, frame, Status.OK)
                    continue
                await self._dispatch(io, frame, key)
        except ProtocolError as exc:
            self._counters["rejected_frames"] += 1
            log.warning("closing connection from %s: %s", peer, exc)
        except UnicodeDecodeError:
            self._counters["rejected_frames"] += 1
            log.warning("closing connection from %s: key is not UTF-8", peer)
        except OSError as exc:  # reset, EOF mid-frame: the client's problem, not the server's
            log.debug("connection from %s ended: %s", peer, exc)
        finally:
            self._conns.discard(io)
            io.close()

    async def _http(self, io: SocketIO, peer: str) -> None:
        """One HTTP request: ``GET /metrics`` gets :meth:`metrics_text`; anything else a 4xx; then close.

        :raises ProtocolError: for a request that is not HTTP, too long, or slower than ``_HTTP_DEADLINE``."""
        with anyio.move_on_after(_HTTP_DEADLINE) as scope:
            try:
                request = (await io.readline(_HTTP_LINE)).decode("latin-1")
                headers: dict[str, str] = {}
                for _ in range(_HTTP_HEADERS + 1):
                    line = (await io.readline(_HTTP_LINE)).decode("latin-1")
                    if not line:
                        break
                    name, sep, value = line.partition(":")
                    if not sep:
                        raise ProtocolError(f"HTTP: malformed header line {line[:60]!r}")
                    headers[name.strip().lower()] = value.strip()
                else:
                    raise ProtocolError(f"HTTP: more than {_HTTP_HEADERS} header lines")
            except ValueError as exc:  # a line without its CRLF within _HTTP_LINE bytes
                raise ProtocolError(f"HTTP: {exc}") from None
        if scope.cancelled_caught:
            raise ProtocolError(f"HTTP: no complete request within {_HTTP_DEADLINE:g} s")
        method, _, rest = request.partition(" ")
        target, _, version = rest.partition(" ")
        if not version.startswith("HTTP/"):
            raise ProtocolError(f"not an lm:// frame nor an HTTP request ({request[:60]!r})")
        path = target.split("?", 1)[0].rstrip("/")
        if self.auth_token is not None and not hmac.compare_digest(
                headers.get("authorization", "").encode(), f"Bearer {self.auth_token}".encode()):
            status, body = "401 Unauthorized", "the server has an auth token: send Authorization: Bearer TOKEN\n"
            log.warning("HTTP %s %s from %s without the auth token", method, path, peer)
        elif method != "GET" or path != "/metrics":
            status, body = "404 Not Found", "this is a kvpipe lm:// server: GET /metrics for its counters\n"
        else:
            self._counters["metrics_requests"] += 1
            status, body = "200 OK", self.metrics_text()
        data = body.encode()
        head = (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        with anyio.move_on_after(_HTTP_DEADLINE):
            await io.send_all([head.encode(), data])

    @staticmethod
    async def _reply(io: SocketIO, req: Frame, status: Status, payload: bytes | memoryview = b"") -> None:
        hdr = encode_frame(req.op, req.request_id, 0, len(payload), status)
        await io.send_all([hdr, payload])

    async def _dispatch(self, io: SocketIO, frame: Frame, key: str) -> None:
        op = frame.op
        c = self._counters
        if op == Op.PUT:
            n = frame.payload_len
            obj = self.pool.allocate((max(n, 1),), torch.uint8, 0) if n <= self.pool.capacity else None
            if obj is None:
                await io.skip(n)
                c["no_space"] += 1
                await self._reply(io, frame, Status.NO_SPACE)
                return
            try:
                await io.read_into(obj.byte_view[:n])
            except BaseException:
                obj.release()
                raise
            obj.num_tokens = n  # the stored length (the region is rounded up)
            self._store(key, obj)
            c["puts"] += 1
            c["put_bytes"] += n
            await self._reply(io, frame, Status.OK)
            return
        payload = await io.read_exactly(frame.payload_len) if frame.payload_len else b""
        if op == Op.GET:
            obj = self._index.get(key)
            if obj is None:
                c["misses"] += 1
                await self._reply(io, frame, Status.NOT_FOUND)
                return
            self._index.move_to_end(key)
            c["hits"] += 1
            obj.ref()
            try:
                c["get_bytes"] += obj.num_tokens
                await self._reply(io, frame, Status.OK, obj.byte_view[: obj.num_tokens])
            finally:
                obj.release()
        elif op == Op.EXISTS:
            await self._reply(io, frame, Status.OK if key in self._index else Status.NOT_FOUND)
        elif op == Op.DELETE:
            await self._reply(io, frame, Status.OK if self._delete(key) else Status.NOT_FOUND)
        elif op == Op.EXISTS_BATCH:
            keys = decode_keys(payload)
            await self._reply(io, frame, Status.OK, bytes(k in self._index for k in keys))
        elif op == Op.DELETE_BATCH:
            keys = decode_keys(payload)
            await self._reply(io, frame, Status.OK, bytes(self._delete(k) for k in keys))
        elif op == Op.LIST:
            pattern = key or "*"
            entries = [(k, o.num_tokens) for k, o in self._index.items() if fnmatch.fnmatchcase(k, pattern)]
            await self._reply(io, frame, Status.OK, encode_entries(entries))
        elif op == Op.STATS:
            await self._reply(io, frame, Status.OK, self.metrics_text().encode())
        elif op in (Op.PING, Op.AUTH):
            await self._reply(io, frame, Status.OK)
        else:  # pragma: no cover - Frame.from_bytes admits only known ops
            raise ProtocolError(f"unexpected op {op}")


async def serve_forever(server: LmServer) -> None:
    """Run ``server`` until SIGINT/SIGTERM, then close every connection and exit cleanly.

    :raises ConfigError: when the address cannot be bound (bound first, outside the task group: a plain error).
    """
    server.bind()
    async with anyio.create_task_group() as tg:
        async def _signals() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as sigs:
                async for sig in sigs:
                    log.info("kvpipe lm server: %s, shutting down", signal.Signals(sig).name)
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(_signals)
        await tg.start(server.serve)


if __name__ == "__main__":  # ``python -m kvpipe.lm.server HOST PORT [cpu] [--max-size GB] [--auth-token T]``
    import sys

    from kvpipe.lm.cli import main

    sys.exit(main())
