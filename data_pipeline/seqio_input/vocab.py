"""The seqio vocabulary of the student: T5 / Flan-T5 SentencePiece with 100 extra ids (32,100 ids).

The same spiece.model as twolar_jax.tokenizer, so TF and Python tokenization agree id for id
(tests/test_data_tasks.py checks it).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Union

import seqio

from data_pipeline.seqio_input.tf_env import tf  # noqa: F401  (hides accelerators before seqio touches TF)
from twolar_jax.errors import MissingFileError
from twolar_jax.resources import SPIECE_MODEL
from twolar_jax.tokenizer import EXTRA_IDS


@functools.lru_cache(maxsize=8)
def _cached(path: str, extra_ids: int) -> seqio.SentencePieceVocabulary:
    if not Path(path).exists():
        raise MissingFileError(f"{path}: SentencePiece model not found")
    return seqio.SentencePieceVocabulary(path, extra_ids=extra_ids)


def get_vocabulary(path: Optional[Union[str, os.PathLike]] = None,
                   extra_ids: int = EXTRA_IDS) -> seqio.SentencePieceVocabulary:
    """One shared vocabulary object per (path, extra_ids): loading the model proto is not free."""
    return _cached(str(path or SPIECE_MODEL), extra_ids)
