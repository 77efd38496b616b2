"""Smoke test: benchmarks/bench_cachegen.py --quick (synthetic part only) runs and writes its JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_cachegen.py"


@pytest.mark.slow
def test_bench_cachegen_quick(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_cachegen", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cachegen.json"
    assert mod.main(["--quick", "--no-model", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    fp16 = data["synthetic_8b"]["float16"]
    assert fp16["ratio_vs_naive"] > 3
    assert fp16["cachegen"]["decode"]["gbps_median"] > 0
