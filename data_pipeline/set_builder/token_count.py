"""Counting the teacher's tokens without calling it: tiktoken for OpenAI models, else the T5 vocabulary.

Why: `twolar-build --dry_run` prices a build before any paid call, and the real build needs the same
count when a server's response carries no `usage`. tiktoken downloads its BPE files at run time, and a
build machine may have no internet, so its file is only used when it is already on disk
($TIKTOKEN_CACHE_DIR, $DATA_GYM_CACHE_DIR or <tmp>/data-gym-cache, tiktoken's own cache); otherwise
(and for any model that is not OpenAI's) the count is the shipped T5 SentencePiece vocabulary's, an
estimate, and the counter's `name` says which was used and why. Nothing here makes a network call.

A chat prompt counts as OpenAI's cookbook counts one: 3 tokens per message plus its role and content,
plus 3 for the reply's priming.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from twolar_jax.errors import check_choice

log = logging.getLogger(__name__)

KINDS = ("auto", "tiktoken", "t5_spiece")
TOKENS_PER_MESSAGE = 3
REPLY_PRIMING = 3
_OPENAI_PREFIXES = ("gpt-", "chatgpt", "o1", "o3", "o4", "text-davinci", "davinci", "babbage")
_BPE_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"


class TokenCounter:
    """A named text -> token count function, and the chat-prompt count built on it."""

    def __init__(self, name: str, count: Callable[[str], int]):
        self.name = name
        self._count = count

    def text(self, text: str) -> int:
        """Tokens in one string (no special tokens)."""
        return self._count(text) if text else 0

    def messages(self, messages: Sequence[Mapping[str, str]]) -> int:
        """Tokens of one chat request: per message 3 + role + content, then 3 for the reply's priming."""
        total = REPLY_PRIMING
        for m in messages:
            total += TOKENS_PER_MESSAGE + self.text(str(m.get("role", ""))) + self.text(str(m.get("content", "")))
        return total


def is_openai_model(model: str) -> bool:
    """Whether `model` names an OpenAI model (tiktoken knows its encoding)."""
    return model.lower().startswith(_OPENAI_PREFIXES)


def _cache_dirs() -> list[Path]:
    """Where tiktoken itself looks for downloaded BPE files, in its order."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return [Path(os.environ[var])]
    return [Path(tempfile.gettempdir()) / "data-gym-cache"]


def tiktoken_file(encoding: str) -> Optional[Path]:
    """The encoding's BPE file in tiktoken's cache, or None: tiktoken would have to download it."""
    key = hashlib.sha1(_BPE_URL.format(name=encoding).encode()).hexdigest()
    for folder in _cache_dirs():
        if (folder / key).is_file():
            return folder / key
    return None


def tiktoken_counter(model: str) -> tuple[Optional[TokenCounter], str]:
    """(counter, "") when tiktoken can count for `model` offline, else (None, why not)."""
    try:
        import tiktoken

        encoding = tiktoken.encoding_name_for_model(model)
    except (ImportError, KeyError):
        return None, "no_tiktoken_encoding"
    if tiktoken_file(encoding) is None:
        return None, f"no_offline_tiktoken_file:{encoding}"
    try:
        enc = tiktoken.get_encoding(encoding)
    except Exception as e:  # a corrupt cache file: never fail a dry run for it
        return None, f"tiktoken_failed:{type(e).__name__}"
    return TokenCounter(f"tiktoken:{encoding}", lambda s: len(enc.encode(s, disallowed_special=()))), ""


def t5_counter(note: str = "") -> TokenCounter:
    """The shipped T5 SentencePiece vocabulary's count: the documented estimate for other servers."""
    from twolar_jax.tokenizer import T5Tokenizer

    tok = T5Tokenizer()
    return TokenCounter(f"t5_spiece({note})" if note else "t5_spiece", lambda s: len(tok.encode(s)))


def counter_for_model(model: str, kind: str = "auto") -> TokenCounter:
    """tiktoken for an OpenAI model (or kind='tiktoken') when offline-ready, else T5 with the reason in its name."""
    check_choice("token_counter", kind, KINDS)
    if kind == "t5_spiece" or (kind == "auto" and not is_openai_model(model)):
        return t5_counter()
    counter, why = tiktoken_counter(model if kind == "auto" or is_openai_model(model) else "gpt-4o")
    if counter is None:
        log.warning("token counts for %s are estimates with the T5 vocabulary (%s)", model, why)
        return t5_counter(why)
    return counter
