"""What a Redis-protocol connector knows of a cluster, without I/O: the slot map (master and replicas of each of
the 16384 slots, from ``CLUSTER SLOTS``), when it must be re-read, and which masters are left out after a
failure.

A master whose connection is refused, reset or garbled is left out for ``NODE_DOWN_S``: its slots' entries are
misses and stores to it are dropped, at once, while the other masters keep serving. Meanwhile the map is re-read
every ``DOWN_MAP_REFRESH_S`` (a replica takes the master's place without any ``MOVED`` reaching the client: the
dead master's connections are refused, not redirected); reading from replicas, every ``replica_refresh_s``
(replicas join, leave and fail over without a ``MOVED`` either); otherwise only after a ``MOVED`` or a failure.

The tier is marked down only when no master answers. A re-read asks every node in turn, so it also finds masters
gone that no request had reached (the entries in use may all lie on others). A node that hangs (stopped, or a host
gone without a reset) gets ``NODE_SHARE`` of the time left before a call's deadline: past it, that node fails
alone and is left out for ``HUNG_DOWN_S`` (doubling while it keeps hanging), and the call returns what the other
nodes answered. With the default ``cluster-require-full-coverage yes`` the other masters themselves refuse every
key (``CLUSTERDOWN``) once the cluster marks the master failed, until a replica takes over; a cache cluster usually
sets it to ``no``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs

from kvpipe.connectors.redis_url import Addr

__all__ = ["DOWN_MAP_REFRESH_S", "HUNG_DOWN_MAX_S", "HUNG_DOWN_S", "NODE_DOWN_S", "NODE_SHARE", "ClusterMap",
           "NodeHung", "parse_cluster_slots"]

log = logging.getLogger(__name__)

NODE_DOWN_S = 1.0
# A node that hung (gave no answer within its share of a call's deadline) costs that long to every call that
# tries it, so it is left out longer: 5 s, doubling for each hang in a row, up to 60 s; an answer ends the streak.
HUNG_DOWN_S = 5.0
HUNG_DOWN_MAX_S = 60.0
# The share of the time left before a call's deadline that one node's exchange may take.
NODE_SHARE = 0.5
DOWN_MAP_REFRESH_S = 0.5
SLOTS = 16384


class NodeHung(Exception):
    """Marks a node failure as a hang (no answer in time), as opposed to a refused or reset connection (mixed
    into the connector's error; never raised alone)."""


def _slot_addr(entry: Any, seed: Addr) -> Addr:
    """A node of a ``CLUSTER SLOTS`` range (``[host, port, id, ...]``; an empty host is the node asked)."""
    return Addr(entry[0].decode() if entry[0] else seed.host, int(entry[1]))


def parse_cluster_slots(reply: Any, seed: Addr) -> tuple[list[Addr], list[tuple[Addr, ...]]] | None:
    """``(master of each slot, replicas of each slot)`` from ``seed``'s ``CLUSTER SLOTS`` reply; ``None`` when
    some slot is served by no one."""
    slots: list[Addr | None] = [None] * SLOTS
    replicas: list[tuple[Addr, ...]] = [()] * SLOTS
    for rng in reply:
        start, end, master = rng[0], rng[1], rng[2]
        addr, reps = _slot_addr(master, seed), tuple(_slot_addr(r, seed) for r in rng[3:])
        for i in range(start, end + 1):
            slots[i] = addr
            replicas[i] = reps
    if any(a is None for a in slots):
        return None
    return slots, replicas  # type: ignore[return-value]


@attrs.define(eq=False)
class ClusterMap:
    """The slot map and the masters left out; ``url`` names the cluster in log lines."""

    url: str
    replica_refresh_s: float | None = None  # reading from replicas: re-read the map this often
    slots: list[Addr] | None = None
    replicas: list[tuple[Addr, ...]] = attrs.field(factory=list)
    masters: frozenset[Addr] = frozenset()  # those of ``slots``
    _expire: float = 0.0
    _down_until: dict[Addr, float] = attrs.field(factory=dict)
    _down_logged: set[Addr] = attrs.field(factory=set)  # warned about, not seen answering since
    _hangs: dict[Addr, int] = attrs.field(factory=dict)  # hangs in a row

    # -- the map ------------------------------------------------------------------------------------------------
    def fresh(self) -> list[Addr] | None:
        """The map, while it needs no re-read."""
        return self.slots if self.slots is not None and time.monotonic() < self._expire else None

    def reading(self, seeds: list[Addr]) -> list[Addr]:
        """A re-read starts now: the next is due in the interval that applies; ``seeds`` in the order to ask
        them (the masters left out last)."""
        if self._down_until:
            every = DOWN_MAP_REFRESH_S
        else:
            every = self.replica_refresh_s if self.replica_refresh_s is not None else float("inf")
        self._expire = time.monotonic() + every
        return sorted(seeds, key=lambda a: a in self._down_until)

    def install(self, slots: list[Addr], replicas: list[tuple[Addr, ...]]) -> list[Addr]:
        """Take a map just read; a master left out that no longer is one (a replica took over) is forgotten."""
        self.slots, self.replicas = slots, replicas
        self.masters = masters = frozenset(slots)
        for a in [a for a in self._down_until if a not in masters]:
            del self._down_until[a]
            self._down_logged.discard(a)
            self._hangs.pop(a, None)
        return slots

    def stale(self) -> None:
        """Re-read the map at the next call (a node failed); the old one stays if no node answers."""
        self._expire = 0.0

    def forget(self) -> None:
        """Drop the map (a ``MOVED``: the next call must read the new one)."""
        self.slots = None

    def reset(self) -> None:
        """Forget everything (the remote was marked down)."""
        self.slots = None
        self._down_until.clear()
        self._down_logged.clear()
        self._hangs.clear()

    # -- masters left out ---------------------------------------------------------------------------------------
    def is_down(self, addr: Addr) -> bool:
        """Whether master ``addr`` is being left out (once the time is up it is tried again)."""
        until = self._down_until.get(addr)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._down_until[addr]
        return False

    def failed(self, addr: Addr, exc: BaseException) -> None:
        """Master ``addr`` could not be reached: leave it out for a while (warned once per outage)."""
        if addr not in self._down_logged:
            self._down_logged.add(addr)
            log.warning("%s: cluster master %s failed (%s); its slots are misses while the other masters keep "
                        "serving, until it answers again or a replica takes its place", self.url, addr, exc)
        period = NODE_DOWN_S
        if isinstance(exc, NodeHung):
            n = self._hangs[addr] = self._hangs.get(addr, 0) + 1
            period = min(HUNG_DOWN_S * 2 ** (n - 1), HUNG_DOWN_MAX_S)
        self._down_until[addr] = time.monotonic() + period

    def answered(self, addr: Addr) -> None:
        """Master ``addr`` answered."""
        self._hangs.pop(addr, None)
        if self._down_logged and addr in self._down_logged:
            self._down_logged.discard(addr)
            log.warning("%s: cluster master %s answers again", self.url, addr)

    def all_down(self) -> bool:
        """Whether every master of the map is left out."""
        return self.slots is not None and all(a in self._down_until for a in self.masters)
