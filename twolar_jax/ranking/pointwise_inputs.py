"""The pointwise cross-encoder's inputs: its template, truncation, the listwise group rule, and the one
path from text to features (`encode_query_document`, `PairEncoder` for scoring, `group_features` for
training batches).

Template: `Query: {query} Document: {document} Relevant:` + EOS. Reference rerankers (TWOLAR's README,
`rerankers`) tokenize the whole templated string and cut it from the end, so a long passage loses the
trailing "Relevant:" the model was trained to answer after. We cut document tokens only;
`truncation="whole"` keeps the reference behaviour for exact reproduction.

Groups: one query's candidates in teacher order, cut to N and padded. padding="mask": a shorter group stays
short and the missing rows are padding (passage_mask 0), dropped from every loss term. padding="twolar":
the group is filled with TWOLAR's literal "<padding_passage>" texts, which count as real passages ranked
after every real one (the reference code's behaviour); their teacher score is the lowest real score minus
one. Teacher ranks are 0..N-1 by position either way (the candidates are already in teacher order).

The TensorFlow input pipeline (data_pipeline.seqio_input.preprocessors) is this module's twin, built from
these constants; tests/test_data_tasks.py proves the two give identical ids.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np

from twolar_jax.errors import OptionError, TwolarError, check_choice
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH
from twolar_jax.tokenizer import T5Tokenizer, check_encodable

# The template, in the pieces the TF input pipeline joins too: "Query: {query} Document: {document} Relevant:".
QUERY_PREFIX = "Query: "
DOCUMENT_MARKER = " Document:"
SUFFIX = "Relevant:"
TEMPLATE = QUERY_PREFIX + "{query}" + DOCUMENT_MARKER + " {document} " + SUFFIX
TRUNCATION_MODES = ("document", "whole")
MIN_MAX_LENGTH = 8  # the template alone needs a few tokens
DEFAULT_MAX_LENGTH = 512

TWOLAR_PADDING_PASSAGE = "<padding_passage>"
PADDING_MODES = ("mask", "twolar")
DEFAULT_GROUP_SIZE = 30
FEATURES = LISTWISE_GROUP_BATCH.names


# ------------------------------------------------------------------------------------------ pairs
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


class PairEncoder:
    """`encode_query_document` over a stream of (query, doc) pairs, encoding the query part once per run of
    equal queries (a reranked list repeats its query 100 times). Errors name the pair's index and text."""

    def __init__(self, tokenizer: T5Tokenizer, *, max_length: int = DEFAULT_MAX_LENGTH, truncation: str = "document"):
        check_encoding_options(max_length=max_length, truncation=truncation)
        self.tokenizer, self.max_length, self.truncation = tokenizer, max_length, truncation
        self._suffix = tokenizer.encode(SUFFIX)

    def __call__(self, pairs: Iterable[tuple[str, str]]) -> Iterator[list[int]]:
        cached_query, prefix = None, []
        for i, (query, doc) in enumerate(pairs):
            try:
                if self.truncation != "document":
                    yield encode_query_document(self.tokenizer, query, doc, max_length=self.max_length,
                                                truncation=self.truncation)
                    continue
                if query != cached_query:
                    prefix, cached_query = self.tokenizer.encode(QUERY_PREFIX + query + DOCUMENT_MARKER), query
                yield assemble_pair(list(prefix), self.tokenizer.encode(doc), self._suffix,
                                    max_length=self.max_length, eos_id=self.tokenizer.eos_id)
            except TwolarError as e:
                raise OptionError(f"pair {i}: {_bad_text(query, doc, e)}") from None


def _bad_text(query: str, doc: str, error: Exception) -> str:
    """Which of the pair's texts the tokenizer refused, and why (positions within that text)."""
    for name, text in (("query", query), ("document", doc)):
        try:
            check_encodable(text)
        except OptionError as e:
            return f"{name} {short_repr(text)}: {e}"
    return f"query {short_repr(query)}, document {short_repr(doc)}: {error}"


def short_repr(text: Any, n: int = 40) -> str:
    text = repr(text)
    return text if len(text) <= n else text[:n - 3] + "..."


# ----------------------------------------------------------------------------------------- groups
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
