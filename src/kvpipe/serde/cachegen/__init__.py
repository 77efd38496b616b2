"""CacheGen (SIGCOMM'24) for kvpipe: anchor/delta quantization along tokens, per-layer bins, per-table entropy
coding, in a versioned binary container. Select it with ``remote_serde: cachegen``."""

from __future__ import annotations

from kvpipe.serde.cachegen.container import Container
from kvpipe.serde.cachegen.serde import CacheGenSerde, create_cachegen_serde

__all__ = ["CacheGenSerde", "Container", "create_cachegen_serde"]
