"""``naive``: the payload is the tensor's raw bytes (zero-copy on encode for contiguous CPU tensors)."""

from __future__ import annotations

import attrs
import torch

from kvpipe.errors import CorruptEntry

__all__ = ["NaiveSerde", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A flat byte view of a contiguous CPU tensor's memory (no copy)."""
    if not t.is_contiguous() or t.device.type != "cpu":
        t = t.contiguous().cpu()
    return memoryview(t.view(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


@attrs.define(eq=False)
class NaiveSerde:
    """Raw bytes: encode is a view, decode a single copy (or none when the tier reads into place)."""

    name: str = "naive"
    lossless: bool = True
    raw: bool = True

    def encode(self, kv: torch.Tensor) -> memoryview:
        """A view of ``kv``'s bytes (a copy only when ``kv`` is not contiguous or not on the CPU)."""
        return tensor_bytes(kv)

    def decode_into(self, payload: memoryview, out: torch.Tensor) -> None:
        """Copy the payload into ``out``.

        :raises CorruptEntry: when the payload size does not match ``out``.
        """
        dst = tensor_bytes(out)
        if len(payload) != len(dst):
            raise CorruptEntry(f"naive payload is {len(payload)} bytes, expected {len(dst)}")
        dst[:] = payload
