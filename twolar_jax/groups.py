"""Listwise groups: one query's candidates in teacher order, cut to N and padded (the one place for the rule).

A group keeps the teacher's top N candidates. padding="mask": a shorter group stays short and the
missing rows are padding (passage_mask 0), dropped from every loss term. padding="twolar": the group is
filled with TWOLAR's literal "<padding_passage>" texts, which count as real passages ranked after every
real one (the reference code's behaviour); their teacher score is the lowest real score minus one.
Teacher ranks are 0..N-1 by position either way (the candidates are already in teacher order).
The TF input pipeline (data_pipeline.seqio_input) applies the same rule with these constants.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from twolar_jax.errors import OptionError, check_choice
from twolar_jax.tokenizer import encode_query_document

TWOLAR_PADDING_PASSAGE = "<padding_passage>"
PADDING_MODES = ("mask", "twolar")
DEFAULT_GROUP_SIZE = 30
FEATURES = ("encoder_input_tokens", "teacher_ranks", "passage_mask", "teacher_scores")


def check_group_options(*, group_size: int, padding: str) -> None:
    check_choice("padding", padding, PADDING_MODES)
    if not isinstance(group_size, int) or group_size < 1:
        raise OptionError(f"group_size={group_size!r}: need at least one passage per group")


def group_texts(texts: Sequence[str], group_size: int, *, padding: str = "mask") -> list[str]:
    """The texts of one group: the first `group_size`, filled with padding passages in "twolar" mode."""
    check_group_options(group_size=group_size, padding=padding)
    kept = list(texts[:group_size])
    if padding == "twolar":
        kept += [TWOLAR_PADDING_PASSAGE] * (group_size - len(kept))
    return kept


def group_features(query: str, texts: Sequence[str], teacher_scores: Optional[Sequence[float]], *, tokenizer: Any,
                   group_size: int, max_length: int, truncation: str = "document",
                   padding: str = "mask") -> dict[str, np.ndarray]:
    """One query's model features, unbatched: tokens [N, L], teacher_ranks, passage_mask, teacher_scores [N]."""
    kept = group_texts(texts, group_size, padding=padding)
    tokens = np.zeros((group_size, max_length), np.int32)
    for i, text in enumerate(kept):
        ids = encode_query_document(tokenizer, query, text, max_length=max_length, truncation=truncation)
        tokens[i, : len(ids)] = ids
    scores = np.zeros((group_size,), np.float32)
    if teacher_scores is not None:
        real = np.asarray(teacher_scores[:group_size], np.float32)
        scores[: len(real)] = real
        if padding == "twolar" and len(real):
            scores[len(real):len(kept)] = real.min() - 1.0
    return {
        "encoder_input_tokens": tokens,
        "teacher_ranks": np.arange(group_size, dtype=np.int32),
        "passage_mask": (np.arange(group_size) < len(kept)).astype(np.int32),
        "teacher_scores": scores,
    }
