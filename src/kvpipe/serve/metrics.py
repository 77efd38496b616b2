"""Counters of ``kvpipe serve`` and their Prometheus text exposition (format 0.0.4, written by hand: a dozen
series do not justify a dependency)."""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    from kvpipe.api import CacheStats

__all__ = ["TTFT_BUCKETS", "ServeMetrics", "render_prometheus"]

# Seconds. A warm 8k-token prompt takes ~0.3 s on two cores, a cold one ~40 s.
TTFT_BUCKETS: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


@attrs.define(eq=False)
class ServeMetrics:
    """Thread-safe request counters (the engine thread writes, the HTTP loop reads)."""

    requests: dict[tuple[str, str], int] = attrs.field(factory=dict)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    hit_tokens: int = 0
    hit_tokens_by_tier: dict[str, int] = attrs.field(factory=dict)
    stored_tokens: int = 0
    ttft_bucket_counts: list[int] = attrs.field(factory=lambda: [0] * (len(TTFT_BUCKETS) + 1))
    ttft_sum: float = 0.0
    ttft_count: int = 0
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def count_request(self, endpoint: str, status: str) -> None:
        """One request to ``endpoint`` finished with ``status`` (``ok``, ``bad_request``, ``error``)."""
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def observe_generation(self, *, prompt_tokens: int, generated_tokens: int, hit_tokens: int,
                           hits_by_tier: Mapping[str, int], stored_tokens: int, ttft_s: float) -> None:
        """Record one finished generation."""
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.generated_tokens += generated_tokens
            self.hit_tokens += hit_tokens
            self.stored_tokens += stored_tokens
            for tier, n in hits_by_tier.items():
                self.hit_tokens_by_tier[tier] = self.hit_tokens_by_tier.get(tier, 0) + n
            self.ttft_bucket_counts[bisect.bisect_left(TTFT_BUCKETS, ttft_s)] += 1
            self.ttft_sum += ttft_s
            self.ttft_count += 1


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# TierStats.extra counters exported per tier, where a tier keeps them: (key, help text).
_TIER_EVENTS = (
    ("down_events", "Times a tier was marked down (refused, reset, timed out, protocol error, failover)."),
    ("dropped_while_down", "Chunk writes dropped because the tier was down."),
    ("timeouts", "Calls that ran past blocking_timeout_secs."),
    ("errors", "Calls that failed without taking the tier down."),
    ("reconnects", "Times a down tier came back."),
    ("bytes_read", "Payload bytes read from a tier."),
    ("bytes_written", "Payload bytes written to a tier."),
)


def _series(name: str, kind: str, doc: str, samples: Iterable[tuple[str, float]]) -> list[str]:
    lines = [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}"
              for labels, value in samples]
    return lines


def render_prometheus(m: ServeMetrics, stats: CacheStats | None, *, queue_depth: int, model: str) -> str:
    """The Prometheus text of the serve counters, the TTFT histogram and the cache tiers' gauges."""
    with m._lock:
        requests = dict(m.requests)
        by_tier = dict(m.hit_tokens_by_tier)
        buckets = list(m.ttft_bucket_counts)
        totals = (m.prompt_tokens, m.generated_tokens, m.hit_tokens, m.stored_tokens, m.ttft_sum, m.ttft_count)
    prompt, generated, hits, stored, ttft_sum, ttft_count = totals
    ml = f'model="{_esc(model)}"'
    out: list[str] = []
    out += _series("kvpipe_requests_total", "counter", "HTTP generation requests by endpoint and outcome.",
                   [(f'{{{ml},endpoint="{_esc(e)}",status="{_esc(s)}"}}', n) for (e, s), n in sorted(requests.items())]
                   or [(f'{{{ml},endpoint="completions",status="ok"}}', 0)])
    out += _series("kvpipe_prompt_tokens_total", "counter", "Prompt tokens processed.", [(f"{{{ml}}}", prompt)])
    out += _series("kvpipe_generation_tokens_total", "counter", "Tokens generated.", [(f"{{{ml}}}", generated)])
    out += _series("kvpipe_hit_tokens_total", "counter", "Prompt tokens served from the kvpipe cache.",
                   [(f"{{{ml}}}", hits)])
    out += _series("kvpipe_hit_tokens_by_tier_total", "counter", "Prompt tokens served, by the tier that held them.",
                   [(f'{{{ml},tier="{_esc(t)}"}}', n) for t, n in sorted(by_tier.items())])
    out += _series("kvpipe_stored_tokens_total", "counter", "Tokens whose KV was newly stored.",
                   [(f"{{{ml}}}", stored)])
    hist = ["# HELP kvpipe_ttft_seconds Time to first token, from request start.",
            "# TYPE kvpipe_ttft_seconds histogram"]
    cum = 0
    for le, n in zip([*(f"{b:g}" for b in TTFT_BUCKETS), "+Inf"], buckets):
        cum += n
        hist.append(f'kvpipe_ttft_seconds_bucket{{{ml},le="{le}"}} {cum}')
    hist += [f"kvpipe_ttft_seconds_sum{{{ml}}} {ttft_sum:g}", f"kvpipe_ttft_seconds_count{{{ml}}} {ttft_count}"]
    out += hist
    out += _series("kvpipe_queue_depth", "gauge", "Requests waiting for the model.", [(f"{{{ml}}}", queue_depth)])
    if stats is not None:
        tiers = sorted(stats.tiers.items())
        out += _series("kvpipe_tier_bytes", "gauge", "Bytes held by each cache tier.",
                       [(f'{{tier="{_esc(n)}"}}', t.bytes) for n, t in tiers])
        out += _series("kvpipe_tier_chunks", "gauge", "Chunks held by each cache tier.",
                       [(f'{{tier="{_esc(n)}"}}', t.chunks) for n, t in tiers])
        out += _series("kvpipe_tier_hits_total", "counter", "Chunk hits of each cache tier.",
                       [(f'{{tier="{_esc(n)}"}}', t.hits) for n, t in tiers])
        out += _series("kvpipe_tier_misses_total", "counter", "Chunk misses of each cache tier.",
                       [(f'{{tier="{_esc(n)}"}}', t.misses) for n, t in tiers])
        out += _series("kvpipe_tier_up", "gauge", "1 while a tier serves, 0 while it is down (a remote that cannot be "
                       "reached: misses, dropped writes, reconnecting).",
                       [(f'{{tier="{_esc(n)}"}}', int(t.available)) for n, t in tiers])
        out += _series("kvpipe_tier_puts_total", "counter", "Chunks written to each cache tier.",
                       [(f'{{tier="{_esc(n)}"}}', t.puts) for n, t in tiers])
        out += _series("kvpipe_tier_put_failures_total", "counter",
                       "Chunk writes a tier did not take (remote down, failed or full).",
                       [(f'{{tier="{_esc(n)}"}}', t.put_failures) for n, t in tiers])
        out += _series("kvpipe_tier_corrupt_total", "counter",
                       "Corrupt, truncated or foreign entries found (each was a miss and was deleted).",
                       [(f'{{tier="{_esc(n)}"}}', t.corrupt) for n, t in tiers])
        for key, doc in _TIER_EVENTS:  # the counters some tiers keep beside those (the remote tier's, mostly)
            samples = [(f'{{tier="{_esc(n)}"}}', t.extra[key]) for n, t in tiers if key in t.extra]
            if samples:
                out += _series(f"kvpipe_tier_{key}_total", "counter", doc, samples)
        out += _series("kvpipe_dropped_writes_total", "counter", "Chunk writes dropped (full write-behind queue).",
                       [("", stats.dropped_writes)])
        out += _series("kvpipe_pending_hits_total", "counter",
                       "Chunks read from a write-behind queue before their write to disk or remote landed.",
                       [("", stats.pending_hits)])
    return "\n".join(out) + "\n"
