"""``kvpipe demo`` with the real model and a small prompt: query twice (cold, then warm from the CPU tier); a second
run in a new process finds the prompt in the disk tier."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def _demo(config_file: Path, *extra: str, **env_extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVPIPE_LOG_LEVEL": "INFO", **env_extra}
    return subprocess.run([sys.executable, "-m", "kvpipe.cli", "demo", "--tokens", "600", "--max-new-tokens", "6",
                           "--config", str(config_file), *extra], capture_output=True, text=True, env=env,
                          timeout=600)


def _field(out: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}:\s+(.*)$", out, re.MULTILINE)
    assert m, f"no {name!r} line in:\n{out}"
    return m.group(1)


def test_demo_queries_twice_and_reuses_the_prompt(config_file: Path) -> None:
    run = _demo(config_file)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout
    assert _field(out, "prompt tokens") == "600"
    assert _field(out, "query 1 TTFT").endswith("s (cold)")
    assert _field(out, "query 2 TTFT").endswith("s (warm)")
    assert re.fullmatch(r"[0-9.]+x", _field(out, "speedup"))
    assert _field(out, "hit tokens").startswith("512 of 600 from kvpipe [cpu 512]")
    assert _field(out, "answers identical") == "True"
    # The core's per-request INFO lines reach the demo's output.
    assert "kvpipe hit tokens: 512" in run.stderr
    assert "Storing KV cache for 512 out of 600 tokens" in run.stderr

    # A new process over the same disk directory: the first query is already a hit, from disk.
    again = _demo(config_file)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "cached by an earlier run [disk 512]" in _field(again.stdout, "query 1 TTFT")

    cleared = _demo(config_file, "--clear")
    assert cleared.returncode == 0, cleared.stderr[-3000:]
    assert _field(cleared.stdout, "query 1 TTFT").endswith("s (cold)")


def test_demo_reports_bad_options_in_one_line(config_file: Path, tmp_path: Path) -> None:
    run = _demo(config_file, "--context", str(tmp_path / "missing.txt"))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("kvpipe: error: --context")

    # A bad config value is reported before the model is loaded (no spinner line for it), in one line.
    bad = _demo(config_file, KVPIPE_LOCAL_CPU_TRANSPARENT_HUGEPAGES="maybe")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("kvpipe: error: local_cpu_transparent_hugepages: got 'maybe', "
                                                   "expected true or false")
    assert "loading the model" not in bad.stdout + bad.stderr
