"""What the Sentinels say about one master, for the Redis connector: where the master is and, with replica reads,
which replicas are healthy.

The master's address is asked once and kept until the connector :meth:`~SentinelView.forget_master`\\ s it (a
connection to it failed, or it answered ``ROLE`` as a replica: a failover); the next request asks again. The
Sentinels are asked in the order given, one connection each, and the first that knows the master answers. The
replica list is re-read every 5 s, under a 0.5 s budget: a Sentinel that is slow to answer keeps the old list
instead of holding up the read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import anyio
import attrs

from kvpipe.connectors.redis_replicas import healthy_replicas
from kvpipe.connectors.redis_url import Addr
from kvpipe.connectors.resp import RespError, check_reply, encode_command, read_reply
from kvpipe.connectors.sockio import Buffer, SocketIO
from kvpipe.errors import ProtocolError, TierError, TierUnavailable

__all__ = ["REPLICA_REFRESH_S", "SentinelView"]

log = logging.getLogger(__name__)

REPLICA_REFRESH_S = 5.0  # how long a replica list (Sentinel's or the cluster's) is used before it is re-read
_REFRESH_BUDGET_S = 0.5


@attrs.define(eq=False)
class SentinelView:
    """The master ``master_name`` and its replicas, as the Sentinels at ``sentinels`` see them.

    ``open`` makes a connection (the connector's, so TLS settings apply to the Sentinels too); ``safe_url`` names
    the remote in errors.
    """

    safe_url: str
    sentinels: Sequence[Addr]
    master_name: str
    open: Callable[[Addr], Awaitable[SocketIO]]
    password: str | None = attrs.field(default=None, repr=False)
    with_replicas: bool = False
    _master: Addr | None = attrs.field(init=False, default=None)
    _replicas: list[Addr] = attrs.field(init=False, factory=list)
    _replicas_expire: float = attrs.field(init=False, default=0.0)

    def forget_master(self) -> None:
        """Ask the Sentinels again on the next request (after a failure, or a failover seen)."""
        self._master = None

    def forget(self) -> None:
        """Forget the master and the replica list."""
        self._master = None
        self._replicas_expire = 0.0

    async def _ask(self, commands: Sequence[Sequence[str]], accept: Callable[[list[Any]], str | None],
                   what: str) -> list[Any]:
        """The replies to ``commands`` of the first Sentinel whose replies ``accept`` takes (it returns ``None``,
        or why not).

        :raises TierUnavailable: ``what`` and every Sentinel's reason, when none gives acceptable replies.
        """
        errors = []
        for s in self.sentinels:
            try:
                io = await self.open(s)
            except (OSError, TierError) as exc:
                errors.append(f"{s}: {exc}")
                continue
            try:
                cmds: list[Buffer] = []
                if self.password:
                    cmds += encode_command("AUTH", self.password)
                for c in commands:
                    cmds += encode_command(*c)
                await io.send_all(cmds)
                if self.password:
                    check_reply(await read_reply(io), f"sentinel {s} AUTH")
                replies = [await read_reply(io) for _ in commands]
            except (OSError, ProtocolError, TierError) as exc:
                errors.append(f"{s}: {exc}")
                continue
            finally:
                io.close()
            why = accept(replies)
            if why is None:
                return replies
            errors.append(f"{s}: {why}")
        raise TierUnavailable(f"{self.safe_url}: {what}: " + "; ".join(errors))

    async def master(self) -> Addr:
        """The master's address (asked when not known).

        :raises TierUnavailable: when no Sentinel knows the master.
        """
        if self._master is not None:
            return self._master

        def accept(replies: list[Any]) -> str | None:
            r = replies[0]
            if isinstance(r, list) and len(r) == 2 and all(isinstance(x, bytes) for x in r):
                return None
            if isinstance(r, RespError) and "unknown command" in r.message.lower():
                # a plain Redis/Valkey server (a redis:// address given as a Sentinel): say so, not "no master"
                return f"not a Sentinel, it answered SENTINEL with {r.message[:60]!r}: use redis:// for a server"
            if isinstance(r, RespError) and r.message.startswith(("NOAUTH", "WRONGPASS")):
                # the Sentinel's own password (not the data nodes'): say which setting, not "no master"
                return f"{r.message} (the Sentinels' password is ?sentinel_password=...)"
            if isinstance(r, RespError):
                return f"no master named {self.master_name!r} ({r.message})"
            return f"no master named {self.master_name!r} (answer {r!r})"

        cmds = [("SENTINEL", "get-master-addr-by-name", self.master_name)]
        if self.with_replicas:
            cmds.append(("SENTINEL", "replicas", self.master_name))
        replies = await self._ask(cmds, accept, f"no sentinel knows master {self.master_name!r}")
        host, port = replies[0]
        self._master = Addr(host.decode(), int(port))
        log.debug("sentinel: master %r is %s", self.master_name, self._master)
        if self.with_replicas:
            self._set_replicas(replies[1])
        return self._master

    async def replicas(self) -> list[Addr]:
        """The healthy replicas to read from (the list re-read when it is due).

        :raises TierUnavailable: when no Sentinel knows the master.
        """
        await self.master()
        if time.monotonic() >= self._replicas_expire:
            await self._refresh_replicas()
        return self._replicas

    def _set_replicas(self, reply: Any) -> None:
        self._replicas = [a for a in healthy_replicas(reply) if a != self._master]
        self._replicas_expire = time.monotonic() + REPLICA_REFRESH_S
        log.debug("sentinel: replicas of %r to read from: %s", self.master_name, ", ".join(map(str, self._replicas)))

    async def _refresh_replicas(self) -> None:
        """Re-read the replica list (briefly: on failure the old list stays, and the next refresh is later)."""
        self._replicas_expire = time.monotonic() + REPLICA_REFRESH_S
        with anyio.move_on_after(_REFRESH_BUDGET_S):
            try:
                (reply,) = await self._ask([("SENTINEL", "replicas", self.master_name)],
                                           lambda r: None if isinstance(r[0], list) else repr(r[0]), "replica list")
            except TierUnavailable as exc:
                log.debug("sentinel: cannot refresh the replicas of %r: %s", self.master_name, exc)
                return
            self._set_replicas(reply)
