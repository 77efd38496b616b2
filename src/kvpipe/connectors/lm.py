"""The ``lm://host:port`` connector: a client of :mod:`kvpipe.lm.server` over :mod:`kvpipe.lm.protocol`.

An entry travels as one ``PUT``/``GET`` payload: the 80-byte entry header followed by the serde payload. Reads
take the header first, ask the tier where the rest goes (``read_into``), then ``recv_into`` straight into that
pool memory. Batches are pipelined on one connection; ``max_connections`` bounds concurrency.

URL: ``lm://[:TOKEN@]host:port[?auth_token=TOKEN&max_connections=N]``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import unquote

import anyio
import attrs

from kvpipe.connectors.base import Entry, GetResult, ReadInto, aiter_of
from kvpipe.connectors.sockio import ConnectionPool, SocketIO, connect_tcp
from kvpipe.connectors.urlopts import check_options, host_port, number_opt, split_url
from kvpipe.errors import ProtocolError, TierError, TierUnavailable
from kvpipe.lm.protocol import (
    FRAME_SIZE,
    RESP_REFUSAL,
    Frame,
    Op,
    Status,
    decode_entries,
    encode_frame,
    encode_keys,
    parse_metrics,
)
from kvpipe.serde.entry import HEADER_SIZE, payload_digest

__all__ = ["LmConnector"]

log = logging.getLogger(__name__)

_EMPTY = memoryview(b"")
# A PING unanswered this long makes the client look at what listens there: a Redis server (a redis:// address given
# as lm://) never answers a frame, so the tier would only see its deadline pass. One Redis PING on a new connection
# tells, in a round trip.
_PROBE_AFTER = 1.0
_RESP_PING = b"*1\r\n$4\r\nPING\r\n"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@attrs.define(eq=False)
class LmConnector:
    """Byte store over an ``lm://`` server (see :class:`~kvpipe.connectors.base.Connector`)."""

    url: str
    host: str
    port: int
    auth_token: str | None = None
    max_connections: int = 8
    _pool: ConnectionPool = attrs.field(init=False)
    _ids: itertools.count[int] = attrs.field(init=False, factory=itertools.count)

    def __attrs_post_init__(self) -> None:
        self._pool = ConnectionPool(self._connect, max_connections=self.max_connections)

    @classmethod
    def from_url(cls, url: str) -> LmConnector:
        """Parse ``lm://[:TOKEN@]host:port[?auth_token=..&max_connections=..]``.

        :raises ConfigError: for a malformed URL.
        """
        parts, q = split_url(url, "lm")
        check_options(q, url, ("auth_token", "max_connections"))
        host, port = host_port(parts, url, "lm://host:port")
        token = q.get("auth_token") or (unquote(parts.password) if parts.password else None)
        maxc = int(number_opt(q, "max_connections", url, 8))
        return cls(url=url, host=host, port=port, auth_token=token, max_connections=max(1, maxc))

    async def _connect(self) -> SocketIO:
        io = await connect_tcp(self.host, self.port)
        try:
            if self.auth_token is not None:
                tok = self.auth_token.encode()
                await io.send_all([encode_frame(Op.AUTH, next(self._ids), len(tok)), tok])
                reply = await self._read_frame(io)
                if reply.status != Status.OK:
                    raise TierUnavailable(f"{self._safe_url}: authentication rejected ({reply.status.name})")
        except BaseException:
            io.close()
            raise
        return io

    @property
    def _safe_url(self) -> str:
        return f"lm://{_hostport(self.host, self.port)}"

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[SocketIO]:
        try:
            async with self._pool.acquire() as io:
                yield io
        except OSError as exc:
            raise TierUnavailable(f"{self._safe_url}: {exc}") from exc
        except ProtocolError as exc:
            raise TierUnavailable(f"{self._safe_url}: protocol error: {exc}") from exc

    @staticmethod
    async def _read_frame(io: SocketIO) -> Frame:
        f = Frame.from_bytes(await io.read_exactly(FRAME_SIZE))
        f.check_limits(1 << 62, reply=True)  # a GET's entry lands in pool memory (or is skipped): no bound of ours
        return f

    async def _simple(self, op: Op, key: str = "", payload: bytes = b"") -> tuple[Frame, bytes]:
        kb = key.encode()
        async with self._conn() as io:
            await io.send_all([encode_frame(op, next(self._ids), len(kb), len(payload)), kb, payload])
            f = await self._read_frame(io)
            body = await io.read_exactly(f.payload_len) if f.payload_len else b""
        if f.status in (Status.UNAUTHORIZED,):
            raise TierUnavailable(f"{self._safe_url}: {op.name} refused: {f.status.name}")
        return f, body

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each entry is stored."""
        if not keys:
            return []
        f, body = await self._simple(Op.EXISTS_BATCH, payload=encode_keys(keys))
        if f.status != Status.OK or len(body) != len(keys):
            raise TierError(f"{self._safe_url}: EXISTS_BATCH failed ({f.status.name})")
        return [b == 1 for b in body]

    async def get_many(self, keys: Sequence[str], read_into: ReadInto) -> list[GetResult | None]:
        """Pipelined ``GET``s; each payload lands in the buffer ``read_into(header)`` returns.

        An entry whose header ``read_into`` refuses comes back as ``(header, empty view)`` so the tier can tell a
        corrupt or foreign header from a missing entry.
        """
        if not keys:
            return []
        out: list[GetResult | None] = []
        async with self._conn() as io:
            bufs: list[bytes] = []
            ids = []
            for k in keys:
                kb = k.encode()
                rid = next(self._ids)
                ids.append(rid)
                bufs += [encode_frame(Op.GET, rid, len(kb)), kb]
            await io.send_all(bufs)
            for rid in ids:
                f = await self._read_frame(io)
                if f.request_id != rid:
                    raise ProtocolError(f"reply for request {f.request_id}, expected {rid}")
                n = f.payload_len
                if f.status != Status.OK:
                    await io.skip(n)
                    out.append(None)
                    continue
                if n < HEADER_SIZE:
                    out.append((await io.read_exactly(n), _EMPTY))
                    continue
                hb = await io.read_exactly(HEADER_SIZE)
                rest = n - HEADER_SIZE
                buf = read_into(hb, keys[len(out)])
                if buf is None or rest > len(buf):
                    await io.skip(rest)
                    out.append((hb, _EMPTY))
                    continue
                view = buf[:rest]
                digest = payload_digest()
                await io.read_into(view, digest)
                out.append((hb, view, digest.intdigest()))
        return out

    async def put_many(self, items: Sequence[Entry]) -> int:
        """Pipelined ``PUT``s (header, key, entry header and payload sent as separate buffers); returns the number
        the server stored (a full server answers ``NO_SPACE``)."""
        return await self.put_stream(aiter_of(items)) if items else 0

    async def put_stream(self, items: AsyncIterator[Entry]) -> int:
        """:meth:`put_many` for entries made one at a time: each ``PUT`` goes out as soon as its entry comes (the
        tier hashes the next chunk while the server takes in this one); the replies are read at the end."""
        item = await anext(items, None)
        if item is None:
            return 0
        stored = 0
        async with self._conn() as io:
            ids = []
            while item is not None:
                key, header, payload = item
                kb = key.encode()
                rid = next(self._ids)
                ids.append(rid)
                await io.send_all([encode_frame(Op.PUT, rid, len(kb), len(header) + len(payload)), kb, header,
                                   payload])
                item = await anext(items, None)
            for rid in ids:
                f = await self._read_frame(io)
                if f.request_id != rid:
                    raise ProtocolError(f"reply for request {f.request_id}, expected {rid}")
                await io.skip(f.payload_len)
                stored += f.status == Status.OK
        return stored

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete entries; returns how many existed."""
        if not keys:
            return 0
        f, body = await self._simple(Op.DELETE_BATCH, payload=encode_keys(keys))
        if f.status != Status.OK:
            raise TierError(f"{self._safe_url}: DELETE_BATCH failed ({f.status.name})")
        return sum(body)

    async def list_entries(self, pattern: str) -> list[tuple[str, int]]:
        """``(key, stored bytes)`` for entries matching the glob ``pattern``."""
        f, body = await self._simple(Op.LIST, key=pattern)
        if f.status != Status.OK:
            raise TierError(f"{self._safe_url}: LIST failed ({f.status.name})")
        return decode_entries(body)

    async def list_keys(self, pattern: str) -> list[str]:
        """Entry keys matching the glob ``pattern``."""
        return [k for k, _ in await self.list_entries(pattern)]

    async def stats(self) -> dict[str, float]:
        """The server's counters (``STATS``)."""
        _, body = await self._simple(Op.STATS)
        return parse_metrics(body.decode())

    async def server_info(self) -> dict[str, Any]:
        """The server's size and eviction counters from ``STATS``: ``entries``, ``used_memory``, ``maxmemory``
        (its ``--max-size``), ``evicted_keys``."""
        st = await self.stats()
        return {"entries": int(st.get("kvpipe_server_entries", 0)),
                "used_memory": int(st.get("kvpipe_server_bytes_used", 0)),
                "maxmemory": int(st.get("kvpipe_server_capacity_bytes", 0)),
                "evicted_keys": int(st.get("kvpipe_server_evictions", 0))}

    async def ping(self) -> None:
        """:raises TierUnavailable: when the server cannot be reached, or a Redis server answers there."""
        with anyio.move_on_after(_PROBE_AFTER):
            await self._ping()
            return
        await self._refuse_resp_server()
        await self._ping()  # a slow lm:// server, or nothing that answers: the caller's deadline decides

    async def _ping(self) -> None:
        f, _ = await self._simple(Op.PING)
        if f.status != Status.OK:
            raise TierUnavailable(f"{self._safe_url}: PING answered {f.status.name}")

    async def _refuse_resp_server(self) -> None:
        """:raises TierUnavailable: when the server answers a Redis ``PING`` in Redis's protocol (RESP)."""
        line = b""
        with anyio.move_on_after(_PROBE_AFTER):
            try:
                io = await connect_tcp(self.host, self.port)
            except OSError:
                return
            try:
                await io.send_all([_RESP_PING])
                line = await io.readline(limit=1024)
            except (OSError, ValueError):
                return
            finally:
                io.close()
        if line[:1] in (b"+", b"-") and not RESP_REFUSAL.startswith(line):
            raise TierUnavailable(f"{self._safe_url}: a Redis server answers there (PING: {line[:40]!r}), not an "
                                  f"lm:// server: use redis://{_hostport(self.host, self.port)}")

    def reset(self) -> None:
        """Drop pooled connections (the tier calls this when it marks the remote down)."""
        self._pool.reset()

    async def aclose(self) -> None:
        """Close every connection; idempotent."""
        self._pool.close()
