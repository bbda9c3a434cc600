"""Evaluation sets by name under a data dir: `trec_dl/dl19`, `trec_dl/dl20`, `beir/<name>`, `beir/*`.

Each set carries its qrels, query texts, a first stage (a callable giving a run) and a doc-text lookup,
so the job treats TREC DL (candidate JSON with passage text; no MS MARCO corpus is shipped) and
BEIR (local corpus + pyserini BM25) the same way.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from retrieval import readers
from retrieval.bm25 import DEFAULT_CACHE_DIR, bm25_run
from retrieval.runs import Qrels, Run, sort_hits
from twolar_jax.errors import FormatError, MissingFileError, OptionError

TREC_DL_FILES = {
    "dl19": ("dl19_bm25_top100.json", "qrels.dl19-passage.txt"),
    "dl20": ("dl20_bm25_top100.json", "qrels.dl20-passage.txt"),
}


@dataclass
class EvalSet:
    name: str  # e.g. "trec_dl/dl19", "beir/scifact"
    qrels: Qrels
    queries: dict[str, str]
    first_stage: Callable[[int], Run]  # depth -> run with the retriever's own scores
    doc_text: Callable[[str], str | None]
    total_queries: int = 0  # judged queries of the full set (before any max_queries cut)

    @property
    def is_beir(self) -> bool:
        return self.name.startswith("beir/")


def trec_dl_set(data_dir: str | os.PathLike, year: str) -> EvalSet:
    """TREC DL from the shipped candidate JSON (pyserini BM25 top-100 with passage text) and NIST qrels."""
    if year not in TREC_DL_FILES:
        raise OptionError(f"unknown TREC DL set {year!r}; known: {sorted(TREC_DL_FILES)}")
    folder = Path(data_dir) / "trec_dl"
    cand_name, qrels_name = TREC_DL_FILES[year]
    cand_path = folder / cand_name
    requests = readers.read_candidates_json(cand_path)
    qrels = readers.read_qrels(folder / qrels_name)
    unknown = [r.qid for r in requests if r.qid not in qrels]
    if unknown:
        raise FormatError(cand_path, None, "qid", f"queries {unknown[:3]} are not judged in {folder / qrels_name}")
    queries = {r.qid: r.query for r in requests}
    texts = {c.docid: c.text for r in requests for c in r.candidates}
    base_run = readers.requests_to_run(requests)
    most = max(len(r.candidates) for r in requests)

    def first(depth: int) -> Run:
        if depth > most:
            raise OptionError(f"{cand_path}: holds at most {most} candidates per query, {depth} asked")
        return {q: dict(sort_hits(docs.items())[:depth]) for q, docs in base_run.items()}

    return EvalSet(f"trec_dl/{year}", qrels, queries, first, texts.get, len(qrels))


def beir_set(path: str | os.PathLike, *, split: str = "test", cache_dir: str | os.PathLike | None = None,
             k1: float = 0.9, b: float = 0.4, remove_query: bool = True, threads: int = 1) -> EvalSet:
    ds = readers.load_beir(path, split)
    cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR

    def first(depth: int) -> Run:
        return bm25_run(ds.corpus, ds.queries, k=depth, k1=k1, b=b, remove_query=remove_query, cache_dir=cache,
                        threads=threads)

    return EvalSet(f"beir/{ds.name}", ds.qrels, ds.queries, first, ds.corpus.contents, len(ds.qrels))


def expand_names(names: list[str] | tuple[str, ...], data_dir: str | os.PathLike) -> list[str]:
    """Expand `beir/*` (and `trec_dl/*`) to the datasets present under data_dir, sorted."""
    data_dir = Path(data_dir)
    out: list[str] = []
    for name in names:
        if name == "beir/*":
            found = sorted(p.name for p in (data_dir / "beir").iterdir() if readers.is_beir_dir(p)) \
                if (data_dir / "beir").is_dir() else []
            if not found:
                raise MissingFileError(f"{data_dir / 'beir'}: no BEIR dataset dirs (corpus.jsonl, queries.jsonl, qrels/)")
            out += [f"beir/{n}" for n in found]
        elif name == "trec_dl/*":
            out += [f"trec_dl/{y}" for y, (c, _) in sorted(TREC_DL_FILES.items()) if (data_dir / "trec_dl" / c).is_file()]
        else:
            out.append(name)
    if len(set(out)) != len(out):
        raise OptionError(f"evaluate.datasets names a dataset twice: {out}")
    return out


def load_set(name: str, data_dir: str | os.PathLike, **beir_kw) -> EvalSet:
    kind, _, rest = name.partition("/")
    if kind == "trec_dl" and rest:
        return trec_dl_set(data_dir, rest)
    if kind == "beir" and rest:
        return beir_set(Path(data_dir) / "beir" / rest, **beir_kw)
    raise OptionError(f"unknown dataset {name!r}: use trec_dl/dl19, trec_dl/dl20, beir/<name> or beir/*")
