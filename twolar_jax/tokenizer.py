"""The T5 / Flan-T5 SentencePiece vocabulary and the reranking template with document-only truncation.

Reference rerankers (TWOLAR's README, `rerankers`) tokenize the whole templated string and cut it from
the end, so a long passage loses the trailing "Relevant:" the model was trained to answer after. We cut
document tokens only; `truncation="whole"` keeps the reference behaviour for exact reproduction.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from twolar_jax.errors import MissingFileError, OptionError, check_choice
from twolar_jax.resources import SPIECE_MODEL

EXTRA_IDS = 100
# The template, in the pieces the TF input pipeline joins too (data_pipeline imports them from here):
# "Query: {query} Document: {document} Relevant:".
QUERY_PREFIX = "Query: "
DOCUMENT_MARKER = " Document:"
SUFFIX = "Relevant:"
TEMPLATE = QUERY_PREFIX + "{query}" + DOCUMENT_MARKER + " {document} " + SUFFIX
TRUNCATION_MODES = ("document", "whole")
MIN_MAX_LENGTH = 8  # the template alone needs a few tokens
DEFAULT_MAX_LENGTH = 512
_EXTRA_ID = re.compile(r"^<extra_id_(\d+)>$")


class T5Tokenizer:
    """sentencepiece plus T5's 100 sentinel ids (<extra_id_0> is the last id, 32099)."""

    pad_id = 0
    eos_id = 1
    unk_id = 2

    def __init__(self, path: str | os.PathLike | None = None, *, extra_ids: int = EXTRA_IDS) -> None:
        self.path = Path(path) if path is not None else SPIECE_MODEL
        if not self.path.exists():
            raise MissingFileError(f"{self.path}: SentencePiece model not found")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        self.extra_ids = extra_ids
        self.base_vocab_size = self._sp.get_piece_size()
        self.vocab_size = self.base_vocab_size + extra_ids

    def encode(self, text: str) -> list[int]:
        """Token ids without EOS."""
        if not isinstance(text, str):
            raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
        try:
            return self._sp.encode(text)
        except (RuntimeError, TypeError):  # sentencepiece's pybind cast fails on text that is not valid UTF-8
            check_encodable(text)
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return self._sp.encode(texts)
        except (RuntimeError, TypeError):
            for i, text in enumerate(texts):
                if not isinstance(text, str):
                    raise TypeError(f"text {i}: expected a str to tokenize, got {type(text).__name__}") from None
                try:
                    check_encodable(text)
                except OptionError as e:
                    raise OptionError(f"text {i}: {e}") from None
            raise

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if ids and self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return self._sp.decode([i for i in ids if 0 < i < self.base_vocab_size])

    def piece_to_id(self, piece: str) -> int:
        match = _EXTRA_ID.match(piece)
        if match:
            n = int(match.group(1))
            if n >= self.extra_ids:
                raise KeyError(f"{piece}: only {self.extra_ids} extra ids")
            return self.vocab_size - 1 - n
        token_id = self._sp.piece_to_id(piece)
        if token_id == self.unk_id and piece != self._sp.id_to_piece(self.unk_id):
            raise KeyError(f"piece {piece!r} is not in the vocabulary {self.path}")
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        if self.base_vocab_size <= token_id < self.vocab_size:
            return f"<extra_id_{self.vocab_size - 1 - token_id}>"
        return self._sp.id_to_piece(int(token_id))


def check_encodable(text: str) -> None:
    """Raise a one-line OptionError where `text` cannot be UTF-8 (a lone surrogate, e.g. from a bad decode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raise OptionError(f"character {e.start} ({bad!r}) is a lone surrogate, not valid Unicode text; decode the "
                          "input with errors='replace' (or drop such characters) before tokenizing") from None


def assemble_pair(prefix: list[int], document: list[int], suffix: list[int], *, max_length: int,
                  eos_id: int = 1) -> list[int]:
    """prefix + document cut to the budget + suffix + EOS; cuts the query only if even that cannot fit."""
    budget = max_length - len(prefix) - len(suffix) - 1
    if budget < 0:
        # A query longer than the window: keep its start, the "Document:" marker is lost with it.
        prefix = prefix[: max(0, max_length - len(suffix) - 1)]
        budget = 0
    return prefix + document[:budget] + suffix + [eos_id]


def check_encoding_options(*, max_length: int, truncation: str) -> None:
    """Refuse a truncation mode or max_length the template cannot work with, naming the option."""
    check_choice("truncation", truncation, TRUNCATION_MODES)
    if not isinstance(max_length, int) or max_length < MIN_MAX_LENGTH:
        raise OptionError(f"max_length={max_length!r} is too small for the template (need >= {MIN_MAX_LENGTH})")


def encode_query_document(tokenizer: T5Tokenizer, query: str, document: str, *, max_length: int = DEFAULT_MAX_LENGTH,
                          truncation: str = "document") -> list[int]:
    """Token ids of `Query: {q} Document: {d} Relevant:` + EOS, at most max_length long."""
    check_encoding_options(max_length=max_length, truncation=truncation)
    if truncation == "whole":
        ids = tokenizer.encode(TEMPLATE.format(query=query, document=document))
        return ids[: max_length - 1] + [tokenizer.eos_id]
    return assemble_pair(tokenizer.encode(QUERY_PREFIX + query + DOCUMENT_MARKER), tokenizer.encode(document),
                         tokenizer.encode(SUFFIX), max_length=max_length, eos_id=tokenizer.eos_id)
