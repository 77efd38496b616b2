"""``mock://NAME?latency_ms=..&bandwidth_gbps=..``: an in-process byte store that simulates a remote's latency and
bandwidth, for tests of timing behaviour (deadlines, write-behind, prefetch) without a server.

Connectors with the same ``NAME`` share one store (a process-wide registry), so two caches in one process see each
other's entries as they would through a real remote. Each call sleeps ``latency_ms`` plus its bytes over
``bandwidth_gbps``. :meth:`MockConnector.set_down` makes calls raise :class:`TierUnavailable` (a remote outage),
and ``?fail_every=N`` fails every N-th call.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import anyio
import attrs

from kvpipe.connectors.base import GetResult, ReadInto
from kvpipe.connectors.urlopts import check_options, number_opt, split_url
from kvpipe.errors import TierUnavailable

__all__ = ["MockConnector", "MockStore", "mock_store"]

_EMPTY = memoryview(b"")


@attrs.define(eq=False)
class MockStore:
    """The shared state behind connectors of one name: entries and an outage switch."""

    entries: dict[str, tuple[bytes, bytes]] = attrs.field(factory=dict)
    down: bool = False


_STORES: dict[str, MockStore] = {}


def mock_store(name: str) -> MockStore:
    """The process-wide store called ``name`` (created on first use)."""
    return _STORES.setdefault(name, MockStore())


@attrs.define(eq=False)
class MockConnector:
    """A simulated remote (see the module docstring)."""

    url: str
    store: MockStore
    latency_s: float = 0.0
    bandwidth_bps: float = 0.0  # 0: unlimited
    fail_every: int = 0
    _calls: int = 0
    _closed: bool = False

    @classmethod
    def from_url(cls, url: str) -> MockConnector:
        """Parse ``mock://[NAME][?latency_ms=F&bandwidth_gbps=F&fail_every=N]``.

        :raises ConfigError: for a bad number or an unknown option.
        """
        parts, q = split_url(url, "mock")
        check_options(q, url, ("latency_ms", "bandwidth_gbps", "fail_every"))
        latency = number_opt(q, "latency_ms", url, 0.0, minimum=0) / 1e3
        bw = number_opt(q, "bandwidth_gbps", url, 0.0, minimum=0) * 1e9 / 8
        fail_every = int(number_opt(q, "fail_every", url, 0, minimum=0))
        name = (parts.netloc + parts.path) or "default"
        return cls(url=url, store=mock_store(name), latency_s=latency, bandwidth_bps=bw, fail_every=fail_every)

    def set_down(self, down: bool = True) -> None:
        """Simulate an outage (every call raises :class:`TierUnavailable`) or end it."""
        self.store.down = down

    async def _wire(self, nbytes: int) -> None:
        self._calls += 1
        if self._closed:
            raise TierUnavailable(f"{self.url}: connector closed")
        if self.store.down or (self.fail_every and self._calls % self.fail_every == 0):
            raise TierUnavailable(f"{self.url}: simulated outage")
        delay = self.latency_s + (nbytes / self.bandwidth_bps if self.bandwidth_bps else 0.0)
        if delay:
            await anyio.sleep(delay)
        else:
            await anyio.lowlevel.checkpoint()

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each entry is stored."""
        await self._wire(0)
        return [k in self.store.entries for k in keys]

    async def get_many(self, keys: Sequence[str], read_into: ReadInto) -> list[GetResult | None]:
        """Entries copied into ``read_into``'s buffers."""
        found = [self.store.entries.get(k) for k in keys]
        await self._wire(sum(len(e[1]) for e in found if e is not None))
        out: list[GetResult | None] = []
        for k, e in zip(keys, found, strict=True):
            if e is None:
                out.append(None)
                continue
            header, payload = e
            buf = read_into(header, k)
            if buf is None or len(payload) > len(buf):
                out.append((header, _EMPTY))
                continue
            view = buf[: len(payload)]
            view[:] = payload
            out.append((header, view))
        return out

    async def put_many(self, items: Sequence[tuple[str, bytes, memoryview]]) -> int:
        """Store copies of the entries (visible only once the simulated transfer is over)."""
        copies = [(k, bytes(h), bytes(p)) for k, h, p in items]
        await self._wire(sum(len(p) for _, _, p in copies))
        for k, h, p in copies:
            self.store.entries[k] = (h, p)
        return len(copies)

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete entries; returns how many existed."""
        await self._wire(0)
        return sum(self.store.entries.pop(k, None) is not None for k in keys)

    async def list_entries(self, pattern: str) -> list[tuple[str, int]]:
        """``(key, bytes)`` of entries matching ``pattern``."""
        await self._wire(0)
        return [(k, len(h) + len(p)) for k, (h, p) in self.store.entries.items() if fnmatch.fnmatchcase(k, pattern)]

    async def list_keys(self, pattern: str) -> list[str]:
        """Keys matching ``pattern``."""
        return [k for k, _ in await self.list_entries(pattern)]

    async def ping(self) -> None:
        """:raises TierUnavailable: during a simulated outage."""
        await self._wire(0)

    async def aclose(self) -> None:
        """Mark closed; idempotent (the shared store lives on)."""
        self._closed = True
