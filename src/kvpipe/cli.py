"""The ``kvpipe`` command line: ``config show``, ``inspect`` and the subcommands of the feature modules in
``COMMAND_MODULES`` (each exposes ``register(subparsers)``). User mistakes print one line, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvpipe.config import Config, known_keys
from kvpipe.errors import KvpipeError

__all__ = ["COMMAND_MODULES", "main"]

# Modules that add subcommands; a module that cannot be imported (an optional extra not installed) leaves its
# command out rather than breaking the rest of the CLI.
COMMAND_MODULES: list[str] = [
    "kvpipe.lm.cli",
    "kvpipe.integrations.demo",
    "kvpipe.serve.cli",
]

log = logging.getLogger("kvpipe.cli")


def _setup_logging() -> None:
    level = os.environ.get("KVPIPE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=getattr(logging, level, logging.INFO),
                        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _config_show(args: argparse.Namespace) -> int:
    from kvpipe.api import check_remote_url

    cfg = Config.load(args.config)
    check_remote_url(cfg)  # a malformed remote URL is reported now, not when an engine first opens the cache
    docs = known_keys()
    rows = [(k, v, cfg.source_of(k)) for k, v in cfg.as_dict().items()]
    if args.json:
        print(json.dumps({k: {"value": _jsonable(v), "source": s} for k, v, s in rows}, indent=2))
        return 0
    width = max(len(k) for k, _, _ in rows)
    for k, v, s in rows:
        if args.all or s != "default":
            print(f"{k:<{width}}  {_fmt(v):<28}  {s}")
        elif args.verbose:
            print(f"{k:<{width}}  {_fmt(v):<28}  default  # {docs[k]}")
    if not args.all and not args.verbose:
        print(f"({sum(s == 'default' for _, _, s in rows)} keys at their defaults; --all to list them)")
    return 0


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ", ".join(str(x) for x in v) + "]"
    return "None" if v is None else str(v)


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def _inspect(args: argparse.Namespace) -> int:
    from kvpipe.inspect import inspect_disk, print_report

    if args.url and (args.delete or args.all):
        raise KvpipeError("inspect --url reads a running cache's statistics; --delete goes with DIR or --remote")
    if args.delete and not (args.model or args.pattern or args.all):
        # One word too few must not empty a shared store: other engines' and other models' entries live there too.
        raise KvpipeError("inspect --delete with no --model or --pattern would delete every entry; "
                          "add --all to mean that")
    if args.all and not args.delete:
        raise KvpipeError("inspect --all only goes with --delete (it confirms deleting every entry)")
    if args.all and (args.model or args.pattern):
        raise KvpipeError("inspect --delete --all deletes every entry: leave out --model/--pattern, or --all")
    if args.url:
        report = _fetch_stats(args.url)
    elif args.remote:
        try:
            from kvpipe.connectors.inspect import inspect_remote
        except ImportError:
            raise KvpipeError("inspect --remote: the remote connectors are not installed") from None
        import anyio

        cfg = Config.load(args.config)
        report = anyio.run(lambda: inspect_remote(args.remote, cfg, model=args.model, delete=args.delete,
                                                  pattern=args.pattern, verify=args.verify))
    else:
        target = args.path or str(Config.load(args.config).local_disk_path or "")
        if not target:
            raise KvpipeError("inspect: give a disk directory, --remote URL, or a config with local_disk")
        report = inspect_disk(Path(target), model=args.model, verify=args.verify, delete=args.delete)
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_report(report)
    return 0


def _fetch_stats(url: str) -> dict[str, Any]:
    """The statistics of a running cache (``kvpipe serve``) from ``URL/kvpipe/stats``."""
    import urllib.error
    import urllib.request

    if not url.startswith(("http://", "https://")):
        raise KvpipeError(f"inspect --url: expected http://host:port, got {url!r}")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/kvpipe/stats", timeout=10) as resp:  # noqa: S310
            stats = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise KvpipeError(f"inspect --url: cannot read {url}/kvpipe/stats: {exc}") from None
    tiers = stats.get("tiers", {})
    return {"url": url, "chunks": sum(t.get("chunks", 0) for t in tiers.values()),
            "bytes": sum(t.get("bytes", 0) for t in tiers.values()), "groups": [],
            "tiers": {n: {k: t.get(k) for k in ("chunks", "bytes", "hits", "misses", "puts", "corrupt",
                                                   "evictions", "available")} for n, t in tiers.items()},
            "stats": stats}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="kvpipe", description="kvpipe: a KV-cache layer for LLM engines.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_cfg = sub.add_parser("config", help="show the effective configuration")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", metavar="ACTION")
    cfg_sub.required = True
    p_show = cfg_sub.add_parser("show", help="the effective config and where each value came from")
    p_show.add_argument("--config", help="YAML file (default: $KVPIPE_CONFIG_FILE or $LMCACHE_CONFIG_FILE)")
    p_show.add_argument("--all", action="store_true", help="also list keys at their defaults")
    p_show.add_argument("-v", "--verbose", action="store_true", help="describe the keys at their defaults")
    p_show.add_argument("--json", action="store_true", help="print JSON")
    p_show.set_defaults(func=_config_show)

    p_insp = sub.add_parser("inspect", help="chunks, bytes and counters of a disk directory or remote store")
    p_insp.add_argument("path", nargs="?", help="disk tier directory (default: local_disk of the config)")
    p_insp.add_argument("--remote", metavar="URL", help="inspect a remote store (redis://, lm://, ...)")
    p_insp.add_argument("--url", help="a running cache: kvpipe serve's base URL (reads /kvpipe/stats)")
    p_insp.add_argument("--config", help="YAML config file")
    p_insp.add_argument("--model", help="only entries of this model")
    p_insp.add_argument("--pattern", help="only keys matching this glob (remote)")
    p_insp.add_argument("--verify", action="store_true",
                        help="read every entry and check its header, key and checksum (remote: also counts tokens)")
    p_insp.add_argument("--delete", action="store_true",
                        help="delete the selected entries (with no --model/--pattern: only with --all)")
    p_insp.add_argument("--all", action="store_true", help="with --delete and no filter: delete every entry")
    p_insp.add_argument("--json", action="store_true", help="print JSON")
    p_insp.set_defaults(func=_inspect)

    for modname in COMMAND_MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError as exc:
            log.debug("kvpipe: subcommands of %s unavailable: %s", modname, exc)
            continue
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvpipe`` command."""
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvpipeError as exc:
        print(f"kvpipe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
