"""Smoke test: ``benchmarks/bench_ttft.py --quick`` runs and writes its JSON and plot (values, never durations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_ttft.py"


def test_bench_ttft_quick(tmp_path: Path) -> None:
    out, png = tmp_path / "ttft.json", tmp_path / "ttft.png"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--out", str(out),
                          "--plot", str(png)], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert [r["prompt_tokens"] for r in doc["results"]] == [1024, 2048]
    for r in doc["results"]:
        assert r["warm_cpu"]["hits_by_tier"] == {"cpu": r["prompt_tokens"]}
        assert r["warm_disk"]["hits_by_tier"] == {"disk": r["prompt_tokens"]}
        assert r["speedup_cpu"] > 0 and "miss_overhead_pct" in r
    assert png.stat().st_size > 1000
