"""Replica reads of the Redis connector: which replica a read goes to, and which are left out after failing.

Shared by Sentinel (the replicas ``SENTINEL replicas`` lists as healthy) and Cluster (the replicas of a key's slot
in ``CLUSTER SLOTS``): reads go round robin over the usable replicas; a replica that fails is left out for 5 s,
doubling for each failure in a row (a replica that hangs would otherwise cost one tier deadline every few
seconds), up to 60 s; a read that succeeds on it ends the streak.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs

from kvpipe.connectors.redis_url import Addr

__all__ = ["ReplicaChooser", "healthy_replicas"]

log = logging.getLogger(__name__)

_COOLDOWN_S = 5.0  # doubled for each failure in a row, up to the max
_COOLDOWN_MAX_S = 60.0


def healthy_replicas(reply: Any) -> list[Addr]:
    """Replica addresses from a ``SENTINEL replicas`` reply, leaving out those Sentinel sees down, as redis-py does
    (not by ``master-link-status``: Sentinel refreshes it only every 10 s, and a replica whose link is down still
    serves what it has)."""
    out: list[Addr] = []
    if not isinstance(reply, list):
        return out
    for item in reply:
        if not isinstance(item, list):
            continue
        f = {item[j]: item[j + 1] for j in range(0, len(item) - 1, 2)
             if isinstance(item[j], bytes) and isinstance(item[j + 1], bytes)}
        if set(f.get(b"flags", b"").split(b",")) & {b"s_down", b"o_down", b"disconnected"}:
            continue
        try:
            out.append(Addr(f[b"ip"].decode(), int(f[b"port"])))
        except (KeyError, ValueError):
            continue
    return out


@attrs.define
class ReplicaChooser:
    """Round robin over usable replicas, with a growing cool-down for those that fail."""

    _bad_until: dict[Addr, float] = attrs.field(factory=dict)
    _fails: dict[Addr, int] = attrs.field(factory=dict)
    _turn: int = 0

    def pick(self, addrs: Sequence[Addr]) -> Addr | None:
        """The next usable one of ``addrs``, or ``None`` (read from the master)."""
        now = time.monotonic()
        usable = [a for a in addrs if self._bad_until.get(a, 0.0) <= now]
        if not usable:
            return None
        self._turn += 1
        return usable[self._turn % len(usable)]

    def failed(self, addr: Addr, why: object, url: str) -> None:
        """Leave ``addr`` out for a while (logged once per streak at WARNING)."""
        n = self._fails[addr] = self._fails.get(addr, 0) + 1
        pause = min(_COOLDOWN_S * 2 ** (n - 1), _COOLDOWN_MAX_S)
        self._bad_until[addr] = time.monotonic() + pause
        (log.warning if n == 1 else log.debug)("%s: replica %s failed (%s); reading from the master for %g s",
                                               url, addr, why, pause)

    def succeeded(self, addrs: Iterable[Addr]) -> None:
        """Reads on ``addrs`` worked: their failure streaks end."""
        for a in addrs:
            self._fails.pop(a, None)
