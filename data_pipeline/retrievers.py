"""The paper's four first-stage retrievers behind one interface, a run-file retriever, and the merge.

Why one interface: the distillation set takes candidates from BM25, SPLADE, DRAGON and BM25+monoT5;
which of them run (and from which checkpoints) is a gin choice, and a retriever that is too costly to
run here (DRAGON over 8.8M passages on CPU) can be replaced by a precomputed run file without touching
the rest. Every retriever returns `{qid: [(docid, score), ...]}` best first, at most k per query;
fewer than k is legal and is counted by the build.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterable, Mapping, Protocol, Sequence

import numpy as np

from data_pipeline.corpus import Corpus

log = logging.getLogger(__name__)

Hits = list[tuple[str, float]]


class Retriever(Protocol):
    """`prepare` builds or loads what the retriever needs (indexes are cached under work_dir);
    `retrieve` returns up to k hits per query, score descending."""

    name: str

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        ...

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        ...


def corpus_fingerprint(corpus: Corpus) -> str:
    """16 hex chars of sha256 over ids and texts: an index built for another corpus is never reused."""
    cached = getattr(corpus, "_fingerprint", None)
    if cached:
        return cached
    h = hashlib.sha256()
    for p in corpus:
        h.update(p.docid.encode("utf-8") + b"\t" + p.contents.encode("utf-8") + b"\n")
    corpus._fingerprint = h.hexdigest()[:16]  # type: ignore[attr-defined]
    return corpus._fingerprint  # type: ignore[attr-defined]


def _path_tag(path: str) -> str:
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]


def _sorted(pairs: Iterable[tuple[str, float]]) -> Hits:
    return sorted(((d, float(s)) for d, s in pairs), key=lambda p: (-p[1], p[0]))


# ---------------------------------------------------------------------------------------------- BM25


class BM25Retriever:
    """pyserini Lucene BM25 (eval/lucene.py) over "title text"; k1=0.9, b=0.4 as Anserini's defaults."""

    def __init__(self, *, name: str = "bm25", k1: float = 0.9, b: float = 0.4, index_dir: str | None = None,
                 threads: int = 1):
        self.name, self.k1, self.b, self.index_dir, self.threads = name, k1, b, index_dir, threads
        self._searcher = None
        self._corpus: Corpus | None = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        from eval import lucene

        index_dir = Path(self.index_dir) if self.index_dir else Path(work_dir) / f"bm25-{corpus_fingerprint(corpus)}"
        lucene.build_index(({"id": p.docid, "contents": p.contents} for p in corpus), index_dir,
                           threads=self.threads)
        self._searcher = lucene.BM25Searcher(index_dir, k1=self.k1, b=self.b)
        self._corpus = corpus

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._searcher is None:
            raise RuntimeError("BM25Retriever.prepare() was not called")
        return self._searcher.batch_search(dict(queries), k, threads=self.threads)


# ---------------------------------------------------------------------------------------------- SPLADE


class SpladeEncoder:
    """SPLADE term weights from a BERT masked-LM: w_t = max over tokens of log(1 + relu(logit_t))."""

    def __init__(self, checkpoint_path: str, *, max_length: int = 256, batch_size: int = 32, device: str = "cpu"):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_path)
        self.model = AutoModelForMaskedLM.from_pretrained(checkpoint_path).to(device).eval()
        by_id = {i: t for t, i in self.tokenizer.get_vocab().items()}
        # Every output row is a term; an id the tokenizer cannot name still gets a unique term.
        self.vocab = [by_id.get(i, f"[id{i}]").replace(" ", "_") for i in range(self.model.config.vocab_size)]
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    def encode_dense(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, vocab] weights (mostly zero for a trained model)."""
        torch = self.torch
        out = []
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[lo:lo + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            weights = torch.log1p(torch.relu(logits)) * enc["attention_mask"].unsqueeze(-1)
            out.append(weights.max(dim=1).values.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.vocab)), np.float32)

    def encode(self, texts: Sequence[str], *, quantization: float) -> list[dict[str, int]]:
        """{term: round(w * quantization)} with zero weights dropped (Anserini stores integer impacts)."""
        dense = self.encode_dense(texts)
        out = []
        for row in dense:
            q = np.rint(row * quantization).astype(np.int64)
            nz = np.nonzero(q > 0)[0]
            out.append({self.vocab[i]: int(q[i]) for i in nz})
        return out


class SpladeRetriever:
    """Learned sparse retrieval: documents encoded by a local SPLADE checkpoint into a Lucene impact
    index (eval/lucene.py, `impact=True`), queries encoded the same way and searched by dot product."""

    def __init__(self, *, checkpoint_path: str, name: str = "splade", max_length: int = 256,
                 query_max_length: int = 64, batch_size: int = 32, quantization: float = 100.0,
                 index_dir: str | None = None, device: str = "cpu"):
        self.name, self.checkpoint_path = name, checkpoint_path
        self.max_length, self.query_max_length = max_length, query_max_length
        self.batch_size, self.quantization, self.index_dir, self.device = batch_size, quantization, index_dir, device
        self.empty_docs = 0
        self._encoder: SpladeEncoder | None = None
        self._searcher = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        from tqdm import tqdm

        from eval import lucene

        self._encoder = SpladeEncoder(self.checkpoint_path, max_length=self.max_length,
                                      batch_size=self.batch_size, device=self.device)
        index_dir = (Path(self.index_dir) if self.index_dir else
                     Path(work_dir) / f"splade-{corpus_fingerprint(corpus)}-{_path_tag(self.checkpoint_path)}")
        if not lucene.index_is_complete(index_dir):
            def docs():
                passages = list(corpus)
                step = self.batch_size * 8
                for lo in tqdm(range(0, len(passages), step), desc="splade: encode corpus", unit="block"):
                    chunk = passages[lo:lo + step]
                    for p, vec in zip(chunk, self._encoder.encode([p.contents for p in chunk],
                                                                  quantization=self.quantization)):
                        if vec:
                            yield {"id": p.docid, "vector": vec}
                        else:
                            self.empty_docs += 1
            lucene.build_index(docs(), index_dir, impact=True)
        self._searcher = lucene.ImpactSearcher(index_dir)

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._searcher is None or self._encoder is None:
            raise RuntimeError("SpladeRetriever.prepare() was not called")
        qids = list(queries)
        enc = self._encoder
        saved, enc.max_length = enc.max_length, self.query_max_length
        try:
            vectors = enc.encode([queries[q] for q in qids], quantization=self.quantization)
        finally:
            enc.max_length = saved
        return {q: self._searcher.search(v, k) if v else [] for q, v in zip(qids, vectors)}


# ---------------------------------------------------------------------------------------------- DRAGON


class DragonRetriever:
    """Dense bi-encoder (DRAGON+ style): separate query and context BERT encoders, [CLS] vectors,
    inner product in an exact faiss index. Corpus embeddings are cached as .npy under work_dir.

    `pooling="mean"` with `normalize=True` and one path for both encoders turns it into a
    sentence-transformers style retriever (e.g. all-MiniLM-L6-v2, which the demo uses offline)."""

    def __init__(self, *, query_encoder_path: str, context_encoder_path: str, name: str = "dragon",
                 max_length: int = 256, query_max_length: int = 64, batch_size: int = 32,
                 index_dir: str | None = None, device: str = "cpu", pooling: str = "cls",
                 normalize: bool = False):
        if pooling not in ("cls", "mean"):
            raise ValueError(f"DragonRetriever.pooling={pooling!r}: expected 'cls' or 'mean'")
        self.pooling, self.normalize = pooling, normalize
        self.name = name
        self.query_encoder_path, self.context_encoder_path = query_encoder_path, context_encoder_path
        self.max_length, self.query_max_length = max_length, query_max_length
        self.batch_size, self.index_dir, self.device = batch_size, index_dir, device
        self._index = None
        self._ids: list[str] = []

    def _encoder(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(self.device).eval()

    def _encode(self, tok_model, texts: Sequence[str], max_length: int, desc: str | None = None) -> np.ndarray:
        import torch
        from tqdm import tqdm

        tok, model = tok_model
        out = []
        starts = range(0, len(texts), self.batch_size)
        for lo in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
            enc = tok(list(texts[lo:lo + self.batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden_states = model(**enc).last_hidden_state.float()
            if self.pooling == "mean":
                weights = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            else:
                pooled = hidden_states[:, 0, :]
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.cpu().numpy())
        hidden = model.config.hidden_size
        return np.ascontiguousarray(np.concatenate(out) if out else np.zeros((0, hidden), np.float32), np.float32)

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        import faiss

        cache = (Path(self.index_dir) if self.index_dir else
                 Path(work_dir) / f"dragon-{corpus_fingerprint(corpus)}-{_path_tag(self.context_encoder_path)}"
                 f"-{self.pooling}{'-norm' if self.normalize else ''}")
        emb_path, ids_path = cache / "embeddings.npy", cache / "ids.json"
        if emb_path.is_file() and ids_path.is_file():
            emb = np.load(emb_path)
            self._ids = json.loads(ids_path.read_text())
        else:
            passages = list(corpus)
            emb = self._encode(self._encoder(self.context_encoder_path), [p.contents for p in passages],
                               self.max_length, desc="dragon: encode corpus")
            self._ids = [p.docid for p in passages]
            cache.mkdir(parents=True, exist_ok=True)
            tmp = cache / f".embeddings.{os.getpid()}.npy"
            np.save(tmp, emb)
            os.replace(tmp, emb_path)
            tmp_ids = cache / f".ids.{os.getpid()}.json"
            tmp_ids.write_text(json.dumps(self._ids))
            os.replace(tmp_ids, ids_path)
        self._index = faiss.IndexFlatIP(emb.shape[1])
        self._index.add(emb)
        self._query_encoder = self._encoder(self.query_encoder_path)

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._index is None:
            raise RuntimeError("DragonRetriever.prepare() was not called")
        qids = list(queries)
        if not qids:
            return {}
        q = self._encode(self._query_encoder, [queries[x] for x in qids], self.query_max_length)
        scores, idx = self._index.search(q, min(int(k), len(self._ids)))
        return {qid: _sorted((self._ids[i], s) for i, s in zip(row_i, row_s) if i >= 0)
                for qid, row_i, row_s in zip(qids, idx, scores)}


# ---------------------------------------------------------------------------------------------- monoT5


class MonoT5Retriever:
    """BM25 top-`depth` reranked by monoT5 (our Reranker, "softmax" head: p(true) over {true, false})."""

    def __init__(self, *, checkpoint_path: str, name: str = "bm25_monot5", first_stage: Retriever | None = None,
                 depth: int = 100, batch_size: int = 32, max_length: int = 512, score: str = "softmax"):
        self.name, self.checkpoint_path = name, checkpoint_path
        self.first_stage = first_stage if first_stage is not None else BM25Retriever(name="bm25")
        self.depth, self.batch_size, self.max_length, self.score = depth, batch_size, max_length, score
        self._reranker = None
        self._corpus: Corpus | None = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        from twolar_jax.reranker import Reranker

        self.first_stage.prepare(corpus, work_dir)
        self._reranker = Reranker.from_pretrained(self.checkpoint_path, score=self.score,
                                                  batch_size=self.batch_size, max_length=self.max_length)
        self._corpus = corpus

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._reranker is None or self._corpus is None:
            raise RuntimeError("MonoT5Retriever.prepare() was not called")
        first = self.first_stage.retrieve(queries, max(self.depth, k))
        out: dict[str, Hits] = {}
        for qid, hits in first.items():
            ids = [d for d, _ in hits if d in self._corpus]
            if not ids:
                out[qid] = []
                continue
            ranked = self._reranker.rank(queries[qid], [self._corpus[d].contents for d in ids], doc_ids=ids, top_k=k)
            out[qid] = [(r.doc_id, float(r.score)) for r in ranked]
        return out


# ---------------------------------------------------------------------------------------------- run file


class RunFileRetriever:
    """A precomputed TREC run (`qid Q0 docid rank score tag`), e.g. pyserini's prebuilt SPLADE++ or
    DRAGON+ runs, or candidates from any system you cannot run here. Queries absent from it get []."""

    def __init__(self, *, path: str, name: str = "run"):
        self.name, self.path = name, path
        self._run: dict[str, Hits] | None = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        run: dict[str, dict[str, float]] = {}
        with Path(self.path).open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                parts = line.split()
                if len(parts) != 6:
                    raise ValueError(f"{self.path}:{lineno}: expected 6 fields 'qid Q0 docid rank score tag', "
                                     f"got {len(parts)}")
                try:
                    score = float(parts[4])
                except ValueError:
                    raise ValueError(f"{self.path}:{lineno}: field 'score' is not a number: {parts[4]!r}") from None
                run.setdefault(parts[0], {})[parts[2]] = score
        self._run = {q: _sorted(hits.items()) for q, hits in run.items()}

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._run is None:
            raise RuntimeError("RunFileRetriever.prepare() was not called")
        return {q: list(self._run.get(q, [])[:k]) for q in queries}


# ---------------------------------------------------------------------------------------------- merge


def merge_candidates(
    hits: Mapping[str, Sequence[tuple[str, float]]],
    *,
    depth: int = 30,
    quotas: Mapping[str, int] | None = None,
    valid: "Corpus | None" = None,
) -> list[tuple[str, str]]:
    """Merge per-retriever rankings of one query into at most `depth` (docid, source) pairs.

    Round-robin over the retrievers in the order given, each contributing its next not-yet-taken
    document (duplicates removed, the first retriever to reach a document is its `source`). With
    `quotas` {name: n}, a retriever stops after n documents; if the list is still short of `depth`
    (a retriever was short, or quotas sum below depth) the round-robin continues without quotas.
    Documents not in `valid` (when given) are skipped.
    """
    names = list(hits)
    if quotas is not None:
        unknown = set(quotas) - set(names)
        if unknown:
            raise ValueError(f"quotas name unknown retrievers {sorted(unknown)}; have {names}")
    pos = {n: 0 for n in names}
    taken_by = {n: 0 for n in names}
    seen: set[str] = set()
    out: list[tuple[str, str]] = []

    def next_doc(name: str) -> str | None:
        ranking = hits[name]
        while pos[name] < len(ranking):
            docid = ranking[pos[name]][0]
            pos[name] += 1
            if docid not in seen and (valid is None or docid in valid):
                return docid
        return None

    for use_quotas in ((True, False) if quotas is not None else (False,)):
        progress = True
        while len(out) < depth and progress:
            progress = False
            for name in names:
                if len(out) >= depth:
                    break
                if use_quotas and taken_by[name] >= quotas.get(name, 0):
                    continue
                docid = next_doc(name)
                if docid is None:
                    continue
                seen.add(docid)
                taken_by[name] += 1
                out.append((docid, name))
                progress = True
    return out
