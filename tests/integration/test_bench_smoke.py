"""``benchmarks/bench_tiers.py --quick`` runs end to end and writes its JSON (values, not speeds, are checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "bench_tiers.py"


def test_bench_tiers_quick(tmp_path: Path) -> None:
    out = tmp_path / "tiers.json"
    proc = subprocess.run([sys.executable, str(BENCH), "--quick", "--dir", str(tmp_path), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ratio cpu_store_vs_memcpy" in proc.stdout
    report = json.loads(out.read_text())
    assert report["quick"] is True
    for name in ("memcpy_gather", "cpu_store", "memcpy_scatter", "cpu_retrieve_out", "memcpy_scatter_alloc",
                 "cpu_retrieve_alloc", "store_latency_cpu_only",
                 "store_latency_with_disk", "raw_write", "disk_store_flush", "raw_cold_read", "disk_cold_read"):
        r = report["results"][name]
        assert r["n"] in (report["reps"], report["latency_reps"]) and 0 < r["median_s"] <= r["p99_s"]
    assert set(report["ratios"]) >= {"cpu_store_vs_memcpy", "disk_cold_read_vs_raw_read",
                                     "store_latency_disk_vs_cpu_only"}
    assert not list(tmp_path.glob("kvpipe-bench-*"))  # its disk files are cleaned up
