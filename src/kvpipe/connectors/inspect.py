"""``kvpipe inspect --remote URL``: list a remote store's chunks by model, their sizes, and delete by model or
pattern, so users need not hand-craft ``redis-cli --scan --pattern`` lines."""

from __future__ import annotations

import fnmatch
import logging
from typing import Any

import anyio

from kvpipe.config import Config
from kvpipe.connectors.plugin import connector_for_url
from kvpipe.errors import ConfigError, TierError
from kvpipe.keys import ChunkKey

__all__ = ["inspect_remote"]

log = logging.getLogger(__name__)


def _safe(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2].split('?')[0]}"


async def inspect_remote(url: str, config: Config, *, model: str | None = None, delete: bool = False,
                         pattern: str | None = None) -> dict[str, Any]:
    """A report of the chunks stored at ``url``: ``{"url", "chunks", "bytes", "groups": [{model, dtype,
    world_size, worker_id, fmt, chunks, bytes}], "other_keys", "deleted"}``.

    ``model`` and ``pattern`` (a glob over the key string ``fmt@model@world@worker@hash@dtype``) select entries;
    with ``delete`` the selected entries are deleted (both parts). Every call runs under
    ``blocking_timeout_secs`` (at least 30 s: a listing scans the whole store).

    :raises ConfigError: for a URL no built-in connector serves.
    :raises TierError: when the remote cannot be reached.
    """
    conn = connector_for_url(url, config)
    if conn is None:
        raise ConfigError(f"inspect --remote: no connector for {url!r} (redis://, redis-sentinel://, "
                          "redis-cluster://, valkey://, unix://, lm://, mooncakestore://, mock://)")
    glob = pattern or (f"*@{model}@*" if model else "*")
    timeout = max(30.0, float(config.blocking_timeout_secs))
    try:
        with anyio.fail_after(timeout):
            lister = getattr(conn, "list_entries", None)
            if lister is not None:
                entries: list[tuple[str, int | None]] = list(await lister(glob))
            else:
                entries = [(k, None) for k in await conn.list_keys(glob)]
            groups: dict[tuple[str, str, str, int, int], dict[str, Any]] = {}
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
                g["chunks"] += 1
                g["bytes"] += size or 0
                total += size or 0
            deleted = 0
            if delete and selected:
                for i in range(0, len(selected), 1000):
                    deleted += await conn.delete_many(selected[i : i + 1000])
    except TimeoutError:
        raise TierError(f"inspect --remote {_safe(url)}: no answer within {timeout:g} s") from None
    finally:
        with anyio.CancelScope(shield=True):
            await conn.aclose()
    log.info("inspect %s: %d chunks, %d bytes, %d deleted", _safe(url), len(selected), total, deleted)
    return {"url": _safe(url), "chunks": len(selected), "bytes": total, "groups": list(groups.values()),
            "other_keys": other[:100], "deleted": deleted}
