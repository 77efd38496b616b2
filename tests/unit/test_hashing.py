"""Prefix-chained chunk hashing: chaining, spans, token input types, and identical digests in every process."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures_core import make_tokens
from kvpipe.hashing import HASH_VERSION, SEED_DIGEST, as_token_array, chunk_spans, prefix_hashes


def _hashes(tokens: object, chunk: int = 16, partial: bool = False) -> list[str]:
    arr = as_token_array(tokens)  # type: ignore[arg-type]
    return prefix_hashes(arr, chunk_spans(len(arr), chunk, keep_partial=partial))


def test_known_answer() -> None:
    """The scheme is part of the on-disk and remote format: a change must bump HASH_VERSION (and this test)."""
    assert HASH_VERSION == 1
    assert _hashes(list(range(512)), chunk=256) == [
        "c00a80f8693750c676d3c9f210f355463b8aba7c2377557424052af0a795868b",
        "cdae0865d18872fcaccb9cdf28eed7777f5526570e6ec9b910d9556ddd46f5ec",
    ]


def test_chunk_spans() -> None:
    assert chunk_spans(40, 16, keep_partial=False) == [(0, 16), (16, 32)]
    assert chunk_spans(40, 16, keep_partial=True) == [(0, 16), (16, 32), (32, 40)]
    assert chunk_spans(32, 16, keep_partial=True) == [(0, 16), (16, 32)]
    assert chunk_spans(10, 16, keep_partial=False) == []
    assert chunk_spans(0, 16, keep_partial=True) == []


def test_changing_token_zero_changes_every_key() -> None:
    tokens = make_tokens(80)
    changed = [tokens[0] + 1, *tokens[1:]]
    a, b = _hashes(tokens), _hashes(changed)
    assert len(a) == 5
    assert all(x != y for x, y in zip(a, b))


def test_changing_a_later_token_keeps_earlier_keys() -> None:
    tokens = make_tokens(80)
    changed = list(tokens)
    changed[40] += 1  # inside chunk 2
    a, b = _hashes(tokens), _hashes(changed)
    assert a[:2] == b[:2]
    assert all(x != y for x, y in zip(a[2:], b[2:]))


def test_prefix_keys_are_a_prefix() -> None:
    tokens = make_tokens(80)
    assert _hashes(tokens[:48]) == _hashes(tokens)[:3]


def test_digests_are_distinct_and_hex() -> None:
    hs = _hashes([7] * 160)  # identical chunk contents still get distinct keys (chained)
    assert len(set(hs)) == len(hs) == 10
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in hs)
    assert len(SEED_DIGEST) == 32


def test_partial_chunk_key_differs_from_full() -> None:
    tokens = make_tokens(40)
    assert _hashes(tokens, partial=True)[:2] == _hashes(tokens)
    assert len(_hashes(tokens, partial=True)) == 3


@pytest.mark.parametrize("convert", [
    lambda t: torch.tensor(t, dtype=torch.int64),
    lambda t: torch.tensor(t, dtype=torch.int32),
    lambda t: torch.tensor(t, dtype=torch.int64)[::1],
    lambda t: torch.tensor([0, *t])[1:],  # a view with an offset
    lambda t: np.array(t, dtype=np.int64),
    lambda t: np.array(t, dtype=np.int32),
    lambda t: np.array(t, dtype=">i8"),  # big-endian input
    lambda t: tuple(t),
], ids=["tensor64", "tensor32", "tensor-view", "tensor-offset", "numpy64", "numpy32", "numpy-be", "tuple"])
def test_list_tensor_numpy_give_the_same_keys(convert: object) -> None:
    tokens = make_tokens(64, seed=3)
    assert _hashes(convert(tokens)) == _hashes(tokens)  # type: ignore[operator]


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4), torch.zeros(4, dtype=torch.bool),
                                 np.zeros((2, 2), dtype=np.int64), [0.5, 1.5]])
def test_bad_token_inputs(bad: object) -> None:
    with pytest.raises(ValueError, match="tokens"):
        as_token_array(bad)  # type: ignore[arg-type]


def test_empty_tokens() -> None:
    assert as_token_array([]).shape == (0,)
    assert _hashes([]) == []

