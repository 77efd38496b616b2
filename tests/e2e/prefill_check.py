"""What the real-model tests compare: a restored prefill's logits against a full prefill's."""

from __future__ import annotations

import torch

PROMPT_TOKENS = 600  # 2 full chunks of 256 (512 tokens) + 88 in a partial chunk that is recomputed
ATOL = 1e-4


def assert_same_logits(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within ``ATOL`` everywhere, and the same argmax."""
    assert got.shape == want.shape
    assert float((got - want).abs().max()) <= ATOL
    assert int(got.argmax()) == int(want.argmax())
