"""Command line of the ``lm://`` server: the ``kvpipe server`` subcommand and the ``lmcache_server`` entry point.

``kvpipe server HOST PORT [cpu] [--max-size GB] [--auth-token TOKEN]``; ``lmcache_server HOST PORT [DEVICE]``
takes LMCache's positional arguments (``cpu`` is the only device) and the same options.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import anyio

from kvpipe.errors import ConfigError

__all__ = ["build_parser", "main", "register", "run"]

log = logging.getLogger(__name__)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", help="address to bind (use 127.0.0.1 unless clients are remote)")
    p.add_argument("port", type=int, help="TCP port (0 picks a free one)")
    p.add_argument("device", nargs="?", default="cpu", help="where entries live; only 'cpu' is supported")
    p.add_argument("--max-size", type=float, default=float(os.environ.get("KVPIPE_SERVER_MAX_SIZE", "4")),
                   metavar="GB", help="memory bound; least recently used entries are evicted (default 4)")
    p.add_argument("--auth-token", default=os.environ.get("KVPIPE_SERVER_AUTH_TOKEN"),
                   help="shared secret clients must send first (lm://host:port?auth_token=...); "
                        "default $KVPIPE_SERVER_AUTH_TOKEN")
    p.add_argument("--max-frame", type=float, default=None, metavar="GB",
                   help="largest accepted entry (default: --max-size)")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``server`` subcommand to the ``kvpipe`` CLI."""
    p = subparsers.add_parser("server", help="run the lm:// remote cache server (lmcache_server compatible)")
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the server until SIGINT/SIGTERM.

    :raises ConfigError: for an unsupported device, a non-positive size, or an address it cannot listen on.
    """
    from kvpipe.lm.server import LmServer, serve_forever

    if args.device != "cpu":
        raise ConfigError(f"device={args.device!r}: the lm:// server stores entries in CPU memory; use 'cpu'")
    if not args.max_size > 0:
        raise ConfigError(f"--max-size={args.max_size}: expected a positive number of GB")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"port={args.port}: expected 0..65535")
    max_frame = int(args.max_frame * (1 << 30)) if args.max_frame else None
    server = LmServer(args.host, args.port, max_size=int(args.max_size * (1 << 30)),
                      auth_token=args.auth_token or None, max_frame=max_frame)
    server.bind()  # before the event loop: an address it cannot listen on is a one-line ConfigError
    try:
        anyio.run(serve_forever, server)
    except KeyboardInterrupt:
        pass
    return 0


def build_parser(prog: str = "kvpipe-lm-server") -> argparse.ArgumentParser:
    """The stand-alone parser (``lmcache_server`` / ``kvpipe-lm-server`` / ``python -m kvpipe.lm.server``)."""
    p = argparse.ArgumentParser(prog=prog, description="kvpipe lm:// remote cache server (lmcache_server "
                                                      "compatible)")
    _add_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``lmcache_server HOST PORT [DEVICE]`` and ``kvpipe-lm-server``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "kvpipe-lm-server"
    args = build_parser(prog if prog.endswith("server") else "kvpipe-lm-server").parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=os.environ.get("KVPIPE_LOG_LEVEL", "INFO").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
