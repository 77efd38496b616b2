"""What is in a disk tier directory: chunks and bytes per model, optionally verified or deleted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kvpipe.errors import ConfigError, CorruptEntry
from kvpipe.serde.entry import HEADER_SIZE, EntryHeader
from kvpipe.tiers.disk import _key_of

__all__ = ["inspect_disk", "print_report"]


def inspect_disk(root: Path, *, model: str | None = None, verify: bool = False,
                 delete: bool = False) -> dict[str, Any]:
    """A report of the entry files under ``root``: per model (and dtype/world size) the chunk count and bytes;
    with ``verify`` every entry's header and checksum are checked; with ``delete`` the selected entries go.

    :raises ConfigError: when ``root`` is not a directory.
    """
    if not root.is_dir():
        raise ConfigError(f"inspect: {str(root)!r} is not a directory")
    groups: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    deleted = 0
    other = 0
    with os.scandir(root) as it:
        for de in it:
            key = _key_of(de.name)
            if key is None:
                other += 1
                continue
            if model is not None and key.model != model:
                continue
            size = de.stat().st_size
            g = groups.setdefault(f"{key.fmt}@{key.model}@{key.world_size}@{key.worker_id}@*@{key.dtype}",
                                  {"model": key.model, "dtype": key.dtype, "world_size": key.world_size,
                                   "worker_id": key.worker_id, "chunks": 0, "bytes": 0, "tokens": 0})
            g["chunks"] += 1
            g["bytes"] += size
            try:  # the header is 80 bytes: always read it, for token counts and bad entries
                with open(de.path, "rb") as f:
                    head = f.read(HEADER_SIZE)
                    hdr = EntryHeader.from_bytes(head)
                    hdr.check_key(key)
                    g["tokens"] += hdr.num_tokens
                    if verify:
                        data = f.read()
                        hdr.check_payload(data, len(data))
            except (CorruptEntry, OSError) as exc:
                bad.append(f"{de.name}: {exc}")
            if delete:
                os.unlink(de.path)
                deleted += 1
    return {"path": str(root), "groups": list(groups.values()),
            "chunks": sum(g["chunks"] for g in groups.values()), "bytes": sum(g["bytes"] for g in groups.values()),
            "bad_entries": bad, "other_files": other, "deleted": deleted, "verified": verify}


def print_report(report: dict[str, Any]) -> None:
    """Print an inspect report as a table."""
    where = report.get("path") or report.get("url")
    print(f"{where}: {report['chunks']} chunks, {report['bytes'] / 1e6:.1f} MB")
    for g in report.get("groups", []):
        # a remote listing knows token counts only when it read the entries (--verify)
        tokens = f"{g['tokens']} tokens, " if "tokens" in g else ""
        print(f"  model={g['model']} dtype={g.get('dtype')} world_size={g.get('world_size')} "
              f"worker={g.get('worker_id')}: {g['chunks']} chunks, {tokens}{g['bytes'] / 1e6:.1f} MB")
    srv = report.get("server")
    if srv:
        cap = f"of {srv['maxmemory'] / 1e6:.1f} MB" if srv.get("maxmemory") else "(no maxmemory)"
        policy = f" ({srv['maxmemory_policy']})" if srv.get("maxmemory_policy") else ""
        masters = f" on {srv['masters']} masters" if srv.get("masters", 1) > 1 else ""
        print(f"  server: {srv['used_memory'] / 1e6:.1f} MB used {cap}{policy}{masters}, "
              f"{srv.get('evicted_keys', 0)} keys evicted")
    bad = report.get("bad_entries", [])
    for line in bad:
        print(f"  BAD {line}")
    if report.get("verified"):
        print(f"  verified {report['chunks']} entries: {len(bad)} bad")
    if report.get("deleted"):
        print(f"  deleted {report['deleted']} entries")
    for name, stats in report.get("tiers", {}).items():
        print(f"  tier {name}: {stats}")
