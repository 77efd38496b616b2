"""``kvpipe inspect --remote URL``: list a remote store's chunks by model, their sizes, verify them (``--verify``:
read every entry, check its header, key and checksum, count its tokens), and delete by model or pattern, so users
need not hand-craft ``redis-cli --scan --pattern`` lines."""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import anyio

from kvpipe.config import Config
from kvpipe.connectors.base import Connector
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.connectors.redis import RedisConnector
from kvpipe.errors import ConfigError, CorruptEntry, TierError
from kvpipe.keys import ChunkKey
from kvpipe.serde.entry import EntryHeader

__all__ = ["inspect_remote"]

log = logging.getLogger(__name__)

# --verify reads entries in batches of at most this many listed bytes (and _VERIFY_BATCH entries): memory for the
# payloads of one batch at a time. A header that claims more than _VERIFY_MAX_PAYLOAD is reported, not allocated.
_VERIFY_BATCH_BYTES = 64 << 20
_VERIFY_BATCH = 64
_VERIFY_MAX_PAYLOAD = 4 << 30


def _safe(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2].split('?')[0]}"


async def _verify_batch(conn: Connector, keys: list[str], tokens: dict[str, int], bad: list[str]) -> None:
    """Read entries ``keys`` whole and check them as the remote tier does (header, key fingerprint, payload length
    and checksum): each intact one's token count goes to ``tokens``, each bad one to ``bad`` as ``"key: why"``."""

    def read_into(header: bytes, _key: str | None = None, /) -> memoryview | None:
        try:
            n = EntryHeader.from_bytes(header).payload_len
        except CorruptEntry:
            return None  # reported below, from the header the connector hands back
        return memoryview(bytearray(n)) if n <= _VERIFY_MAX_PAYLOAD else None

    results = await conn.get_many(keys, read_into)
    for k, res in zip(keys, results, strict=True):
        if res is None:
            # gone since the listing, or half an entry (the connector deletes a half entry it finds)
            bad.append(f"{k}: missing (gone since the listing, or half an entry)")
            continue
        try:
            hdr = EntryHeader.from_bytes(res[0])
            hdr.check_key(k)
            if hdr.payload_len > _VERIFY_MAX_PAYLOAD:
                raise CorruptEntry(f"header claims a {hdr.payload_len}-byte payload")
            hdr.check_payload(res[1], len(res[1]), res[2] if len(res) == 3 else None)  # type: ignore[misc]
        except CorruptEntry as exc:
            bad.append(f"{k}: {exc}")
            continue
        tokens[k] = hdr.num_tokens


async def inspect_remote(url: str, config: Config, *, model: str | None = None, delete: bool = False,
                         pattern: str | None = None, verify: bool = False) -> dict[str, Any]:
    """A report of the chunks stored at ``url``: ``{"url", "chunks", "bytes", "groups": [{model, dtype,
    world_size, worker_id, fmt, chunks, bytes[, tokens]}], "other_keys", "deleted", "verified", "bad_entries"}``.

    ``model`` and ``pattern`` (a glob over the key string ``fmt@model@world@worker@hash@dtype``) select entries;
    with ``verify`` each selected entry is read whole and checked (header, key, length, checksum): the groups
    count the tokens of the intact ones and ``bad_entries`` lists the others (``"key: why"``; nothing is deleted
    for it, except half entries, which any read cleans up); with ``delete`` the selected entries are deleted (both
    parts). The listing runs under ``blocking_timeout_secs`` (at least 30 s: it scans the whole store), and so
    does each batch of reads or deletes.

    :raises ConfigError: for a URL no built-in connector serves.
    :raises TierError: when the remote cannot be reached.
    """
    conn = connector_for_url(url, config)
    if conn is None:
        raise ConfigError(f"inspect --remote: no connector for {url!r} (redis://, redis-sentinel://, "
                          "redis-cluster://, valkey://, unix://, lm://, mooncakestore://, mock://)")
    if isinstance(conn, RedisConnector):
        # Entries are listed on the masters; verify reads them there too, not from a replica that may lag behind
        # (an entry written a moment ago, or deleted, would be reported wrongly)
        conn.read_from_replicas = False
    glob = pattern or (f"*@{model}@*" if model else "*")
    timeout = max(30.0, float(config.blocking_timeout_secs))
    tokens: dict[str, int] = {}
    bad: list[str] = []
    try:
        with anyio.fail_after(timeout):
            lister = getattr(conn, "list_entries", None)
            if lister is not None:
                entries: list[tuple[str, int | None]] = list(await lister(glob))
            else:
                entries = [(k, None) for k in await conn.list_keys(glob)]
        groups: dict[tuple[str, str, str, int, int], dict[str, Any]] = {}
        group_of: dict[str, dict[str, Any]] = {}
        other: list[str] = []
        selected: list[str] = []
        total = 0
        for key, size in sorted(entries):
            if pattern and not fnmatch.fnmatchcase(key, pattern):
                continue
            try:
                ck = ChunkKey.parse(key)
            except ConfigError:
                other.append(key)
                continue
            if model is not None and ck.model != model:
                continue
            selected.append(key)
            g = groups.setdefault((ck.fmt, ck.model, ck.dtype, ck.world_size, ck.worker_id),
                                  {"fmt": ck.fmt, "model": ck.model, "dtype": ck.dtype,
                                   "world_size": ck.world_size, "worker_id": ck.worker_id, "chunks": 0,
                                   "bytes": 0})
            group_of[key] = g
            g["chunks"] += 1
            g["bytes"] += size or 0
            total += size or 0
        if verify:
            sizes = dict(entries)
            batch: list[str] = []
            nbytes = 0
            for i, key in enumerate(selected):
                batch.append(key)
                nbytes += sizes.get(key) or 0
                if nbytes >= _VERIFY_BATCH_BYTES or len(batch) >= _VERIFY_BATCH or i == len(selected) - 1:
                    with anyio.fail_after(timeout):
                        await _verify_batch(conn, batch, tokens, bad)
                    batch, nbytes = [], 0
            for g in groups.values():
                g["tokens"] = 0
            for key, n in tokens.items():
                group_of[key]["tokens"] += n
        server: dict[str, Any] | None = None
        info = getattr(conn, "server_info", None)
        if info is not None:  # the store's memory and evictions: what `redis-cli INFO memory` users look at
            try:
                with anyio.fail_after(timeout):
                    server = await info()
            except (TierError, OSError, TimeoutError, ValueError) as exc:  # extra figures: never fail the listing
                log.debug("inspect %s: no server info: %s", _safe(url), exc)
        deleted = 0
        for i in range(0, len(selected) if delete else 0, 1000):
            with anyio.fail_after(timeout):
                deleted += await conn.delete_many(selected[i : i + 1000])
    except TimeoutError:
        raise TierError(f"inspect --remote {_safe(url)}: no answer within {timeout:g} s") from None
    finally:
        with anyio.CancelScope(shield=True):
            await conn.aclose()
    log.info("inspect %s: %d chunks, %d bytes, %d deleted%s", _safe(url), len(selected), total, deleted,
             f", {len(bad)} bad" if verify else "")
    return {"url": _safe(url), "chunks": len(selected), "bytes": total, "groups": list(groups.values()),
            "other_keys": other[:100], "deleted": deleted, "verified": verify, "bad_entries": bad,
            "server": server}
