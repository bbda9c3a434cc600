"""The three query sources of TWOLAR's distillation set, and how they are mixed.

Why: the paper trains on 10K "cropped" queries (a sentence cut from a passage) and 10K docT5query
queries (sampled from a T5 that writes a query for a passage); original training queries are the
ablation baseline. Every source is deterministic given its seed, and duplicates (after normalising
case, spaces and end punctuation) are dropped across all sources.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Mapping, Protocol, Sequence

from retrieval.corpus import Corpus
from retrieval.readers import read_queries
from twolar_jax.durable_io import atomic_writer, read_jsonl
from twolar_jax.errors import FormatError, OptionError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Query:
    qid: str
    text: str
    query_type: str
    source_docid: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, obj: Mapping) -> "Query":
        return cls(str(obj["qid"]), str(obj["text"]), str(obj["query_type"]), obj.get("source_docid"))


def normalize_query(text: str) -> str:
    """The key used for dedupe: lower case, single spaces, no surrounding punctuation."""
    text = " ".join(text.lower().split())
    return text.strip(" .,;:!?\"'()[]")


# Tokens ending in "." that do not end a sentence (checked case-insensitively, without the dot).
_ABBREVIATIONS = frozenset(
    "e.g i.e et al etc vs fig figs eq eqs ref refs no nos vol approx ca cf dr mr mrs ms prof st jr sr inc ltd co "
    "u.s u.k jan feb mar apr jun jul aug sep sept oct nov dec".split()
)
_SENT_END = re.compile(r"(?<=[.!?])([\"')\]]*)\s+(?=[\"'(\[]?[A-Z0-9])")


def split_sentences(text: str) -> list[str]:
    """Split on ., ! or ? followed by space and a capital letter or digit; not after a known
    abbreviation ("e.g.", "et al.", "Fig.") or a single-letter initial ("J. Smith"); decimals such as
    "3.5" never split (no space after the dot)."""
    text = " ".join(text.split())
    if not text:
        return []
    sentences, start = [], 0
    for m in _SENT_END.finditer(text):
        candidate = text[start:m.start()]
        last = candidate.rsplit(" ", 1)[-1].rstrip(".!?").lower()
        if candidate.endswith(".") and (last in _ABBREVIATIONS or re.fullmatch(r"[a-z]", last)):
            continue
        sentences.append(text[start:m.start() + len(m.group(1))].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return [s for s in sentences if s]


@dataclasses.dataclass
class SourceStats:
    generated: int = 0
    duplicates: int = 0
    skipped_empty: int = 0
    skipped_length: int = 0
    docs_used: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class QuerySource(Protocol):
    """`generate(corpus, n, seed=, seen=)` returns up to n new queries whose normalised text is not in
    `seen` (and adds theirs to it), plus counts."""

    query_type: str

    def generate(self, corpus: Corpus, n: int | None, *, seed: int, seen: set[str]) -> tuple[list[Query], SourceStats]:
        ...


def _shuffled_ids(corpus: Corpus, seed: int) -> list[str]:
    ids = list(corpus)
    random.Random(seed).shuffle(ids)
    return ids


class CroppedSentences:
    """One sentence of `min_words`..`max_words` words, chosen at random from each of a seeded shuffle of
    the passages, becomes a query (qid "crop-<docid>"). Passages with no such sentence are skipped."""

    query_type = "crop"

    def __init__(self, *, min_words: int = 4, max_words: int = 32, include_title: bool = False):
        if not 1 <= min_words <= max_words:
            raise OptionError(f"CroppedSentences: need 1 <= min_words <= max_words, got {min_words}, {max_words}")
        self.min_words, self.max_words, self.include_title = min_words, max_words, include_title

    def generate(self, corpus: Corpus, n: int | None, *, seed: int, seen: set[str]) -> tuple[list[Query], SourceStats]:
        rng = random.Random(seed + 1)
        stats, out = SourceStats(), []
        for docid in _shuffled_ids(corpus, seed):
            if n is not None and len(out) >= n:
                break
            passage = corpus[docid]
            text = f"{passage.title}. {passage.text}" if self.include_title and passage.title else passage.text
            stats.docs_used += 1
            sentences = [s for s in split_sentences(text) if self.min_words <= len(s.split()) <= self.max_words]
            if not sentences:
                stats.skipped_length += 1
                continue
            sentence = sentences[rng.randrange(len(sentences))]
            key = normalize_query(sentence)
            if not key:
                stats.skipped_empty += 1
                continue
            if key in seen:
                stats.duplicates += 1
                continue
            seen.add(key)
            out.append(Query(f"crop-{docid}", sentence, self.query_type, docid))
        stats.generated = len(out)
        return out, stats


class DocT5Query:
    """docT5query: a local doc2query T5 checkpoint (HF layout, loaded with the foundation's converter)
    samples `samples_per_doc` queries per passage with top-k sampling, `batch_size` passages per jitted
    call (fixed shapes: one compile). Deterministic for a given seed, checkpoint and device kind."""

    query_type = "doct5query"

    def __init__(
        self,
        *,
        checkpoint_path: str,
        tokenizer_path: str | None = None,
        top_k: int = 10,
        temperature: float = 1.0,
        samples_per_doc: int = 1,
        batch_size: int = 32,
        max_input_length: int = 256,
        max_decode_length: int = 48,
        min_words: int = 2,
    ):
        self.checkpoint_path, self.tokenizer_path = checkpoint_path, tokenizer_path
        self.top_k, self.temperature = top_k, temperature
        self.samples_per_doc, self.batch_size = samples_per_doc, batch_size
        self.max_input_length, self.max_decode_length = max_input_length, max_decode_length
        self.min_words = min_words

    def _tokenizer(self):
        from twolar_jax.tokenizer import T5Tokenizer

        path = self.tokenizer_path
        if path is None and (Path(self.checkpoint_path) / "spiece.model").is_file():
            path = str(Path(self.checkpoint_path) / "spiece.model")
        return T5Tokenizer(path)

    def generate(self, corpus: Corpus, n: int | None, *, seed: int, seen: set[str]) -> tuple[list[Query], SourceStats]:
        import jax
        import numpy as np

        from twolar_jax.generation import generate
        from twolar_jax.hf_conversion import load_hf_checkpoint

        config, params = load_hf_checkpoint(self.checkpoint_path)
        tok = self._tokenizer()
        eos = tok.eos_id
        stats, out = SourceStats(), []
        rows = [(docid, j) for docid in _shuffled_ids(corpus, seed) for j in range(self.samples_per_doc)]
        key = jax.random.PRNGKey(seed)
        for b, lo in enumerate(range(0, len(rows), self.batch_size)):
            if n is not None and len(out) >= n:
                break
            batch = rows[lo:lo + self.batch_size]
            tokens = np.zeros((self.batch_size, self.max_input_length), np.int32)
            for i, (docid, _) in enumerate(batch):
                ids = tok.encode(corpus[docid].contents)[: self.max_input_length - 1] + [eos]
                tokens[i, : len(ids)] = ids
            decoded = np.asarray(generate(config, params, tokens, max_decode_length=self.max_decode_length,
                                          rng=jax.random.fold_in(key, b), top_k=self.top_k,
                                          temperature=self.temperature))
            stats.docs_used += len({d for d, _ in batch})
            for (docid, j), row in zip(batch, decoded):
                ids = [int(t) for t in row]
                if eos in ids:
                    ids = ids[: ids.index(eos)]
                text = " ".join(tok.decode([t for t in ids if t > 1]).split())
                key_text = normalize_query(text)
                if not key_text or len(text.split()) < self.min_words:
                    stats.skipped_empty += 1
                    continue
                if key_text in seen:
                    stats.duplicates += 1
                    continue
                if n is not None and len(out) >= n:
                    break
                seen.add(key_text)
                out.append(Query(f"d2q-{docid}-{j}", text, self.query_type, docid))
        stats.generated = len(out)
        return out, stats


class OriginalQueries:
    """Queries from a local file: TSV `qid \\t text` or JSONL {"_id"|"qid", "text"|"query"}. Empty
    queries are skipped and counted; the first `n` in file order are kept."""

    def __init__(self, *, path: str, query_type: str = "original"):
        self.path, self.query_type = path, query_type

    def read(self) -> tuple[list[tuple[str, str]], int]:
        """(qid, text) pairs in file order, and the number of empty queries skipped."""
        stats: dict = {}
        queries = read_queries(self.path, skip_empty=True, stats=stats)
        return list(queries.items()), stats.get("skipped_empty", 0)

    def generate(self, corpus: Corpus, n: int | None, *, seed: int, seen: set[str]) -> tuple[list[Query], SourceStats]:
        pairs, empty = self.read()
        stats, out, qids = SourceStats(skipped_empty=empty), [], set()
        for qid, text in pairs:
            if n is not None and len(out) >= n:
                break
            key = normalize_query(text)
            if key in seen or qid in qids:
                stats.duplicates += 1
                continue
            seen.add(key)
            qids.add(qid)
            out.append(Query(qid, text, self.query_type))
        stats.generated = len(out)
        return out, stats


def split_counts(total: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder split of `total` over the mix weights (they need not sum to 1)."""
    if not mix:
        raise OptionError("build.query_mix is empty")
    if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise OptionError(f"build.query_mix weights must be >= 0 with a positive sum, got {dict(mix)}")
    norm = sum(mix.values())
    exact = {k: total * w / norm for k, w in mix.items()}
    counts = {k: int(v) for k, v in exact.items()}
    rest = total - sum(counts.values())
    for k in sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(mix).index(k)))[:rest]:
        counts[k] += 1
    return counts


def mix_queries(
    sources: Mapping[str, QuerySource],
    mix: Mapping[str, float],
    num_queries: int,
    *,
    corpus: Corpus,
    seed: int = 0,
    shuffle: bool = True,
) -> tuple[list[Query], dict]:
    """Draw `num_queries` split by `mix` over the named sources, dedupe across them, then (by default)
    shuffle with the seed so a partial build still has the mix. A source that runs short is reported
    in the stats (`shortfall`), not padded from another source."""
    unknown = set(mix) - set(sources)
    if unknown:
        raise OptionError(f"build.query_mix names unknown sources {sorted(unknown)}; have {sorted(sources)}")
    counts = split_counts(num_queries, mix)
    seen: set[str] = set()
    queries: list[Query] = []
    stats: dict = {"requested": counts, "by_source": {}, "shortfall": {}}
    for i, name in enumerate(mix):
        if counts[name] == 0:
            continue
        got, s = sources[name].generate(corpus, counts[name], seed=seed + 1000 * i, seen=seen)
        queries.extend(got)
        stats["by_source"][name] = s.to_dict()
        if len(got) < counts[name]:
            stats["shortfall"][name] = counts[name] - len(got)
            log.warning("query source %r produced %d of %d queries", name, len(got), counts[name])
    qids = [q.qid for q in queries]
    if len(set(qids)) != len(qids):
        raise OptionError("two query sources produced the same qid; give them distinct query types")
    if shuffle:
        random.Random(seed).shuffle(queries)
    stats["total"] = len(queries)
    return queries, stats


def write_queries(path: str | os.PathLike, queries: Sequence[Query]) -> None:
    """All queries at once, atomically: the file exists only when the query stage is complete."""
    with atomic_writer(path) as f:
        for q in queries:
            f.write(json.dumps(q.to_dict(), ensure_ascii=False) + "\n")


def read_queries_file(path: str | os.PathLike) -> list[Query]:
    """The query stage's output (write_queries), in order."""
    out = []
    for lineno, obj in read_jsonl(path):
        try:
            out.append(Query.from_dict(obj))
        except KeyError as e:
            raise FormatError(path, lineno, str(e.args[0]), "missing field") from None
    return out
