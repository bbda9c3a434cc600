"""The listwise (LiT5 / FIRST) students' inputs: the per-passage template, sliding windows over a ranked
list, the target permutation and rank_llm's parsing of a generated one.

Each passage of a window is one encoder input, `Search Query: {q} Passage: [{i}] {p} Relevance Ranking: `
with i = 1..n inside the window, tokenized alone and cut from the right to `passage_length` tokens (EOS
last), then padded: LiT5's Fusion-in-Decoder input. The decoder writes `[a] > [b] > ...`; in the T5 / Flan-T5
vocabulary `▁[` is one piece and every identifier 1..100 is one unprefixed piece after it, so the first
generated identifier's logits over the pieces "1".."n" rank the whole window in one step (FIRST).
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from twolar_jax.errors import OptionError
from twolar_jax.tokenizer import T5Tokenizer

TEMPLATE = "Search Query: {query} Passage: [{index}] {passage} Relevance Ranking: "
DEFAULT_WINDOW = 20
DEFAULT_STRIDE = 10
DEFAULT_PASSAGE_LENGTH = 150
MAX_IDENTIFIERS = 100  # "1".."100" are single pieces of the vocabulary
_NON_DIGITS = re.compile(r"[^0-9]")


def check_window(window: int, stride: int) -> None:
    """A window of 1..100 passages (one identifier piece each) and a stride that moves it: 1 <= stride <= window."""
    if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= MAX_IDENTIFIERS:
        raise OptionError(f"window={window!r}: must be an integer in 1..{MAX_IDENTIFIERS} (one identifier piece each)")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= window:
        raise OptionError(f"stride={stride!r}: must be an integer in 1..window={window}")


def sliding_windows(num_candidates: int, *, window: int = DEFAULT_WINDOW,
                    stride: int = DEFAULT_STRIDE) -> list[tuple[int, int]]:
    """[start, end) windows back to front, as RankGPT / rank_llm slide them: the first ends at the last
    candidate, each next one `stride` earlier, until one starts at 0 (top-100: starts 80, 70, ..., 0;
    top-30: [10, 30) then [0, 20)). Later windows see what earlier ones moved up."""
    check_window(window, stride)
    if num_candidates <= 0:
        return []
    out, end = [], num_candidates
    while True:
        start = max(0, end - window)
        out.append((start, end))
        if start == 0:
            return out
        end -= stride


def encode_passage(tokenizer: T5Tokenizer, query: str, index: int, passage: str, *,
                   passage_length: int = DEFAULT_PASSAGE_LENGTH) -> list[int]:
    """One encoder input: the template for identifier `index` (1-based), cut from the right, EOS last."""
    ids = tokenizer.encode(TEMPLATE.format(query=query, index=index, passage=passage))
    return ids[: passage_length - 1] + [tokenizer.eos_id]


def encode_window(tokenizer: T5Tokenizer, query: str, passages: Sequence[str], *, window: int,
                  passage_length: int = DEFAULT_PASSAGE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [window, passage_length] int32, passage_mask [window]) of one window; empty slots are padding."""
    if len(passages) > window:
        raise OptionError(f"{len(passages)} passages do not fit a window of {window}")
    tokens = np.zeros((window, passage_length), np.int32)
    for i, passage in enumerate(passages):
        ids = encode_passage(tokenizer, query, i + 1, passage, passage_length=passage_length)
        tokens[i, : len(ids)] = ids
    return tokens, (np.arange(window) < len(passages)).astype(np.int32)


def target_text(order: Sequence[int]) -> str:
    """The permutation as LiT5 writes it: slot indices (0-based) best first -> "[3] > [1] > [2]"."""
    return " > ".join(f"[{i + 1}]" for i in order)


def identifier_ids(tokenizer: T5Tokenizer, n: int) -> np.ndarray:
    """The vocabulary ids of the identifier pieces "1".."n" (what FIRST reads at the first step)."""
    return np.array([tokenizer.piece_to_id(str(i)) for i in range(1, n + 1)], np.int32)


def parse_permutation(text: str, n: int) -> list[int]:
    """rank_llm's parsing of a generated ranking: non-digits become spaces, identifiers minus 1, duplicates
    and out-of-range ones dropped, the passages it never named appended in input order. Always a
    permutation of range(n), whatever the model wrote."""
    seen: dict[int, None] = {}
    for token in _NON_DIGITS.sub(" ", text).split():
        index = int(token) - 1
        if 0 <= index < n:
            seen.setdefault(index, None)
    return list(seen) + [i for i in range(n) if i not in seen]


def apply_window(order: list[int], start: int, end: int, permutation: Sequence[int]) -> list[int]:
    """`order` (candidate indices, best first) with [start, end) reordered by a window's permutation."""
    window = order[start:end]
    return order[:start] + [window[i] for i in permutation] + order[end:]




# ------------------------------------------------------------------------------ training windows
# Training cuts each query's teacher-ordered candidates into windows and shuffles each window's passages, so
# that an identifier ([1]..[k], given after the shuffle) says nothing about the label. The shuffle is a
# counter-based hash, not a numpy Generator: the TF twin (data_pipeline/seqio_input/listwise.py) computes the
# same integers with int64 graph ops (every product stays below 2**63), so both sides give the same
# permutation by construction and the tests check it id for id.

MASK32 = 0xFFFFFFFF
FNV_OFFSET, FNV_PRIME = 0x811C9DC5, 0x01000193
MIX_MULTIPLIERS = (0x7FEB352D, 0x2C1B3C6D)  # odd and < 2**31: mix32 is a bijection of 32-bit integers
MIX_SHIFTS = (16, 15, 16)
DEFAULT_TARGET_LENGTH = 96  # `[1] > ... > [20]` is 80 tokens with EOS


def fnv1a32(data: bytes) -> int:
    """32-bit FNV-1a of the qid's UTF-8 bytes (a stable string hash; Python's hash() is salted)."""
    h = FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV_PRIME) & MASK32
    return h


def mix32(x: int) -> int:
    """An invertible 32-bit mixer (xor-shift, multiply): distinct inputs give distinct keys, so no ties."""
    x &= MASK32
    x ^= x >> MIX_SHIFTS[0]
    x = (x * MIX_MULTIPLIERS[0]) & MASK32
    x ^= x >> MIX_SHIFTS[1]
    x = (x * MIX_MULTIPLIERS[1]) & MASK32
    return x ^ (x >> MIX_SHIFTS[2])


def window_key(seed: int, qid: str, window_index: int) -> int:
    """The hash that decides one window's shuffle: the same (seed, qid, window) -> the same permutation."""
    h = mix32(fnv1a32(qid.encode("utf-8")))
    h = mix32(h ^ (seed & MASK32))
    return mix32(h ^ (window_index & MASK32))


def window_permutation(n: int, *, seed: int, qid: str, window_index: int) -> np.ndarray:
    """perm[slot] = the teacher position (0 = best in the window) of the passage shown at `slot`:
    the argsort of the slots' keys mix32(key ^ j), all distinct (mix32 is a bijection)."""
    key = window_key(seed, qid, window_index)
    keys = np.array([mix32(key ^ j) for j in range(n)], np.int64)
    return np.argsort(keys, kind="stable").astype(np.int32)


def training_windows(num_candidates: int, window: int) -> list[tuple[int, int]]:
    """[start, end) spans: non-overlapping chunks of `window` in teacher order (top-20, then 21-40, ...),
    each passage in one window once; a last chunk of fewer than 2 passages is dropped (no order to learn).
    Unlike `sliding_windows` (inference), no passage is seen twice in an epoch."""
    if isinstance(window, bool) or not isinstance(window, int) or not 2 <= window <= MAX_IDENTIFIERS:
        raise OptionError(f"window={window!r}: training windows need an integer in 2..{MAX_IDENTIFIERS}")
    spans = [(s, min(s + window, num_candidates)) for s in range(0, num_candidates, window)]
    return [(s, e) for s, e in spans if e - s >= 2]


def encode_target(tokenizer: T5Tokenizer, order: Sequence[int], *, target_length: int) -> np.ndarray:
    """decoder_target_tokens [target_length]: `[a] > [b] > ...` + EOS, 0-padded; too long is an error."""
    ids = tokenizer.encode(target_text(order)) + [tokenizer.eos_id]
    if len(ids) > target_length:
        raise OptionError(f"target_length={target_length}: the target of a {len(order)}-passage window needs "
                          f"{len(ids)} tokens (EOS included); raise target_length")
    out = np.zeros((target_length,), np.int32)
    out[: len(ids)] = ids
    return out


def window_examples(query: str, texts: Sequence[str], *, tokenizer: T5Tokenizer, window: int,
                    passage_length: int = DEFAULT_PASSAGE_LENGTH, target_length: int = DEFAULT_TARGET_LENGTH,
                    seed: int | None, qid: str) -> list[dict[str, np.ndarray]]:
    """One query's training windows (FID_WINDOW_BATCH features, unbatched). `texts` are in teacher order,
    best first. seed=None keeps teacher order in the slots (identifiers would leak the label: tests only)."""
    out = []
    for w, (start, end) in enumerate(training_windows(len(texts), window)):
        k = end - start
        perm = np.arange(k, dtype=np.int32) if seed is None else \
            window_permutation(k, seed=seed, qid=qid, window_index=w)
        shown = [texts[start + int(p)] for p in perm]  # identifiers 1..k are given to the shuffled slots
        tokens, mask = encode_window(tokenizer, query, shown, window=window, passage_length=passage_length)
        ranks = np.arange(window, dtype=np.int32)  # empty slots continue k..window-1, as the pointwise groups
        ranks[:k] = perm
        out.append({"encoder_input_tokens": tokens,
                    "decoder_target_tokens": encode_target(tokenizer, np.argsort(perm, kind="stable"),
                                                           target_length=target_length),
                    "teacher_ranks": ranks, "passage_mask": mask})
    return out


def check_target_length(tokenizer: T5Tokenizer, *, window: int, target_length: int) -> None:
    """Refuse, before any data is read, a target_length too short for a full window's target (every
    identifier is its own piece after `▁[`, so the length depends on the window, not on the order)."""
    encode_target(tokenizer, list(range(window)), target_length=target_length)
