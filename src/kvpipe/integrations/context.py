"""Long prompts of an exact token count from real text, for the demo, the benchmarks and the tests.

The text shipped in ``kvpipe/data/harbor_report.txt`` is an original report written for kvpipe (about 2,400 tokens
with SmolLM2's tokenizer); longer prompts repeat it as numbered copies, so the prompt stays real prose.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvpipe.errors import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["DEFAULT_QUESTION", "SAMPLE_TEXT", "build_prompt_ids", "read_context", "sample_text"]

SAMPLE_TEXT = "harbor_report.txt"
DEFAULT_QUESTION = "How many turbines does the Kestrel Bay station have, and what is the rated power of each one?"
_PLACEHOLDER = "\x00KVPIPE-CONTEXT\x00"


def sample_text() -> str:
    """The text of the report shipped with kvpipe."""
    return importlib.resources.files("kvpipe").joinpath("data", SAMPLE_TEXT).read_text(encoding="utf-8")


def read_context(path: str | Path | None) -> str:
    """The context text: the file at ``path``, or the shipped report when ``path`` is ``None``.

    :raises ConfigError: when the file cannot be read or is empty.
    """
    if path is None:
        return sample_text()
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ConfigError(f"--context {path}: cannot read it ({exc.strerror or exc})") from None
    if not text.strip():
        raise ConfigError(f"--context {path}: the file is empty")
    return text


def _context_ids(tokenizer: PreTrainedTokenizerBase, text: str, n: int) -> list[int]:
    ids: list[int] = list(tokenizer(text, add_special_tokens=False).input_ids)
    if not ids:
        raise ConfigError("context: the text has no tokens")
    out = list(ids)
    copy = 2
    while len(out) < n:
        sep = tokenizer(f"\n\n(Copy {copy} of the text follows.)\n\n", add_special_tokens=False).input_ids
        out += list(sep) + ids
        copy += 1
    return out[:n]


def build_prompt_ids(tokenizer: PreTrainedTokenizerBase, num_tokens: int, *, question: str = DEFAULT_QUESTION,
                     text: str | None = None, system: str | None = None) -> list[int]:
    """Token ids of a chat prompt of exactly ``num_tokens`` tokens: the document (``text``, default the shipped
    report, cut or repeated to fit) followed by ``question``, rendered with the tokenizer's chat template (plain
    text without one). The document comes first, so two prompts with the same ``num_tokens`` and text share every
    token before the question: the prefix kvpipe caches.

    :raises ConfigError: when ``num_tokens`` is too small to hold the template and the question.
    """
    text = sample_text() if text is None else text
    user = f"Read this document and answer the question after it.\n\n{_PLACEHOLDER}\n\nQuestion: {question}"
    if getattr(tokenizer, "chat_template", None):
        messages: Sequence[dict[str, str]] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}]
        rendered = str(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))
    else:
        rendered = f"{user}\n\nAnswer:"
    before, after = rendered.split(_PLACEHOLDER)
    head = list(tokenizer(before, add_special_tokens=not getattr(tokenizer, "chat_template", None)).input_ids)
    tail = list(tokenizer(after, add_special_tokens=False).input_ids)
    room = num_tokens - len(head) - len(tail)
    if room < 1:
        raise ConfigError(f"--tokens {num_tokens}: too small for the prompt template and the question "
                          f"({len(head) + len(tail)} tokens); use at least {len(head) + len(tail) + 1}")
    return head + _context_ids(tokenizer, text, room) + tail
