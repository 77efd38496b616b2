"""Eviction policies: which key goes first when a tier needs room. Registered through
``kvpipe_register_eviction_policies``; the CPU and disk tiers use the one named by ``cache_policy``."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterator
from typing import Protocol

import attrs

__all__ = ["EvictionPolicy", "FifoPolicy", "LruPolicy"]


class EvictionPolicy(Protocol):
    """Tracks keys; :meth:`candidates` yields them best-victim first."""

    def insert(self, key: Hashable) -> None:
        """A key was added."""
        ...

    def touch(self, key: Hashable) -> None:
        """A key was read."""
        ...

    def remove(self, key: Hashable) -> None:
        """A key was deleted or evicted (no error when absent)."""
        ...

    def candidates(self) -> Iterator[Hashable]:
        """Keys in eviction order (a snapshot: the caller may remove while iterating)."""
        ...


@attrs.define(eq=False)
class LruPolicy:
    """Least recently used first."""

    _order: OrderedDict[Hashable, None] = attrs.field(factory=OrderedDict)

    def insert(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def candidates(self) -> Iterator[Hashable]:
        return iter(list(self._order))


@attrs.define(eq=False)
class FifoPolicy(LruPolicy):
    """First in, first out: reads do not refresh a key."""

    def touch(self, key: Hashable) -> None:
        return None
