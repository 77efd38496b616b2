"""Redis-protocol connectors: ``redis://``, ``rediss://``, ``unix://``, ``valkey://``, ``valkeys://``,
``redis-sentinel://`` and ``redis-cluster://``.

Layout (LMCache's, so ``redis-cli`` habits carry over): an entry under key ``K`` is two strings, ``Kkv_bytes`` (the
serde payload) and ``Kmetadata`` (the 80-byte entry header).

Visibility: on one server (plain, Sentinel) both parts are written in one ``MULTI``/``EXEC``, so a reader sees
both or neither. In a cluster the two keys may live on different nodes: ``kv_bytes`` is written first, with a
time to live (``SET ... PX``), then ``metadata``, then ``PERSIST kv_bytes`` (deletes go the other way), and
readers need a valid header whose checksum matches the payload, so a half-written entry is a miss, never wrong
KV. An entry with only one part (evicted by ``maxmemory``, expired, ``DEL`` by hand) is a miss and is cleaned
up, except a payload that still has its time to live and no header: a write in progress (deleting it lost
0.5% of the entries written while other engines read them), or one whose writer died, which Redis drops when
the time runs out.

Speed: values go through :mod:`kvpipe.connectors.resp` (no copy on send, ``recv_into`` pool memory on receive),
batches are pipelined on one connection per node, and ``max_connections`` per node bounds concurrency (callers
wait for a connection rather than failing).

TLS (``rediss://``, ``valkeys://``, or ``?ssl=true`` on any scheme), with redis-py's option names:
``ssl_ca_certs=PATH`` (CA bundle, PEM; default: the system's), ``ssl_cert_reqs=required|optional|none``
(``none``: no certificate check at all, for self-signed test servers), ``ssl_check_hostname=true|false``
(default true: the certificate must name the host of the URL, an IP SAN for ``127.0.0.1``). A certificate that
is not trusted or names another host fails the connection like a refused one (the tier is marked down, calls
are misses) with the TLS verification message in the log.

Sentinel reads from replicas (``redis-sentinel://...?read_from_replicas=true``, redis-py's name for it; default
false): ``GET``/``EXISTS`` go round-robin to the replicas ``SENTINEL replicas <name>`` lists as healthy (not
``s_down``/``o_down``/``disconnected``; the list is refreshed every few seconds); writes, deletes, ``SCAN`` and
``PING`` always go to the master. An error from a replica (refused, reset, ``LOADING``, ``MASTERDOWN``) sends
that read to the master instead and leaves the replica out for 5 s, doubling for each failure in a row up to
60 s (so does a replica that lets the tier's deadline pass, that call being a miss); with no usable replica,
reads go to the master. A lagging replica (or one cut off from its master, which keeps answering reads from what
it has) answers a miss for an entry it has not received; what it returns is validated like any entry (header,
key fingerprint, checksum), and entries are content-addressed, so an old copy is still the right KV. Orphans
and corrupt entries found on a replica are deleted on the master.

Cluster masters fail one at a time (see :mod:`kvpipe.connectors.redis_cluster`): a master that cannot be reached
costs only its own slots while the others keep serving; halves of entries whose other half is on a master left out
are not taken for orphans; only when no master answers is the remote down for the tier.

Cluster reads from replicas (``redis-cluster://...?read_from_replicas=true``): ``GET``/``EXISTS`` of a key go to
a replica of its slot (round robin; the connection sends ``READONLY``), from the replicas ``CLUSTER SLOTS`` lists,
re-read every few seconds. A replica that fails is left out as above and the call is done again on the masters
(for the entries no buffer was handed out for yet). An entry's two keys live in different slots, replicated
separately, so half an entry seen on replicas may be a lag: it is a miss, and it is deleted only when the masters
hold half of it too (``EXISTS`` of the header and ``PTTL`` of the payload there).
"""

from __future__ import annotations

import logging
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager, nullcontext
from typing import Any, TypeVar, cast

import anyio
import attrs
from redis.crc import key_slot

from kvpipe.connectors.base import Entry, GetResult, ReadInto, aiter_of, call_deadline
from kvpipe.connectors.redis_cluster import NODE_SHARE, ClusterMap, parse_cluster_slots
from kvpipe.connectors.redis_nodes import NODE_DOWN, Node, NodeTimedOut, NodeUnreachable, gather, send_next
from kvpipe.connectors.redis_replicas import ReplicaChooser
from kvpipe.connectors.redis_sentinel import REPLICA_REFRESH_S, SentinelView
from kvpipe.connectors.redis_url import Addr, parse_redis_url
from kvpipe.connectors.resp import UNAVAILABLE_KINDS, RespError, check_reply, encode_command, read_bulk_into, read_reply
from kvpipe.connectors.sockio import Buffer, ConnectionPool, SocketIO, connect_tcp, connect_unix
from kvpipe.errors import ProtocolError, TierError, TierUnavailable
from kvpipe.serde.entry import payload_digest

__all__ = ["KV_SUFFIX", "META_SUFFIX", "RedisConnector"]

log = logging.getLogger(__name__)

KV_SUFFIX = "kv_bytes"
META_SUFFIX = "metadata"
# A cluster payload's time to live until its header is written and it is made persistent: at least this, and at
# least twice what is left of the tier call's deadline, so that only a writer that died (or gave up) leaves one.
_PENDING_MIN_S = 120.0
_EMPTY = memoryview(b"")
T = TypeVar("T")


def _half(meta_exists: int, kv_pttl: int) -> bool:
    """Whether a cluster entry is half there, from ``EXISTS`` of its header and ``PTTL`` of its payload (-2: no
    payload, -1: a persistent one, else a payload still being written, which is not half an entry)."""
    return (meta_exists == 1 and kv_pttl == -2) or (meta_exists == 0 and kv_pttl == -1)


@attrs.define(eq=False)
class RedisConnector:
    """Byte store over Redis/Valkey: one server, a Sentinel-managed master, or a cluster.

    Build with :meth:`from_url`; connections are made lazily, so building never does I/O.
    """

    url: str
    mode: str  # "single" | "sentinel" | "cluster"
    addrs: list[Addr]
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    db: int = 0
    ssl_context: ssl.SSLContext | None = None
    master_name: str = "mymaster"
    sentinel_password: str | None = attrs.field(default=None, repr=False)
    max_connections: int = 8
    read_from_replicas: bool = False
    _nodes: dict[Addr, Node] = attrs.field(init=False, factory=dict)
    _replica_nodes: dict[Addr, Node] = attrs.field(init=False, factory=dict)
    _sentinel: SentinelView = attrs.field(init=False, default=attrs.Factory(
        lambda self: SentinelView(self._safe_url, self.addrs, self.master_name, self._open, self.sentinel_password,
                                  self.read_from_replicas), takes_self=True))
    _chooser: ReplicaChooser = attrs.field(init=False, factory=ReplicaChooser)
    _cluster: ClusterMap = attrs.field(init=False, default=attrs.Factory(
        lambda self: ClusterMap(self._safe_url, REPLICA_REFRESH_S if self.read_from_replicas else None),
        takes_self=True))
    _closed: bool = attrs.field(init=False, default=False)

    # -- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_url(cls, url: str, *, master_name: str | None = None, max_connections: int | None = None,
                 read_from_replicas: bool = False) -> RedisConnector:
        """Parse a Redis-family URL (``master_name`` is the Sentinel master when the URL names none).

        ``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS; ``?ssl_cert_reqs=none``,
        ``?ssl_ca_certs=PATH``), ``valkey://``/``valkeys://`` (aliases), ``unix:///path.sock[?db=N&password=P]``,
        ``redis-sentinel://[:password@]h1:p1,h2:p2[/master_name][?master_name=..&sentinel_password=..&db=N]``,
        ``redis-cluster://[:password@]h1:p1,h2:p2``. Every form accepts ``?max_connections=N`` (per node).

        TLS options (``rediss://``, ``valkeys://``, or ``?ssl=true``; on a plaintext URL they are an error):
        ``ssl_ca_certs=PATH``, ``ssl_cert_reqs=required|optional|none``, ``ssl_check_hostname=true|false``, and a
        client certificate for servers that ask for one: ``ssl_certfile=PATH[&ssl_keyfile=PATH][&ssl_password=P]``.
        Sentinel and cluster: ``read_from_replicas=true`` sends ``GET``/``EXISTS`` to healthy replicas (see the
        module docstring); ``read_from_replicas`` here is the default when the URL does not say. redis-py's
        connection options that mean nothing here (``socket_timeout``, ``health_check_interval``, ...) are
        accepted with a warning; any other option is an error.

        :raises ConfigError: for a malformed URL, an unknown scheme, an unknown option, a bad option value, or an
            unreadable ``ssl_ca_certs`` file or client certificate.
        """
        u = parse_redis_url(url, master_name=master_name, max_connections=max_connections,
                            read_from_replicas=read_from_replicas)
        return cls(url=url, **attrs.asdict(u, recurse=False))

    @property
    def _safe_url(self) -> str:
        return self.url.split("://")[0] + "://" + ",".join(map(str, self.addrs))

    # -- connections --------------------------------------------------------------------------------------------
    async def _open(self, addr: Addr) -> SocketIO:
        if addr.path:
            return await connect_unix(addr.path)
        try:
            return await connect_tcp(addr.host, addr.port, ssl_context=self.ssl_context)
        except ssl.SSLCertVerificationError as exc:
            raise TierUnavailable(f"{self._safe_url} ({addr}): TLS certificate rejected: {exc.verify_message} "
                                  "(check ssl_ca_certs / ssl_check_hostname)") from exc
        except ssl.SSLError as exc:
            raise TierUnavailable(f"{self._safe_url} ({addr}): TLS handshake failed: {exc}") from exc

    async def _setup_replica(self, io: SocketIO) -> None:
        await self._setup(io, master=False)

    async def _setup(self, io: SocketIO, master: bool = True) -> None:
        cmds: list[Buffer] = []
        n = 0
        if self.password is not None:
            cmds += encode_command("AUTH", *( [self.username] if self.username else []), self.password)
            n += 1
        if self.db:
            cmds += encode_command("SELECT", self.db)
            n += 1
        # Sentinel: a demoted master (or a stale address) must not take writes. A replica is read whatever the state
        # of its link to the master: what it has is older at worst, and entries are content-addressed and validated.
        if self.mode == "cluster" and not master:  # a cluster replica serves its slots' reads only after READONLY
            cmds += encode_command("READONLY")
            n += 1
        check_role = self.mode == "sentinel" and master
        if check_role:
            cmds += encode_command("ROLE")
            n += 1
        if not n:
            return
        await io.send_all(cmds)
        for _ in range(n):
            reply = check_reply(await read_reply(io), f"{self._safe_url} connection setup")
        if check_role and not (isinstance(reply, list) and reply and reply[0] == b"master"):
            self._sentinel.forget_master()
            raise TierUnavailable(f"{self._safe_url}: node is not the master of {self.master_name!r} (failover?)")

    def _node(self, addr: Addr, replica: bool = False) -> Node:
        """The node (connection pool) of ``addr``; ``replica``: a Sentinel replica read from (no role check)."""
        nodes = self._replica_nodes if replica else self._nodes
        node = nodes.get(addr)
        if node is None:
            if self._closed:
                raise TierUnavailable(f"{self._safe_url}: connector closed")
            pool = ConnectionPool(lambda: self._open(addr), max_connections=self.max_connections,
                                  on_connect=self._setup_replica if replica else self._setup)
            node = nodes[addr] = Node(addr, pool, replica=replica)
        return node

    @asynccontextmanager
    async def _conn(self, node: Node) -> AsyncIterator[SocketIO]:
        """A connection to ``node`` for one exchange. In a cluster the exchange gets ``NODE_SHARE`` of the time
        left before the call's deadline: a node that hangs (stopped, a host gone without a reset) then fails
        alone, as ``NodeTimedOut``, and the other nodes' answers still count, where it would have used up the whole
        call's deadline and taken the tier down."""
        budget = float("inf")  # also when the call has no deadline
        scope: anyio.CancelScope | None = None
        if self.mode == "cluster":  # elsewhere no scope at all: ~13 us per exchange on the single-server path
            # a share of the tier call's time, not of the caller's: a caller's own short deadline or cancellation
            # ends the exchange as it is (not caught here), and says nothing about the node
            budget = max(call_deadline() - anyio.current_time(), 0.0) * NODE_SHARE
            scope = anyio.CancelScope(deadline=anyio.current_time() + budget)
        try:
            with scope if scope is not None else nullcontext():
                async with node.pool.acquire() as io:
                    yield io
        except (OSError, ProtocolError) as exc:
            self._forget(node)
            raise NodeUnreachable(f"{self._safe_url} ({node.addr}): {exc}") from exc
        except TierUnavailable:
            self._forget(node)
            raise
        if scope is not None and scope.cancelled_caught:
            self._forget(node)
            raise NodeTimedOut(f"{self._safe_url} ({node.addr}): no answer within {budget:.3g} s")

    async def _node_part(self, node: Node, part: Callable[[], Awaitable[None]]) -> BaseException | None:
        """Run ``part``, one node's share of a call. A cluster master that cannot be reached (refused, reset,
        hung) is left out for a while (:meth:`ClusterMap.failed`) and its error returned: its entries are
        misses, the other nodes' answers stand. Anywhere else the error propagates: the call fails as a whole."""
        try:
            await part()
        except NodeUnreachable as exc:
            if self.mode != "cluster" or node.replica:
                raise
            self._cluster.failed(node.addr, exc)
            return exc
        if self.mode == "cluster" and not node.replica:
            self._cluster.answered(node.addr)
        return None

    def _forget(self, node: Node) -> None:
        """After a failure: drop the node's idle connections, and the master address / slot map that led to it."""
        node.pool.reset()
        if node.replica:  # left out by _replicas_failed; the master state is not in question
            return
        if self.mode == "sentinel":
            self._sentinel.forget_master()
        elif self.mode == "cluster":
            self._cluster.stale()

    async def _read_replica(self) -> Node | None:
        """The replica the next read goes to, or ``None`` for the master (no replica reads, or none usable)."""
        if self.mode != "sentinel" or not self.read_from_replicas:
            return None
        addr = self._chooser.pick(await self._sentinel.replicas())
        return None if addr is None else self._node(addr, replica=True)

    async def _replica_read(self, fn: Callable[[list[Node]], Awaitable[T]]) -> tuple[bool, T | None]:
        """Run a read that goes to replicas (``fn`` appends each replica node it uses to its argument):
        ``(True, result)``, or ``(False, None)`` when it failed; the replicas it used are then left out for a
        while (see :class:`ReplicaChooser`) and the caller reads from the master(s)."""
        used: list[Node] = []
        try:
            result = await fn(used)
        except (TierError, OSError, ProtocolError) as exc:
            self._replicas_failed(used, exc)
            return False, None
        except anyio.get_cancelled_exc_class():
            # The tier's deadline: leave these replicas out for a while. Not when the caller gave up earlier (its
            # own deadline, or an aborted request): the replicas did nothing wrong.
            if anyio.current_time() >= call_deadline():
                self._replicas_failed(used, "no answer before the deadline")
            raise
        self._chooser.succeeded(n.addr for n in used)
        return True, result

    def _replicas_failed(self, used: list[Node], why: object) -> None:
        for node in dict.fromkeys(used):
            node.pool.reset()
            self._chooser.failed(node.addr, why, self._safe_url)

    async def _on_replica(self, fn: Callable[[Node], Awaitable[T]]) -> tuple[bool, T | None]:
        """Sentinel: run ``fn`` on a replica when reads go to replicas: ``(True, result)``, or ``(False, None)``
        when there is none or it failed (the caller then reads from the master)."""
        node = await self._read_replica()
        if node is None:
            return False, None

        async def run(used: list[Node]) -> T:
            used.append(node)
            return await fn(node)
        return await self._replica_read(run)

    async def _cluster_read(self, fn: Callable[[list[Node] | None], Awaitable[T]]) -> T:
        """A cluster read: ``fn(used)`` on replicas when ``read_from_replicas`` (see :meth:`_route`), done again on
        the masters (``fn(None)``) when that fails; else ``fn(None)``."""
        if self.read_from_replicas:
            ok, result = await self._replica_read(fn)
            if ok:
                return cast(T, result)
        return await fn(None)

    async def _cluster_slots(self) -> list[Addr]:
        """The cluster's slot map, re-read when :class:`ClusterMap` says it is due."""
        cm = self._cluster
        slots = cm.fresh()
        if slots is not None:
            return slots
        errors = []
        for seed in cm.reading(list(self.addrs) + [a for a in self._nodes if a not in self.addrs]):
            try:
                async with self._conn(self._node(seed)) as io:
                    await io.send_all(encode_command("CLUSTER", "SLOTS"))
                    reply = check_reply(await read_reply(io), "CLUSTER SLOTS")
            except TierError as exc:
                errors.append(str(exc))
                if isinstance(exc, NodeUnreachable) and seed in cm.masters:
                    cm.failed(seed, exc)  # a master no read had reached yet is found gone here
                continue
            parsed = parse_cluster_slots(reply, seed)
            if parsed is None:
                errors.append(f"{seed}: not every slot is served")
                continue
            return cm.install(*parsed)
        if cm.slots is not None:  # a periodic re-read failed: keep the map we have, unless no master is left
            if cm.all_down():
                raise TierUnavailable(f"{self._safe_url}: no cluster master answers: " + "; ".join(errors))
            log.debug("%s: cannot re-read the cluster slot map: %s", self._safe_url, "; ".join(errors))
            return cm.slots
        raise TierUnavailable(f"{self._safe_url}: cannot read the cluster slot map: " + "; ".join(errors))

    async def _route(self, key: str, used: list[Node] | None = None) -> Node:
        """The node serving ``key``. ``used``: a cluster read that may go to replicas: a usable replica of the
        key's slot when there is one (round robin; it is appended to ``used``), else the master."""
        if self.mode == "single":
            return self._node(self.addrs[0])
        if self.mode == "sentinel":
            return self._node(await self._sentinel.master())
        slots = await self._cluster_slots()
        slot = key_slot(key.encode())
        if used is None or (addr := self._chooser.pick(self._cluster.replicas[slot])) is None:
            return self._node(slots[slot])
        node = self._node(addr, replica=True)
        used.append(node)
        return node

    async def _masters(self) -> list[Node]:
        if self.mode == "cluster":
            return [self._node(a) for a in dict.fromkeys(await self._cluster_slots())]
        return [await self._route("")]

    async def _run_routed(self, cmds: Sequence[tuple[str, list[Buffer]]], node: Node | None = None,
                          used: list[Node] | None = None) -> list[Any]:
        """Send each command to the node serving its routing key (pipelined per node, nodes concurrently), or all
        to ``node``; replies in command order, error replies as :class:`RespError`. ``used``: see :meth:`_route`
        (a read that may go to cluster replicas)."""
        groups: dict[Node, list[int]] = defaultdict(list)
        replies: list[Any] = [None] * len(cmds)
        if node is not None:
            groups[node] = list(range(len(cmds)))
        else:
            for i, (rkey, _) in enumerate(cmds):
                n = await self._route(rkey, used)
                if self.mode == "cluster" and not n.replica and self._cluster.is_down(n.addr):
                    replies[i] = NODE_DOWN
                else:
                    groups[n].append(i)

        def runner(node: Node, idxs: list[int]) -> Callable[[], Coroutine[Any, Any, None]]:
            async def exchange() -> None:
                async with self._conn(node) as io:
                    bufs: list[Buffer] = []
                    for i in idxs:
                        bufs += cmds[i][1]
                    await io.send_all(bufs)
                    for i in idxs:
                        replies[i] = await read_reply(io)

            async def run() -> None:
                for i in idxs:
                    replies[i] = NODE_DOWN  # until answered: what a master left out midway did not answer
                await self._node_part(node, exchange)
            return run

        await gather([runner(n, idxs) for n, idxs in groups.items()])
        if self.mode == "cluster" and replies and all(r is NODE_DOWN for r in replies) and self._cluster.all_down():
            raise TierUnavailable(f"{self._safe_url}: no cluster master answers")
        for r in replies:
            if isinstance(r, RespError) and r.kind in ("MOVED", "ASK"):
                self._cluster.forget()  # the next call reads the new slot map
            elif isinstance(r, RespError) and r.kind in UNAVAILABLE_KINDS:
                if self.mode == "sentinel" and node is None:
                    self._sentinel.forget_master()
                raise TierUnavailable(f"{self._safe_url}: {r.message}")
        return replies

    # -- the Connector API --------------------------------------------------------------------------------------
    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether both parts of each entry are stored."""
        if not keys:
            return []
        if self.mode == "cluster":
            cmds = [(k + sfx, encode_command("EXISTS", k + sfx)) for k in keys for sfx in (META_SUFFIX, KV_SUFFIX)]
            r = await self._cluster_read(lambda used: self._run_routed(cmds, used=used))
            return [r[2 * i] == 1 and r[2 * i + 1] == 1 for i in range(len(keys))]
        cmds = [(k, encode_command("EXISTS", k + META_SUFFIX, k + KV_SUFFIX)) for k in keys]
        on_replica, got = await self._on_replica(lambda node: self._run_routed(cmds, node))
        replies = got if on_replica and got is not None else await self._run_routed(cmds)
        return [x == 2 for x in replies]

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
            handed: set[str] = set()  # entries whose header went to ``read_into`` (their buffer may be half-filled)

            def tracked(hb: bytes, k: str | None = None) -> memoryview | None:
                handed.add(k or "")
                return read_into(hb, k)

            async def run(used: list[Node] | None) -> list[str]:
                # again on the masters after a replica failed: the entries no buffer was handed out for
                idxs = [i for i in range(len(keys)) if out[i] is None and keys[i] not in handed]
                found = await self._cluster_get(keys, idxs, tracked, out, used)
                # A replica's view of a half entry may be a lag (an entry's two keys are in different slots,
                # replicated separately): only what the masters also hold half of is an orphan.
                return found if used is None or not found else await self._halves_on_masters(found)

            orphans += await self._cluster_read(run)
        else:
            # ``done``: entries answered (hit, miss or orphan); ``started``: entries whose header went to
            # ``read_into`` (a failed replica read leaves those misses: their buffers may be half-filled).
            done: set[int] = set()
            started: set[int] = set()
            todo = list(range(len(keys)))

            async def on(node: Node) -> None:
                await self._get_pipelined(node, keys, todo, read_into, out, orphans, done, started)

            on_replica, _ = await self._on_replica(on)
            if not on_replica:
                todo = [i for i in todo if i not in done and i not in started]
                if todo:
                    await on(await self._route(keys[0]))
        if orphans:
            log.debug("%s: cleaning %d half-present entries", self._safe_url, len(orphans))
            try:
                await self.delete_many(orphans)
            except TierError as exc:
                log.debug("orphan cleanup failed: %s", exc)
        return out

    async def _halves_on_masters(self, ks: Sequence[str]) -> list[str]:
        """Those of entries ``ks`` of which the masters hold exactly one part, a payload being written (one with
        a time to live) left out (a master left out says neither)."""
        cmds = [(k + sfx, encode_command(cmd, k + sfx)) for k in ks
                for cmd, sfx in (("EXISTS", META_SUFFIX), ("PTTL", KV_SUFFIX))]
        r = await self._run_routed(cmds)
        halves = {k: r[2 * i] for i, k in enumerate(ks)
                  if isinstance(r[2 * i], int) and isinstance(r[2 * i + 1], int) and _half(r[2 * i], r[2 * i + 1])}
        headless = await self._still_headless([k for k, meta in halves.items() if meta == 0])
        return [k for k, meta in halves.items() if meta == 1 or k in headless]

    async def _still_headless(self, ks: Sequence[str], used: list[Node] | None = None) -> set[str]:
        """Those of entries ``ks`` (seen with a persistent payload and no header) that still have no header. The
        header was looked at first and the payload after, maybe on another node: a writer may have written the
        header and made the payload persistent in between (it writes them in that order), which looks the same."""
        if not ks:
            return set()
        r = await self._run_routed([(k + META_SUFFIX, encode_command("EXISTS", k + META_SUFFIX)) for k in ks],
                                   used=used)
        return {k for k, e in zip(ks, r, strict=True) if e == 0}

    async def _cluster_get(self, keys: Sequence[str], idxs: Sequence[int], read_into: ReadInto,
                           out: list[GetResult | None], used: list[Node] | None) -> list[str]:
        """Cluster ``get_many`` of entries ``idxs``: headers first, then the payloads of the entries that have one
        (the two parts may live on different nodes); ``used``: read from replicas (see :meth:`_route`). Returns
        the half-present entries (orphans)."""
        if not idxs:
            return []
        sub = [keys[i] for i in idxs]
        metas_sub = await self._run_routed([(k + META_SUFFIX, encode_command("GET", k + META_SUFFIX)) for k in sub],
                                           used=used)
        metas: list[Any] = [None] * len(keys)
        for i, m in zip(idxs, metas_sub, strict=True):
            metas[i] = m
        todo = [i for i in idxs if isinstance(metas[i], bytes)]
        no_payload = await self._get_payloads(keys, todo, metas, read_into, out, used)
        orphans = [keys[i] for i in no_payload]  # a header without payload
        missing_meta = [keys[i] for i in idxs if metas[i] is None]
        if missing_meta:  # a payload without header? (PTTL is cheap; the payload is not read)
            ttl = await self._run_routed([(k + KV_SUFFIX, encode_command("PTTL", k + KV_SUFFIX))
                                          for k in missing_meta], used=used)
            headless = [k for k, t in zip(missing_meta, ttl, strict=True) if isinstance(t, int) and _half(0, t)]
            still = await self._still_headless(headless, used)
            orphans += [k for k in headless if k in still]
        return orphans

    async def _get_pipelined(self, node: Node, keys: Sequence[str], todo: Sequence[int], read_into: ReadInto,
                             out: list[GetResult | None], orphans: list[str], done: set[int], started: set[int]
                             ) -> None:
        """Both parts of entries ``todo`` from one server: the headers of all and the first payload in one
        round trip, then each further payload asked for as the one before it starts arriving (only for entries
        that have a header; the others are checked for a header-less payload with ``EXISTS``)."""
        first = todo[0]
        bufs: list[Buffer] = []
        for i in todo:
            bufs += encode_command("GET", keys[i] + META_SUFFIX)
        bufs += encode_command("GET", keys[first] + KV_SUFFIX)
        async with self._conn(node) as io:
            await io.send_all(bufs)
            metas = {i: check_reply(await read_reply(io), f"GET {keys[i]}{META_SUFFIX}") for i in todo}
            fetch = [first] + [i for i in todo[1:] if isinstance(metas[i], bytes)]
            probe = [i for i in todo[1:] if metas[i] is None]
            probe_cmds = [b for i in probe for b in encode_command("EXISTS", keys[i] + KV_SUFFIX)]
            for j, i in enumerate(fetch):
                k, meta = keys[i], metas[i]

                def target(_n: int, meta: Any = meta, k: str = k, i: int = i) -> memoryview | None:
                    if not isinstance(meta, bytes):
                        return None
                    started.add(i)
                    return read_into(meta, k)

                nxt = encode_command("GET", keys[fetch[j + 1]] + KV_SUFFIX) if j + 1 < len(fetch) else probe_cmds
                digest = payload_digest()
                res = check_reply(await read_bulk_into(io, target, digest, send_next(io, nxt)), f"GET {k}{KV_SUFFIX}")
                n, view = res
                done.add(i)
                if meta is None and n < 0:
                    continue
                if meta is None or n < 0:
                    orphans.append(k)
                    continue
                out[i] = (meta, view, digest.intdigest()) if view is not None else (meta, _EMPTY)
            for i in probe:
                if check_reply(await read_reply(io), f"EXISTS {keys[i]}{KV_SUFFIX}") == 1:
                    orphans.append(keys[i])  # a payload without header
                done.add(i)

    async def _get_payloads(self, keys: Sequence[str], todo: list[int], metas: list[Any], read_into: ReadInto,
                            out: list[GetResult | None], used: list[Node] | None = None) -> list[int]:
        """Read the payloads of entries ``todo`` (whose headers are ``metas``), each asked for as the one before
        it on the same node starts arriving; returns those with no payload."""
        no_payload: list[int] = []
        groups: dict[Node, list[int]] = defaultdict(list)
        for i in todo:
            n = await self._route(keys[i] + KV_SUFFIX, used)
            if n.replica or not self._cluster.is_down(n.addr):  # left out: a miss, not a header without payload
                groups[n].append(i)

        def runner(node: Node, idxs: list[int]) -> Callable[[], Coroutine[Any, Any, None]]:
            async def run() -> None:
                await self._node_part(node, lambda: read_node(node, idxs))  # those not read yet are misses
            return run

        async def read_node(node: Node, idxs: list[int]) -> None:
            async with self._conn(node) as io:
                await io.send_all(encode_command("GET", keys[idxs[0]] + KV_SUFFIX))
                for j, i in enumerate(idxs):
                    meta = metas[i]

                    def target(_n: int, meta: bytes = meta, k: str = keys[i]) -> memoryview | None:
                        return read_into(meta, k)

                    nxt = encode_command("GET", keys[idxs[j + 1]] + KV_SUFFIX) if j + 1 < len(idxs) else []
                    digest = payload_digest()
                    res = await read_bulk_into(io, target, digest, send_next(io, nxt))
                    if isinstance(res, RespError):
                        if res.kind in ("MOVED", "ASK"):
                            self._cluster.forget()
                            continue
                        check_reply(res, f"GET {keys[i]}{KV_SUFFIX}")
                    n, view = res  # type: ignore[misc]
                    if n >= 0:
                        out[i] = (meta, view, digest.intdigest()) if view is not None else (meta, _EMPTY)
                    else:
                        no_payload.append(i)

        await gather([runner(n, idxs) for n, idxs in groups.items()])
        return no_payload

    async def put_many(self, items: Sequence[Entry]) -> int:
        """Store entries so that a reader never sees half of one; returns how many were stored (a server out of
        memory under ``noeviction`` stores fewer)."""
        if not items:
            return 0
        if self.mode == "cluster":
            return await self._cluster_put(items)
        return await self._put_pipelined(aiter_of(items))

    async def _cluster_put(self, items: Sequence[Entry]) -> int:
        """Payloads first, each with a time to live; then the headers of those stored; then ``PERSIST`` of their
        payloads. An entry counts as stored when its payload is still there at the end (``EXISTS``); a payload
        gone by then (a slow writer outlived its time to live, ``maxmemory`` evicted it) takes its header away."""
        left = call_deadline() - anyio.current_time()
        px = int(max(_PENDING_MIN_S, 2 * left) * 1000) if left != float("inf") else int(_PENDING_MIN_S * 1000)
        first = await self._run_routed([(k + KV_SUFFIX, encode_command("SET", k + KV_SUFFIX, payload, "PX", px))
                                        for k, _h, payload in items])
        ok = [it for it, r in zip(items, first, strict=True) if r == b"OK"]
        if not ok:
            return 0
        second = await self._run_routed([(k + META_SUFFIX, encode_command("SET", k + META_SUFFIX, header))
                                         for k, header, _p in ok])
        ok = [it for it, r in zip(ok, second, strict=True) if r == b"OK"]
        if not ok:
            return 0
        third = await self._run_routed([(k + KV_SUFFIX, encode_command(cmd, k + KV_SUFFIX))
                                        for k, _h, _p in ok for cmd in ("PERSIST", "EXISTS")])
        gone = [k for i, (k, _h, _p) in enumerate(ok) if third[2 * i + 1] != 1]
        if gone:
            await self._run_routed([(k + META_SUFFIX, encode_command("DEL", k + META_SUFFIX)) for k in gone])
        return len(ok) - len(gone)

    async def put_stream(self, items: AsyncIterator[Entry]) -> int:
        """:meth:`put_many` for entries made one at a time: each entry's commands go out as soon as it comes (the
        tier hashes the next chunk while the server takes in this one), and the replies are read at the end."""
        if self.mode == "cluster":  # entries go to several nodes: collect them, then route
            return await self.put_many([it async for it in items])
        return await self._put_pipelined(items)

    async def _put_pipelined(self, items: AsyncIterator[Entry]) -> int:
        """``MULTI``/``SET kv_bytes``/``SET metadata``/``EXEC`` per entry on one connection to the master, sent as
        the entries come; returns how many were stored (a server out of memory under ``noeviction`` stores
        fewer)."""
        item = await anext(items, None)
        if item is None:
            return 0
        node = await self._route(item[0])
        keys: list[str] = []
        stored = 0
        async with self._conn(node) as io:
            while item is not None:
                k, header, payload = item
                await io.send_all([*encode_command("MULTI"), *encode_command("SET", k + KV_SUFFIX, payload),
                                   *encode_command("SET", k + META_SUFFIX, header), *encode_command("EXEC")])
                keys.append(k)
                item = await anext(items, None)
            for k in keys:
                replies = [await read_reply(io) for _ in range(4)]
                ex = replies[3]
                if isinstance(ex, list) and all(r == b"OK" for r in ex):
                    stored += 1
                    continue
                errs = [r for r in replies if isinstance(r, RespError)]
                for e in errs:
                    if e.kind in UNAVAILABLE_KINDS:
                        if self.mode == "sentinel":
                            self._sentinel.forget_master()
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
            while True:
                # One exchange per page: in a cluster each gets its share of what is left of the deadline
                # (a whole node's scan as one exchange would leave the last masters a sliver of it).
                async with self._conn(node) as io:
                    await io.send_all(encode_command("SCAN", cursor, "MATCH", pattern + META_SUFFIX,
                                                     "COUNT", 1000))
                    reply = check_reply(await read_reply(io), "SCAN")
                cursor, batch = reply[0], reply[1]
                found += [b.decode(errors="replace")[: -len(META_SUFFIX)] for b in batch]
                if cursor == b"0":
                    break
        return sorted(set(found))

    async def server_info(self) -> dict[str, Any]:
        """What ``redis-cli INFO memory`` / ``INFO stats`` tell of the store, summed over the masters:
        ``used_memory``, ``maxmemory`` (0: no bound), ``maxmemory_policy`` (the first master's), ``evicted_keys``,
        ``expired_keys``, ``masters``."""
        out: dict[str, Any] = {"masters": 0, "used_memory": 0, "maxmemory": 0, "evicted_keys": 0,
                               "expired_keys": 0}
        for node in await self._masters():
            async with self._conn(node) as io:
                await io.send_all([*encode_command("INFO", "memory"), *encode_command("INFO", "stats")])
                text = b""
                for _ in range(2):
                    part = check_reply(await read_reply(io), "INFO")
                    text += part if isinstance(part, bytes) else b""
            fields = dict(line.split(":", 1) for line in text.decode(errors="replace").splitlines()
                          if ":" in line and not line.startswith("#"))
            out["masters"] += 1
            for k in ("used_memory", "maxmemory", "evicted_keys", "expired_keys"):
                out[k] += int(fields.get(k, "0") or 0)
            out.setdefault("maxmemory_policy", fields.get("maxmemory_policy", "?"))
        return out

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

        :raises TierUnavailable: when one cannot be reached or is not ready; in a cluster, when none can be
            reached (the others are left out for a while, see ``redis_cluster.NODE_DOWN_S``) or one is not ready.
        """
        masters = await self._masters()
        unreachable: list[str] = []

        def pinger(node: Node) -> Callable[[], Coroutine[Any, Any, None]]:
            async def exchange() -> None:
                # A single server's address might be a Sentinel's (it answers PING, then refuses every GET and
                # SET) or one cluster node's (MOVED for the other nodes' slots): its role and cluster id tell, in
                # the same round trip (an error answer, from an old server or an ACL that denies the command, is
                # neither).
                single = self.mode == "single"
                cmds = encode_command("PING")
                if single:
                    cmds += [*encode_command("ROLE"), *encode_command("CLUSTER", "MYID")]
                async with self._conn(node) as io:
                    await io.send_all(cmds)
                    check_reply(await read_reply(io), f"PING {node.addr}")
                    if not single:
                        return
                    role, cluster_id = await read_reply(io), await read_reply(io)
                    if isinstance(role, list) and role and role[0] == b"sentinel":
                        raise TierUnavailable(f"{self._safe_url}: {node.addr} is a Sentinel, not a data "
                                              "server: use redis-sentinel://HOST:PORT[,HOST:PORT...] (with "
                                              "?master_name= unless it is 'mymaster')")
                    if isinstance(cluster_id, bytes) and cluster_id:
                        raise TierUnavailable(f"{self._safe_url}: {node.addr} is a Redis Cluster node (it would "
                                              "answer MOVED for other nodes' slots): use "
                                              "redis-cluster://HOST:PORT[,HOST:PORT...]")

            async def run() -> None:
                exc = await self._node_part(node, exchange)
                if exc is not None:
                    unreachable.append(str(exc))
            return run

        await gather([pinger(n) for n in masters])  # concurrently: each master gets the same share of the deadline
        if len(unreachable) == len(masters):
            raise TierUnavailable(f"{self._safe_url}: no cluster master answers: " + "; ".join(unreachable))

    def reset(self) -> None:
        """Forget connections, master address and slot map (the tier calls this when it marks the remote down)."""
        for node in [*self._nodes.values(), *self._replica_nodes.values()]:
            node.pool.reset()
        self._sentinel.forget()
        self._cluster.reset()

    async def aclose(self) -> None:
        """Close every connection; idempotent."""
        self._closed = True
        for node in [*self._nodes.values(), *self._replica_nodes.values()]:
            node.pool.close()
        self._nodes.clear()
        self._replica_nodes.clear()

