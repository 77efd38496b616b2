"""Keys are the same in every process: two interpreters with different ``PYTHONHASHSEED`` agree with this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from kvpipe.hashing import as_token_array, chunk_spans, prefix_hashes


def _hashes(tokens: list[int], chunk: int, partial: bool) -> list[str]:
    arr = as_token_array(tokens)
    return prefix_hashes(arr, chunk_spans(len(arr), chunk, keep_partial=partial))


_CHILD = """
import json, sys
from kvpipe.hashing import as_token_array, chunk_spans, prefix_hashes
from kvpipe.keys import KeyPrefix
tokens = list(range(1000, 1000 + 600))
arr = as_token_array(tokens)
hs = prefix_hashes(arr, chunk_spans(len(arr), 256, keep_partial=True))
print(json.dumps([KeyPrefix("kvpipe", "m", 1, 0, "float16").key(h).to_string() for h in hs]))
"""


def test_identical_in_subprocesses_with_different_hash_seeds() -> None:
    outs = []
    for seed in ("0", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120,
                              check=True)
        outs.append(json.loads(proc.stdout))
    assert outs[0] == outs[1]
    assert len(outs[0]) == 3
    here = _hashes(list(range(1000, 1600)), chunk=256, partial=True)
    assert [k.split("@")[4] for k in outs[0]] == here
