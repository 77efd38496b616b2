"""The remote connector contract: a byte store keyed by strings, under the remote tier.

A connector moves an entry as two parts, LMCache's layout: ``<key>metadata`` (the 80-byte entry header) and
``<key>kv_bytes`` (the payload). The remote tier (:mod:`kvpipe.tiers.remote`) does serde, validation, deadlines
and the down/up state machine; a connector only moves bytes and raises :class:`~kvpipe.errors.TierUnavailable`
when the remote cannot be reached.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable, Sequence
from contextvars import ContextVar
from typing import Protocol, TypeVar, runtime_checkable

import anyio

__all__ = ["CALL_DEADLINE", "Connector", "Entry", "GetResult", "ReadInto", "aiter_of", "call_deadline"]

# The deadline (``anyio.current_time()`` clock) of the remote tier's call in progress in this task: the tier sets it
# around each connector call. What a connector blames on a server (a cluster node given its share of the time, a
# replica left out for a while) is measured against this, never against ``anyio.current_effective_deadline()``: that
# also counts the caller's own scopes, and an engine that gives up on a lookup after 1 ms (or aborts a request)
# says nothing about the servers.
CALL_DEADLINE: ContextVar[float] = ContextVar("kvpipe_call_deadline", default=math.inf)


def call_deadline() -> float:
    """The tier call's deadline (see ``CALL_DEADLINE``); outside a tier call (a connector used on its own), the
    nearest deadline of the caller's scopes."""
    d = CALL_DEADLINE.get()
    return d if d != math.inf else anyio.current_effective_deadline()

T = TypeVar("T")
# ``(key, header_bytes, payload)``: one entry as ``put_many`` takes it.
Entry = tuple[str, bytes, memoryview]


async def aiter_of(items: Iterable[T]) -> AsyncIterator[T]:
    """``items`` as an async iterator (what a ``put_stream`` takes)."""
    for it in items:
        yield it

# ``(header, payload)`` or ``(header, payload, xxh3_64 of the payload computed while receiving it)``.
GetResult = tuple[bytes, memoryview] | tuple[bytes, memoryview, int]


class ReadInto(Protocol):
    """``read_into(header_bytes, key=None) -> writable buffer of the payload's size, or None to skip``: lets a
    connector receive a payload straight into pool memory once it has seen the header. A connector that may read
    a batch out of order (concurrently from several nodes) passes the entry's ``key``; without it the tier matches
    the header to a requested key by its key fingerprint."""

    def __call__(self, header: bytes, key: str | None = None, /) -> memoryview | None: ...


@runtime_checkable
class Connector(Protocol):
    """An async byte store. Keys are entry key strings (``ChunkKey.to_string()``)."""

    url: str

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether a complete entry (header and payload) is stored under each key."""
        ...

    async def get_many(self, keys: Sequence[str], read_into: ReadInto) -> list[GetResult | None]:
        """For each key, ``(header_bytes, payload_view)`` or ``None`` for a miss.

        The payload lands in the buffer ``read_into(header_bytes)`` returned (``payload_view`` is that buffer,
        possibly shorter when the stored payload is truncated); when ``read_into`` returns ``None`` the entry is a
        miss. A connector that hashed the payload while receiving it (``kvpipe.serde.entry.payload_digest``)
        returns ``(header_bytes, payload_view, checksum)`` and the tier does not hash it again.
        """
        ...

    async def put_many(self, items: Sequence[Entry]) -> int:
        """Store ``(key, header_bytes, payload)`` entries so that a reader never sees half of one; return how many
        were stored.

        Optional, beside it: ``async put_stream(items: AsyncIterator[Entry]) -> int``, the same for entries that
        come one at a time. A connector that has it sends each entry as it comes, so the tier's work on the next
        entry (its checksum) overlaps the remote taking in this one; without it the tier collects a batch and
        calls ``put_many``."""
        ...

    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete entries (both parts); return how many existed."""
        ...

    async def list_keys(self, pattern: str) -> list[str]:
        """Entry keys matching a glob ``pattern``."""
        ...

    async def ping(self) -> None:
        """Round-trip to the remote. :raises TierUnavailable: when it cannot be reached."""
        ...

    async def aclose(self) -> None:
        """Close connections; idempotent."""
        ...
