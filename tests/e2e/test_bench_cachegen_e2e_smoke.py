"""Smoke test: ``benchmarks/bench_cachegen_e2e.py --quick`` runs against a real ``kvpipe server`` and writes its
JSON; both serdes are served from the remote tier and CacheGen moves fewer bytes (values, never durations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "bench_cachegen_e2e.py"


def test_bench_cachegen_e2e_quick(tmp_path: Path) -> None:
    out = tmp_path / "cachegen_e2e.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    [r] = doc["results"]
    assert r["prompt_tokens"] == 1024
    assert set(r["serdes"]) == {"naive", "cachegen"}
    for name, s in r["serdes"].items():
        assert s["remote_serde"] == name
        assert s["warm_remote"]["hit_tokens"] > 0
        assert s["warm_remote"]["hits_by_tier"] == {"remote": s["warm_remote"]["hit_tokens"]}
        assert s["bytes"]["server_put"] > 0 and s["bytes"]["server_get_one_warm_request"] > 0
    naive, cg = r["serdes"]["naive"], r["serdes"]["cachegen"]
    assert cg["bytes"]["server_put"] < naive["bytes"]["server_put"]
    assert cg["bytes"]["server_get_one_warm_request"] < naive["bytes"]["server_get_one_warm_request"]
    # naive is lossless: a warm request reproduces the cold one's greedy tokens exactly.
    assert naive["agreement"]["warm_equals_cold_16"]
