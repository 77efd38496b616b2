"""ChunkKey / KeyPrefix: string form, parse round trip, validation."""

from __future__ import annotations

import fnmatch

import pytest

from kvpipe import ChunkKey, ConfigError, KeyPrefix

H = "0123456789abcdef" * 4


def test_string_form_and_round_trip() -> None:
    key = ChunkKey("vllm", "meta-llama/Llama-3.1-8B-Instruct", 1, 0, H, "bfloat16")
    text = key.to_string()
    assert text == f"vllm@meta-llama/Llama-3.1-8B-Instruct@1@0@{H}@bfloat16"
    assert str(key) == text
    assert ChunkKey.parse(text) == key
    assert hash(ChunkKey.parse(text)) == hash(key)


def test_prefix_makes_keys_and_a_matching_pattern() -> None:
    prefix = KeyPrefix("kvpipe", "m", 4, 3, "float16")
    key = prefix.key(H)
    assert key == ChunkKey("kvpipe", "m", 4, 3, H, "float16")
    assert key.prefix == prefix
    assert fnmatch.fnmatchcase(key.to_string(), prefix.pattern())
    other = KeyPrefix("kvpipe", "m", 4, 2, "float16").key(H)
    assert not fnmatch.fnmatchcase(other.to_string(), prefix.pattern())


def test_keys_are_values() -> None:
    a = ChunkKey("f", "m", 1, 0, H, "float16")
    assert a == ChunkKey("f", "m", 1, 0, H, "float16")
    assert a != ChunkKey("f", "m", 1, 1, H, "float16")
    assert len({a, ChunkKey("f", "m", 1, 0, H, "float16")}) == 1
    with pytest.raises(AttributeError):
        a.model = "x"  # type: ignore[misc]


@pytest.mark.parametrize("text", [
    "",
    "a@b@c",
    f"f@m@1@0@{H}",  # no dtype
    f"f@m@1@0@{H}@float16@extra",
    f"f@m@one@0@{H}@float16",
    f"f@m@1@x@{H}@float16",
    "f@m@1@0@abc@float16",  # hash too short
    f"f@m@1@0@{H.upper()}@float16",  # hash not lowercase hex
    f"f@m@0@0@{H}@float16",  # world size 0
    f"f@m@1@-1@{H}@float16",  # negative worker id
    f"@m@1@0@{H}@float16",  # empty field
    f"f@my model@1@0@{H}@float16",  # whitespace
])
def test_parse_rejects_bad_strings(text: str) -> None:
    with pytest.raises(ConfigError):
        ChunkKey.parse(text)


@pytest.mark.parametrize("kwargs", [
    {"model": "a@b"}, {"fmt": ""}, {"chunk_hash": "xyz"}, {"world_size": 0}, {"worker_id": -1},
])
def test_constructor_validates(kwargs: dict[str, object]) -> None:
    values: dict[str, object] = {"fmt": "f", "model": "m", "world_size": 1, "worker_id": 0, "chunk_hash": H,
                                 "dtype": "float16"}
    values.update(kwargs)
    with pytest.raises(ValueError):  # ConfigError for strings, attrs' ValueError for the integer bounds
        ChunkKey(**values)  # type: ignore[arg-type]
