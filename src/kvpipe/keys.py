"""Chunk keys: what names one chunk of KV in every tier, process and machine."""

from __future__ import annotations

import re

import attrs

from kvpipe.errors import ConfigError

__all__ = ["ChunkKey", "KeyPrefix"]

_FIELD_RE = re.compile(r"^[^@\s]+$")
_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


def _no_at(_inst: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not _FIELD_RE.match(value):
        raise ConfigError(f"{attribute.name}={value!r}: expected a non-empty string without '@' or whitespace")


@attrs.frozen(cache_hash=True)
class KeyPrefix:
    """The part of a key that is the same for every chunk of one engine: format, model, world size, worker id
    and KV dtype. Built once at set-up; ``key(chunk_hash)`` makes each chunk's key."""

    fmt: str = attrs.field(validator=_no_at)
    model: str = attrs.field(validator=_no_at)
    world_size: int = attrs.field(validator=attrs.validators.ge(1))
    worker_id: int = attrs.field(validator=attrs.validators.ge(0))
    dtype: str = attrs.field(validator=_no_at)

    def key(self, chunk_hash: str) -> ChunkKey:
        """The key of the chunk whose prefix-chained digest (hex) is ``chunk_hash``."""
        return ChunkKey(self.fmt, self.model, self.world_size, self.worker_id, chunk_hash, self.dtype)

    def pattern(self) -> str:
        """A glob matching every key of this prefix (for ``SCAN MATCH`` and listings)."""
        return f"{self.fmt}@{self.model}@{self.world_size}@{self.worker_id}@*@{self.dtype}"


@attrs.frozen(cache_hash=True)
class ChunkKey:
    """The key of one chunk: ``fmt@model@world_size@worker_id@chunk_hash@dtype``.

    ``chunk_hash`` is the hex sha256 prefix-chained digest from :mod:`kvpipe.hashing`, so a key depends on every
    token before and inside its chunk, and is identical in every process.
    """

    fmt: str = attrs.field(validator=_no_at)
    model: str = attrs.field(validator=_no_at)
    world_size: int = attrs.field(validator=attrs.validators.ge(1))
    worker_id: int = attrs.field(validator=attrs.validators.ge(0))
    chunk_hash: str = attrs.field()
    dtype: str = attrs.field(validator=_no_at)

    @chunk_hash.validator
    def _check_hash(self, _attribute: attrs.Attribute[str], value: str) -> None:
        if not _HASH_RE.match(value):
            raise ConfigError(f"chunk_hash={value!r}: expected 64 lowercase hex digits")

    def to_string(self) -> str:
        """The string form, as stored in every tier (Redis keys, file names, ``lm://`` keys)."""
        return f"{self.fmt}@{self.model}@{self.world_size}@{self.worker_id}@{self.chunk_hash}@{self.dtype}"

    def __str__(self) -> str:
        return self.to_string()

    @property
    def prefix(self) -> KeyPrefix:
        """Everything but the chunk hash."""
        return KeyPrefix(self.fmt, self.model, self.world_size, self.worker_id, self.dtype)

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Inverse of :meth:`to_string`.

        :raises ConfigError: when ``text`` is not a key string.
        """
        parts = text.split("@")
        if len(parts) != 6:
            raise ConfigError(f"chunk key {text!r}: expected fmt@model@world_size@worker_id@hash@dtype")
        fmt, model, world, worker, chunk_hash, dtype = parts
        try:
            world_size, worker_id = int(world), int(worker)
        except ValueError:
            raise ConfigError(f"chunk key {text!r}: world_size and worker_id must be integers") from None
        try:
            return cls(fmt, model, world_size, worker_id, chunk_hash, dtype)
        except ConfigError:
            raise
        except ValueError as exc:  # attrs' ge() validators raise plain ValueError (world_size 0, worker_id -1)
            raise ConfigError(f"chunk key {text!r}: {exc}") from None
