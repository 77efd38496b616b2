"""A lean RESP2 codec over :class:`~kvpipe.connectors.sockio.SocketIO`, for the Redis connector's data path.

Why not redis-py for values: its hiredis ``pack_command`` copies a 4 MiB value into the command (~0.4 GB/s SET
here) and its reader allocates a fresh ``bytes`` per GET (~0.8 GB/s). Here a command is a list of buffers (small
arguments packed together, big ones passed by reference to ``sendmsg``), and a bulk reply can be received straight
into a caller's buffer (:func:`read_bulk_into`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from kvpipe.connectors.sockio import Buffer, Digest, SocketIO
from kvpipe.errors import ProtocolError, TierError, TierUnavailable

__all__ = ["UNAVAILABLE_KINDS", "BulkTarget", "RespError", "check_reply", "encode_command", "read_bulk_into",
           "read_reply"]

# Arguments larger than this are sent as their own buffer instead of being copied into the command header.
_INLINE_MAX = 16 << 10
_MAX_LINE = 1 << 20
# Replies read whole (everything but payloads, which go through read_bulk_into): entry headers, counts, SCAN pages,
# INFO or CLUSTER text. A length beyond these is not a sane reply (a stream out of step, another service at the
# address) and must not make this process allocate it: a reply "$1000000000000" raised MemoryError to the engine.
_MAX_BULK = 64 << 20
_MAX_ARRAY = 1 << 20
# Error replies that say the server cannot serve now (a failover, a load, a cluster change), not that the request
# is wrong: the tier treats them as the remote being down.
UNAVAILABLE_KINDS = frozenset({"READONLY", "LOADING", "MASTERDOWN", "CLUSTERDOWN", "TRYAGAIN", "NOREPLICAS", "BUSY"})

# ``target(length) -> buffer of at least ``length`` bytes to receive into, or None to discard``.
BulkTarget = Callable[[int], "memoryview | None"]


@attrs.frozen
class RespError:
    """An error reply (``-ERR ...``), returned as a value so a pipeline can read the replies after it."""

    message: str

    @property
    def kind(self) -> str:
        """The first word: ``ERR``, ``READONLY``, ``MOVED``, ``OOM``, ..."""
        return self.message.split(" ", 1)[0]


def check_reply(reply: Any, what: str) -> Any:
    """``reply``, or raise for an error reply: :data:`UNAVAILABLE_KINDS` as :class:`TierUnavailable`, others as
    :class:`TierError` (``what`` names the request)."""
    if isinstance(reply, RespError):
        if reply.kind in UNAVAILABLE_KINDS:
            raise TierUnavailable(f"{what}: {reply.message}")
        raise TierError(f"{what}: {reply.message}")
    return reply


def encode_command(*args: str | bytes | int | Buffer) -> list[Buffer]:
    """A command as buffers for :meth:`SocketIO.send_all`: big arguments are referenced, never copied."""
    out: list[Buffer] = []
    cur = bytearray(b"*%d\r\n" % len(args))
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        n = a.nbytes if isinstance(a, memoryview) else len(a)
        cur += b"$%d\r\n" % n
        if n > _INLINE_MAX:
            out.append(cur)
            out.append(a)
            cur = bytearray(b"\r\n")
        else:
            cur += a
            cur += b"\r\n"
    out.append(cur)
    return out


async def read_reply(io: SocketIO) -> Any:
    """One complete reply (bytes, int, None, a list of replies); error replies come back as :class:`RespError`.

    :raises ProtocolError: on bytes that are not RESP2.  :raises OSError: on a broken connection.
    """
    try:
        line = await io.readline(_MAX_LINE)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if not line:
        raise ProtocolError("empty RESP line")
    t, rest = line[:1], line[1:]
    try:
        if t == b"+":
            return rest
        if t == b"-":
            return RespError(rest.decode(errors="replace"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = _length(rest, _MAX_BULK, "bulk reply")
            if n < 0:
                return None
            data = await io.read_exactly(n + 2)
            if data[-2:] != b"\r\n":
                raise ProtocolError("bulk reply not terminated by CRLF")
            return data[:-2]
        if t == b"*":
            n = _length(rest, _MAX_ARRAY, "array reply")
            if n < 0:
                return None
            return [await read_reply(io) for _ in range(n)]
    except ValueError:
        raise ProtocolError(f"bad RESP line {line[:40]!r}") from None
    raise ProtocolError(f"unexpected RESP type {t!r}")


def _length(rest: bytes, limit: int, what: str) -> int:
    """A bulk or array length: -1 (nil) or 0..``limit``. :raises ProtocolError: otherwise. :raises ValueError:
    when it is not a number."""
    n = int(rest)
    if n < -1 or n > limit:
        raise ProtocolError(f"{what} of {n} {'bytes' if what.startswith('bulk') else 'items'} (a length of -1 or "
                            f"up to {limit} expected)")
    return n


async def read_bulk_into(io: SocketIO, target: BulkTarget, digest: Digest | None = None,
                         on_header: Callable[[], Awaitable[None]] | None = None
                         ) -> tuple[int, memoryview | None] | RespError:
    """Read one bulk reply into ``target(length)``'s buffer.

    Returns ``(length, view)``: ``length`` -1 for a nil reply; ``view`` the filled part of the buffer, or ``None``
    when the target refused it or was too small (the bytes were then discarded). ``digest`` is updated with the
    payload as it arrives (see :meth:`SocketIO.read_into`). ``on_header`` is awaited once the reply's first line
    has arrived, before its payload is read (whatever the reply is): the moment to ask for the next big value.

    :raises ProtocolError: on a reply that is not a bulk string or an error.
    """
    line = await io.readline(_MAX_LINE)
    if on_header is not None:
        await on_header()
    t = line[:1]
    if t == b"-":
        return RespError(line[1:].decode(errors="replace"))
    if t != b"$":
        raise ProtocolError(f"expected a bulk reply, got {line[:40]!r}")
    try:
        n = int(line[1:])
    except ValueError:
        raise ProtocolError(f"bad bulk length {line[:40]!r}") from None
    if n < -1:
        raise ProtocolError(f"bad bulk length {line[:40]!r}")
    if n < 0:
        return -1, None
    buf = target(n)
    if buf is None or len(buf) < n:
        await io.skip(n + 2)
        return n, None
    view = buf[:n]
    await io.read_into(view, digest)
    if await io.read_exactly(2) != b"\r\n":
        raise ProtocolError("bulk reply not terminated by CRLF")
    return n, view
