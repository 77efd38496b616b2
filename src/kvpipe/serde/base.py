"""The serde contract: a chunk tensor ⇄ one payload (the header is common, see :mod:`kvpipe.serde.entry`)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

__all__ = ["Serde"]


@runtime_checkable
class Serde(Protocol):
    """Turns one KV chunk ``[layers, 2|1, tokens, ...]`` into a payload and back.

    ``raw`` serdes (``naive``) have payload bytes equal to the tensor's bytes, so tiers may read a payload straight
    into the destination tensor's memory and skip :meth:`decode_into`.
    """

    name: str
    lossless: bool
    raw: bool

    def encode(self, kv: torch.Tensor) -> memoryview:
        """The payload for ``kv`` (a view of ``kv``'s memory where possible; never pickle)."""
        ...

    def decode_into(self, payload: memoryview, out: torch.Tensor) -> None:
        """Decode ``payload`` into ``out`` (preallocated with the header's shape and dtype).

        :raises CorruptEntry: when the payload cannot be decoded.
        """
        ...
