"""The T5 / Flan-T5 SentencePiece vocabulary (a model's templates live with the model: twolar_jax.ranking)."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import sentencepiece as spm

from twolar_jax.errors import MissingFileError, OptionError
from twolar_jax.resources import SPIECE_MODEL

EXTRA_IDS = 100
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
