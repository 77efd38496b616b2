"""Redis-protocol connectors: ``redis://``, ``rediss://``, ``unix://``, ``valkey://``, ``valkeys://``,
``redis-sentinel://`` and ``redis-cluster://``.

Layout (LMCache's, so ``redis-cli`` habits carry over): an entry under key ``K`` is two strings, ``Kkv_bytes`` (the
serde payload) and ``Kmetadata`` (the 80-byte entry header).

Visibility: on one server (plain, Sentinel) both parts are written in one ``MULTI``/``EXEC``, so a reader sees
both or neither. In a cluster the two keys may live on different nodes: ``kv_bytes`` is written first and
``metadata`` only after it was acknowledged (deletes go the other way), and readers need a valid header whose
checksum matches the payload, so a half-written entry is a miss, never wrong KV. An entry with only one part
(evicted by ``maxmemory``, expired, ``DEL`` by hand, or a cluster writer caught mid-way) is a miss and is
cleaned up.

Speed: values go through :mod:`kvpipe.connectors.resp` (no copy on send, ``recv_into`` pool memory on receive),
batches are pipelined on one connection per node, and ``max_connections`` per node bounds concurrency (callers
wait for a connection rather than failing).
"""

from __future__ import annotations

import logging
import ssl
import sys
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import anyio
import attrs
from redis.crc import key_slot

from kvpipe.connectors.base import GetResult, ReadInto
from kvpipe.connectors.resp import RespError, encode_command, read_bulk_into, read_reply
from kvpipe.connectors.sockio import Buffer, ConnectionPool, SocketIO, connect_tcp, connect_unix
from kvpipe.errors import ConfigError, ProtocolError, TierError, TierUnavailable
from kvpipe.serde.entry import payload_digest

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

__all__ = ["KV_SUFFIX", "META_SUFFIX", "RedisConnector"]

log = logging.getLogger(__name__)

KV_SUFFIX = "kv_bytes"
META_SUFFIX = "metadata"
_EMPTY = memoryview(b"")
# Error replies that mean "this node cannot serve now" (failover, loading, cluster reconfiguring).
_UNAVAILABLE = {"READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS", "BUSY"}
_SCHEMES = {"redis": "single", "rediss": "single", "valkey": "single", "valkeys": "single", "unix": "single",
            "redis-sentinel": "sentinel", "redis-cluster": "cluster", "valkey-cluster": "cluster",
            "valkey-sentinel": "sentinel"}
T = TypeVar("T")


@attrs.frozen
class _Addr:
    host: str = ""
    port: int = 0
    path: str = ""  # unix socket

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{self.host}:{self.port}"


def _parse_hosts(hostlist: str, default_port: int, url: str) -> list[_Addr]:
    out = []
    for item in hostlist.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):  # [v6]:port
            host, _, rest = item[1:].partition("]")
            port_s = rest.lstrip(":")
        else:
            host, _, port_s = item.rpartition(":") if ":" in item else (item, "", "")
        try:
            port = int(port_s) if port_s else default_port
        except ValueError:
            raise ConfigError(f"remote_url={url!r}: bad port in {item!r}") from None
        if not host or not 0 < port < 65536:
            raise ConfigError(f"remote_url={url!r}: bad host:port {item!r}")
        out.append(_Addr(host, port))
    if not out:
        raise ConfigError(f"remote_url={url!r}: expected at least one host:port")
    return out


def _check(reply: Any, what: str) -> Any:
    """Raise for an error reply: unavailable-kind errors as :class:`TierUnavailable`, others as TierError."""
    if isinstance(reply, RespError):
        if reply.kind in _UNAVAILABLE:
            raise TierUnavailable(f"{what}: {reply.message}")
        raise TierError(f"{what}: {reply.message}")
    return reply


async def _gather(fns: Sequence[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run ``fns`` concurrently; re-raise the first failure unwrapped (not as an ExceptionGroup)."""
    if len(fns) == 1:
        await fns[0]()
        return
    try:
        async with anyio.create_task_group() as tg:
            for fn in fns:
                tg.start_soon(fn)
    except BaseExceptionGroup as eg:
        for exc in _leaves(eg):
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                raise exc from eg
        raise


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for e in eg.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out


@attrs.define(eq=False)
class _Node:
    addr: _Addr
    pool: ConnectionPool


@attrs.define(eq=False)
class RedisConnector:
    """Byte store over Redis/Valkey: one server, a Sentinel-managed master, or a cluster.

    Build with :meth:`from_url`; connections are made lazily, so building never does I/O.
    """

    url: str
    mode: str  # "single" | "sentinel" | "cluster"
    addrs: list[_Addr]
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0
    ssl_context: ssl.SSLContext | None = None
    master_name: str = "mymaster"
    sentinel_password: str | None = attrs.field(default=None, repr=False)
    max_connections: int = 8
    _nodes: dict[_Addr, _Node] = attrs.field(init=False, factory=dict)
    _master: _Addr | None = attrs.field(init=False, default=None)
    _slots: list[_Addr] | None = attrs.field(init=False, default=None)
    _closed: bool = attrs.field(init=False, default=False)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, *, master_name: str | None = None, max_connections: int | None = None
                 ) -> RedisConnector:
        """Parse a Redis-family URL (``master_name`` is the Sentinel master when the URL names none).

        ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS; ``?ssl_cert_reqs=none``,
        ``?ssl_ca_certs=PATH``), ``valkey://``/``valkeys://`` (aliases), ``unix:///path.sock[?db=N&password=P]``,
        ``redis-sentinel://[:password@]h1:p1,h2:p2[/master_name][?master_name=..&sentinel_password=..&db=N]``,
        ``redis-cluster://[:password@]h1:p1,h2:p2``. Every form accepts ``?max_connections=N`` (per node).

        :raises ConfigError: for a malformed URL or an unknown scheme.
        """
        scheme, sep, _ = url.partition("://")
        mode = _SCHEMES.get(scheme.lower())
        if not sep or mode is None:
            raise ConfigError(f"remote_url={url!r}: expected one of " + ", ".join(f"{s}://" for s in _SCHEMES))
        parts = urlsplit(url)
        q = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        netloc = parts.netloc
        userinfo, at, hostlist = netloc.rpartition("@")
        username = password = None
        if at:
            user, _, pw = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(pw) if pw else None
        password = q.get("password", password)
        path = parts.path.strip("/")
        db = 0
        name = q.get("master_name") or q.get("service_name") or master_name or "mymaster"
        if scheme == "unix":
            sock_path = parts.path
            if not sock_path:
                raise ConfigError(f"remote_url={url!r}: expected unix:///path/to/redis.sock")
            addrs = [_Addr(path=sock_path)]
            path = ""
        elif mode == "sentinel":
            addrs = _parse_hosts(hostlist, 26379, url)
            if path:
                name = path
                path = ""
        else:
            addrs = _parse_hosts(hostlist, 6379, url)
            if mode == "single" and len(addrs) != 1:
                raise ConfigError(f"remote_url={url!r}: {scheme}:// takes one host; use redis-sentinel:// or "
                                  "redis-cluster:// for several")
        db_s = q.get("db", path or "0")
        try:
            db = int(db_s)
        except ValueError:
            raise ConfigError(f"remote_url={url!r}: database must be an integer, got {db_s!r}") from None
        if mode == "cluster" and db:
            raise ConfigError(f"remote_url={url!r}: Redis Cluster has only database 0")
        try:
            maxc = max_connections or int(q.get("max_connections", "8"))
        except ValueError:
            raise ConfigError(f"remote_url={url!r}: max_connections must be an integer") from None
        ctx = None
        if scheme in ("rediss", "valkeys") or q.get("ssl", "").lower() in ("1", "true", "yes"):
            ctx = ssl.create_default_context(cafile=q.get("ssl_ca_certs"))
            if q.get("ssl_cert_reqs", "").lower() in ("none", "cert_none"):
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        return cls(url=url, mode=mode, addrs=addrs, username=username, password=password, db=db, ssl_context=ctx,
                   master_name=name, sentinel_password=q.get("sentinel_password"), max_connections=max(1, maxc))

    @property
    def _safe_url(self) -> str:
        return self.url.split("://")[0] + "://" + ",".join(map(str, self.addrs))

    # -- connections --------------------------------------------------------------------------------------------
    async def _open(self, addr: _Addr) -> SocketIO:
        if addr.path:
            return await connect_unix(addr.path)
        return await connect_tcp(addr.host, addr.port, ssl_context=self.ssl_context)

    async def _setup(self, io: SocketIO) -> None:
        cmds: list[Buffer] = []
        n = 0
        if self.password is not None:
            cmds += encode_command("AUTH", *( [self.username] if self.username else []), self.password)
            n += 1
        if self.db:
            cmds += encode_command("SELECT", self.db)
            n += 1
        if self.mode == "sentinel":  # a demoted master (or a stale address) must not take writes
            cmds += encode_command("ROLE")
            n += 1
        if not n:
            return
        await io.send_all(cmds)
        for _ in range(n):
            reply = _check(await read_reply(io), f"{self._safe_url} connection setup")
        if self.mode == "sentinel" and not (isinstance(reply, list) and reply and reply[0] == b"master"):
            self._master = None
            raise TierUnavailable(f"{self._safe_url}: node is not the master of {self.master_name!r} (failover?)")

    def _node(self, addr: _Addr) -> _Node:
        node = self._nodes.get(addr)
        if node is None:
            if self._closed:
                raise TierUnavailable(f"{self._safe_url}: connector closed")
            pool = ConnectionPool(lambda: self._open(addr), max_connections=self.max_connections,
                                  on_connect=self._setup)
            node = self._nodes[addr] = _Node(addr, pool)
        return node

    @asynccontextmanager
    async def _conn(self, node: _Node) -> AsyncIterator[SocketIO]:
        try:
            async with node.pool.acquire() as io:
                yield io
        except (OSError, ProtocolError) as exc:
            self._forget(node)
            raise TierUnavailable(f"{self._safe_url} ({node.addr}): {exc}") from exc
        except TierUnavailable:
            self._forget(node)
            raise

    def _forget(self, node: _Node) -> None:
        """After a failure: drop the node's idle connections, and the master address / slot map that led to it."""
        node.pool.reset()
        if self.mode == "sentinel":
            self._master = None
        elif self.mode == "cluster":
            self._slots = None

    async def _sentinel_master(self) -> _Addr:
        if self._master is not None:
            return self._master
        errors = []
        for s in self.addrs:
            try:
                io = await self._open(s)
            except OSError as exc:
                errors.append(f"{s}: {exc}")
                continue
            try:
                cmds: list[Buffer] = []
                if self.sentinel_password:
                    cmds += encode_command("AUTH", self.sentinel_password)
                cmds += encode_command("SENTINEL", "get-master-addr-by-name", self.master_name)
                await io.send_all(cmds)
                if self.sentinel_password:
                    _check(await read_reply(io), f"sentinel {s} AUTH")
                reply = await read_reply(io)
            except (OSError, ProtocolError, TierError) as exc:
                errors.append(f"{s}: {exc}")
                continue
            finally:
                io.close()
            if isinstance(reply, list) and len(reply) == 2 and all(isinstance(x, bytes) for x in reply):
                self._master = _Addr(reply[0].decode(), int(reply[1]))  # type: ignore[union-attr,arg-type]
                log.debug("sentinel %s: master %r is %s", s, self.master_name, self._master)
                return self._master
            errors.append(f"{s}: no master named {self.master_name!r} ({reply!r})")
        raise TierUnavailable(f"{self._safe_url}: no sentinel knows master {self.master_name!r}: "
                              + "; ".join(errors))

    async def _cluster_slots(self) -> list[_Addr]:
        if self._slots is not None:
            return self._slots
        errors = []
        for seed in list(self.addrs) + [a for a in self._nodes if a not in self.addrs]:
            try:
                async with self._conn(self._node(seed)) as io:
                    await io.send_all(encode_command("CLUSTER", "SLOTS"))
                    reply = _check(await read_reply(io), "CLUSTER SLOTS")
            except TierError as exc:
                errors.append(str(exc))
                continue
            slots: list[_Addr | None] = [None] * 16384
            for rng in reply:
                start, end, master = rng[0], rng[1], rng[2]
                host = master[0].decode() if master[0] else seed.host
                addr = _Addr(host, int(master[1]))
                for i in range(start, end + 1):
                    slots[i] = addr
            if any(a is None for a in slots):
                errors.append(f"{seed}: not every slot is served")
                continue
            self._slots = slots  # type: ignore[assignment]
            return self._slots  # type: ignore[return-value]
        raise TierUnavailable(f"{self._safe_url}: cannot read the cluster slot map: " + "; ".join(errors))

    async def _route(self, key: str) -> _Node:
        if self.mode == "single":
            return self._node(self.addrs[0])
        if self.mode == "sentinel":
            return self._node(await self._sentinel_master())
        slots = await self._cluster_slots()
        return self._node(slots[key_slot(key.encode())])

    async def _masters(self) -> list[_Node]:
        if self.mode == "cluster":
            return [self._node(a) for a in dict.fromkeys(await self._cluster_slots())]
        return [await self._route("")]

    async def _run_routed(self, cmds: Sequence[tuple[str, list[Buffer]]]) -> list[Any]:
        """Send each command to the node serving its routing key (pipelined per node, nodes concurrently);
        replies in command order, error replies as :class:`RespError`."""
        groups: dict[_Node, list[int]] = defaultdict(list)
        for i, (rkey, _) in enumerate(cmds):
            groups[await self._route(rkey)].append(i)
        replies: list[Any] = [None] * len(cmds)

        def runner(node: _Node, idxs: list[int]) -> Callable[[], Coroutine[Any, Any, None]]:
            async def run() -> None:
                async with self._conn(node) as io:
                    bufs: list[Buffer] = []
                    for i in idxs:
                        bufs += cmds[i][1]
                    await io.send_all(bufs)
                    for i in idxs:
                        replies[i] = await read_reply(io)
            return run

        await _gather([runner(n, idxs) for n, idxs in groups.items()])
        for r in replies:
            if isinstance(r, RespError) and r.kind in ("MOVED", "ASK"):
                self._slots = None  # the next call reads the new slot map
            elif isinstance(r, RespError) and r.kind in _UNAVAILABLE:
                if self.mode == "sentinel":
                    self._master = None
                raise TierUnavailable(f"{self._safe_url}: {r.message}")
        return replies

    # -- the Connector API --------------------------------------------------------------------------------------
    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether both parts of each entry are stored."""
        if not keys:
            return []
        if self.mode == "cluster":
            cmds = [(k + sfx, encode_command("EXISTS", k + sfx)) for k in keys for sfx in (META_SUFFIX, KV_SUFFIX)]
            r = await self._run_routed(cmds)
            return [r[2 * i] == 1 and r[2 * i + 1] == 1 for i in range(len(keys))]
        r = await self._run_routed([(k, encode_command("EXISTS", k + META_SUFFIX, k + KV_SUFFIX)) for k in keys])
        return [x == 2 for x in r]

    async def get_many(self, keys: Sequence[str], read_into: ReadInto) -> list[GetResult | None]:
        """Each entry's header and payload, the payload received into ``read_into(header)``'s buffer.

        An entry whose header ``read_into`` refuses comes back as ``(header, empty view)``, so the tier can tell a
        corrupt or foreign header from a missing entry; an entry with one part only is a miss and is deleted.
        """
        if not keys:
            return []
        out: list[GetResult | None] = [None] * len(keys)
        orphans: list[str] = []
        if self.mode == "cluster":
            # The parts may live on different nodes: headers first, then payloads of the entries that have one.
            metas = await self._run_routed([(k + META_SUFFIX, encode_command("GET", k + META_SUFFIX))
                                            for k in keys])
            todo = [i for i, m in enumerate(metas) if isinstance(m, bytes)]
            no_payload = await self._get_payloads(keys, todo, metas, read_into, out)
            orphans += [keys[i] for i in no_payload]  # a header without payload
            missing_meta = [k for k, m in zip(keys, metas, strict=True) if m is None]
            if missing_meta:  # a payload without header? (EXISTS is cheap; the payload is not read)
                ex = await self._run_routed([(k + KV_SUFFIX, encode_command("EXISTS", k + KV_SUFFIX))
                                             for k in missing_meta])
                orphans += [k for k, e in zip(missing_meta, ex, strict=True) if e == 1]
        else:
            await self._get_pipelined(keys, read_into, out, orphans)
        if orphans:
            log.debug("%s: cleaning %d half-present entries", self._safe_url, len(orphans))
            try:
                await self.delete_many(orphans)
            except TierError as exc:
                log.debug("orphan cleanup failed: %s", exc)
        return out

    async def _get_pipelined(self, keys: Sequence[str], read_into: ReadInto,
                             out: list[GetResult | None], orphans: list[str]) -> None:
        node = await self._route(keys[0])
        bufs: list[Buffer] = []
        for k in keys:
            bufs += encode_command("GET", k + META_SUFFIX)
            bufs += encode_command("GET", k + KV_SUFFIX)
        async with self._conn(node) as io:
            await io.send_all(bufs)
            for i, k in enumerate(keys):
                meta = _check(await read_reply(io), f"GET {k}{META_SUFFIX}")

                def target(_n: int, meta: Any = meta, k: str = k) -> memoryview | None:
                    return read_into(meta, k) if isinstance(meta, bytes) else None

                digest = payload_digest()
                res = _check(await read_bulk_into(io, target, digest), f"GET {k}{KV_SUFFIX}")
                n, view = res
                if meta is None and n < 0:
                    continue
                if meta is None or n < 0:
                    orphans.append(k)
                    continue
                out[i] = (meta, view, digest.intdigest()) if view is not None else (meta, _EMPTY)

    async def _get_payloads(self, keys: Sequence[str], todo: list[int], metas: list[Any], read_into: ReadInto,
                            out: list[GetResult | None]) -> list[int]:
        """Read the payloads of entries ``todo`` (whose headers are ``metas``); returns those with no payload."""
        no_payload: list[int] = []
        groups: dict[_Node, list[int]] = defaultdict(list)
        for i in todo:
            groups[await self._route(keys[i] + KV_SUFFIX)].append(i)

        def runner(node: _Node, idxs: list[int]) -> Callable[[], Coroutine[Any, Any, None]]:
            async def run() -> None:
                async with self._conn(node) as io:
                    bufs: list[Buffer] = []
                    for i in idxs:
                        bufs += encode_command("GET", keys[i] + KV_SUFFIX)
                    await io.send_all(bufs)
                    for i in idxs:
                        meta = metas[i]

                        def target(_n: int, meta: bytes = meta, k: str = keys[i]) -> memoryview | None:
                            return read_into(meta, k)

                        digest = payload_digest()
                        res = await read_bulk_into(io, target, digest)
                        if isinstance(res, RespError):
                            if res.kind in ("MOVED", "ASK"):
                                self._slots = None
                                continue
                            _check(res, f"GET {keys[i]}{KV_SUFFIX}")
                        n, view = res  # type: ignore[misc]
                        if n >= 0:
                            out[i] = (meta, view, digest.intdigest()) if view is not None else (meta, _EMPTY)
                        else:
                            no_payload.append(i)
            return run

        await _gather([runner(n, idxs) for n, idxs in groups.items()])
        return no_payload

    async def put_many(self, items: Sequence[tuple[str, bytes, memoryview]]) -> int:
        """Store entries so that a reader never sees half of one; returns how many were stored (a server out of
        memory under ``noeviction`` stores fewer)."""
        if not items:
            return 0
        if self.mode == "cluster":
            first = await self._run_routed([(k + KV_SUFFIX, encode_command("SET", k + KV_SUFFIX, payload))
                                            for k, _h, payload in items])
            ok = [it for it, r in zip(items, first, strict=True) if r == b"OK"]
            if not ok:
                return 0
            second = await self._run_routed([(k + META_SUFFIX, encode_command("SET", k + META_SUFFIX, header))
                                             for k, header, _p in ok])
            return sum(r == b"OK" for r in second)
        node = await self._route(items[0][0])
        bufs: list[Buffer] = []
        for k, header, payload in items:
            bufs += encode_command("MULTI")
            bufs += encode_command("SET", k + KV_SUFFIX, payload)
            bufs += encode_command("SET", k + META_SUFFIX, header)
            bufs += encode_command("EXEC")
        stored = 0
        async with self._conn(node) as io:
            await io.send_all(bufs)
            for k, _h, _p in items:
                replies = [await read_reply(io) for _ in range(4)]
                ex = replies[3]
                if isinstance(ex, list) and all(r == b"OK" for r in ex):
                    stored += 1
                    continue
                errs = [r for r in replies if isinstance(r, RespError)]
                for e in errs:
                    if e.kind in _UNAVAILABLE:
                        if self.mode == "sentinel":
                            self._master = None
                        raise TierUnavailable(f"{self._safe_url}: SET {k}: {e.message}")
                log.debug("SET %s not stored: %s", k, errs or ex)
        return stored

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete entries (header first, so a reader never takes a payload for whole); returns how many
        existed."""
        if not keys:
            return 0
        if self.mode == "cluster":
            first = await self._run_routed([(k + META_SUFFIX, encode_command("DEL", k + META_SUFFIX)) for k in keys])
            second = await self._run_routed([(k + KV_SUFFIX, encode_command("DEL", k + KV_SUFFIX)) for k in keys])
            return sum(1 for a, b in zip(first, second, strict=True) if a == 1 or b == 1)
        r = await self._run_routed([(k, encode_command("DEL", k + META_SUFFIX, k + KV_SUFFIX)) for k in keys])
        return sum(1 for x in r if isinstance(x, int) and x > 0)

    async def _scan(self, pattern: str) -> list[str]:
        found: list[str] = []
        for node in await self._masters():
            cursor = b"0"
            async with self._conn(node) as io:
                while True:
                    await io.send_all(encode_command("SCAN", cursor, "MATCH", pattern + META_SUFFIX,
                                                     "COUNT", 1000))
                    reply = _check(await read_reply(io), "SCAN")
                    cursor, batch = reply[0], reply[1]
                    found += [b.decode(errors="replace")[: -len(META_SUFFIX)] for b in batch]
                    if cursor == b"0":
                        break
        return sorted(set(found))

    async def list_keys(self, pattern: str) -> list[str]:
        """Entry keys whose string matches the glob ``pattern`` (``SCAN`` over every master)."""
        return await self._scan(pattern)

    async def list_entries(self, pattern: str) -> list[tuple[str, int]]:
        """``(key, stored bytes of both parts)`` for entries matching ``pattern``."""
        keys = await self._scan(pattern)
        if not keys:
            return []
        cmds = [(k + sfx, encode_command("STRLEN", k + sfx)) for k in keys for sfx in (KV_SUFFIX, META_SUFFIX)]
        r = await self._run_routed(cmds)
        return [(k, int(r[2 * i]) + int(r[2 * i + 1])) for i, k in enumerate(keys)
                if isinstance(r[2 * i], int) and isinstance(r[2 * i + 1], int)]

    async def ping(self) -> None:
        """PING every master (rediscovering the Sentinel master / cluster slots first).

        :raises TierUnavailable: when one cannot be reached or is not ready.
        """
        for node in await self._masters():
            async with self._conn(node) as io:
                await io.send_all(encode_command("PING"))
                _check(await read_reply(io), f"PING {node.addr}")

    def reset(self) -> None:
        """Forget connections, master address and slot map (the tier calls this when it marks the remote down)."""
        for node in self._nodes.values():
            node.pool.reset()
        self._master = None
        self._slots = None

    async def aclose(self) -> None:
        """Close every connection; idempotent."""
        self._closed = True
        for node in self._nodes.values():
            node.pool.close()
        self._nodes.clear()

