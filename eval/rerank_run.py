"""Rerank any first-stage run with a checkpoint and write the reranked run.

    python -m eval.rerank_run --checkpoint CKPT --run RUN --output OUT [--corpus CORPUS] [--queries QUERIES]
        [--top_k 100] [--qrels QRELS] [--output_format trec|rank_llm] [--batch_size 32] [--max_length 512]
        [--score_head difference|softmax|extra_id] [--dtype float32|bfloat16] [--truncation document]
    twolar rerank ...   (the same)

RUN is a TREC run (`qid Q0 docid rank score tag`; its top_k in trec_eval order: score descending, ties by
docid descending), rank_llm requests/results JSONL (`*.jsonl`) or rank_llm_data candidate JSON (`*.json`);
the last two carry query and passage texts and are cut to their first top_k candidates in file order.
CORPUS (BEIR corpus.jsonl or `id<TAB>text` TSV) and QUERIES (BEIR queries.jsonl or `qid<TAB>text` TSV)
give the texts: required for a TREC run, and when given they replace the texts of a JSON run.
CKPT is an HF T5 dir, a Hugging Face hub id (the HF cache) or a training MODEL_DIR (its latest step).
OUT is a TREC run, or with `--output_format rank_llm` rank_llm's result JSONL (`{"query": {"text",
"qid"}, "candidates": [{"docid", "score", "doc"}]}`, candidates in reranked order, score = the
reranker's). Scores are logged to OUT.scores.jsonl as they come, so an interrupted job resumes; the
log is reused only for the same checkpoint, settings and candidates (eval.score_log). With --qrels,
prints the metrics JSON that `python -m eval.trec` prints for OUT. Bad input: one line on stderr
naming file and line, exit code 2. On a pod (--multiprocess, as twolar-train), every host runs the same
command, scores its share of the queries (eval.multihost) and process 0 alone writes OUT and prints.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from eval import multihost
from eval.listwise import ListwiseOptions, add_listwise_flags
from eval.metrics import default_measures
from eval.trec import score_rank_llm_file, score_run_file
from retrieval.candidates import requests_from_run
from retrieval.corpus import Corpus, read_corpus
from retrieval.readers import (RankCandidate, RankRequest, read_candidates_json, read_qrels, read_queries,
                               read_rank_llm_jsonl, read_run)
from retrieval.runs import Run, sort_hits, write_trec_run
from twolar_jax.durable_io import atomic_writer
from twolar_jax import dir_lock, entry, user_paths
from twolar_jax.errors import FormatError, MissingFileError, OptionError
from twolar_jax.model.config import COMPUTE_DTYPES
from twolar_jax.scoring import SCORE_HEADS

log = logging.getLogger("eval")
OUTPUT_FORMATS = ("trec", "rank_llm")


def run_format(path: str) -> str:
    """"rank_llm" (JSONL), "candidates" (rank_llm_data JSON) or "trec", from the file name."""
    name = path.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "rank_llm"
    if name.endswith((".json", ".json.gz")):
        return "candidates"
    return "trec"


def _with_texts(requests: list[RankRequest], corpus: Optional[Corpus], queries: Optional[dict[str, str]],
                source: str, top_k: int) -> list[RankRequest]:
    """The first top_k candidates of each request (file order), texts replaced from corpus / queries if given."""
    out = []
    for r in requests:
        if queries is not None and r.qid not in queries:
            raise FormatError(source, None, "qid", f"query {r.qid!r} is not in the queries file")
        cands = []
        for c in r.candidates[:top_k]:
            text = c.text if corpus is None else corpus.contents(c.docid)
            if text is None:
                raise FormatError(source, None, "docid", f"document {c.docid!r} (query {r.qid!r}) is not in the corpus")
            cands.append(RankCandidate(c.docid, c.score, text))
        out.append(RankRequest(r.qid, r.query if queries is None else queries[r.qid], cands))
    return out


def read_requests(run_path: str, *, corpus_path: Optional[str], queries_path: Optional[str],
                  top_k: int) -> list[RankRequest]:
    """Candidate lists with texts from any run format the readers know (module docstring)."""
    corpus = read_corpus(corpus_path) if corpus_path else None
    queries = read_queries(queries_path) if queries_path else None
    kind = run_format(run_path)
    if kind == "trec":
        if corpus is None or queries is None:
            raise OptionError(f"--run {run_path} is a TREC run: give --corpus and --queries for the texts")
        run = read_run(run_path, known_queries=set(queries), known_from=f"the queries file {queries_path}")
        return requests_from_run(run, queries, corpus.contents, k=top_k, source=run_path)
    requests = read_rank_llm_jsonl(run_path) if kind == "rank_llm" else read_candidates_json(run_path)
    return _with_texts(requests, corpus, queries, run_path, top_k)


def write_rank_llm_jsonl(path: str | Path, requests: Sequence[RankRequest], run: Run) -> Path:
    """rank_llm's result JSONL: one line per query, candidates in reranked (trec_eval) order."""
    with atomic_writer(path) as f:
        for r in requests:
            texts = {c.docid: c.text for c in r.candidates}
            cands = [{"docid": d, "score": s, "doc": {"contents": texts[d]}} for d, s in sort_hits(run[r.qid].items())]
            f.write(json.dumps({"query": {"text": r.query, "qid": r.qid}, "candidates": cands}, ensure_ascii=False))
            f.write("\n")
    return Path(path)


def _check_inputs(args: argparse.Namespace) -> None:
    """Before anything is read or scored: the inputs exist, OUT and its score log can be written."""
    for flag in ("run", "corpus", "queries", "qrels"):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise MissingFileError(f"{value}: not found (--{flag})")
    out = user_paths.check_output("--output", args.output)
    for log_file in (f"{out}.scores.jsonl", f"{out}.scores.meta.json"):
        if Path(log_file).is_dir():
            raise OptionError(f"--output {out}: its score log {log_file} is a directory")


def _check_judged(qrels_path: str, requests: Sequence[RankRequest], source: str) -> None:
    """Before any scoring: eval.trec refuses a run naming queries the qrels do not judge."""
    qrels = read_qrels(qrels_path)
    unknown = [r.qid for r in requests if r.qid not in qrels]
    if unknown:
        raise OptionError(f"{source}: queries {unknown[:3]} are not in {qrels_path} (--allow_unjudged ignores them)")


def rerank_file(args: argparse.Namespace) -> Optional[dict[str, float]]:
    """The job: read, rerank (resumable), write OUT; the metrics of OUT when --qrels is given."""
    from eval.run import load_keyed_reranker

    _check_inputs(args)
    # The inputs and the checkpoint first: a bad one fails before anything is created next to OUT.
    requests = read_requests(args.run, corpus_path=args.corpus, queries_path=args.queries, top_k=args.top_k)
    if args.qrels and not args.allow_unjudged:
        _check_judged(args.qrels, requests, args.run)
    scorer, key = load_keyed_reranker(args.checkpoint, score_head=args.score_head, dtype=args.dtype,
                                      batch_size=args.batch_size, max_length=args.max_length,
                                      truncation=args.truncation, listwise=_listwise_options(args))
    out = Path(args.output)  # one job per OUT (its score log): a second one refuses before scoring anything
    lock = dir_lock.hold(out.parent, option="--output", target=out,
                         lock_name=f".{out.name}{dir_lock.lock_name(multihost.process_layout()[0])}")
    with lock:
        log_path = Path(f"{out}.scores.jsonl")
        entry.on_interrupt(f"the scores of every finished query are in "
                           f"{multihost.host_path(log_path, '.jsonl', *multihost.process_layout())}")
        # On a pod each host scores its share into OUT.scores.hostI-of-N.jsonl; process 0 gets the whole run.
        run = multihost.rerank_on_hosts(scorer, requests, top_k=args.top_k, pairs_per_call=args.pairs_per_call,
                                        log_path=log_path, meta_path=Path(f"{out}.scores.meta.json"),
                                        model_key=key, desc="rerank", barrier_name="eval.rerank_run")
        if run is None:  # not process 0: it writes nothing
            return None
        if args.output_format == "rank_llm":
            write_rank_llm_jsonl(out, requests, run)
        else:
            write_trec_run(out, run, tag=args.run_tag)
        log.info("wrote %s: %d queries, %d pairs reranked", out, len(run), sum(map(len, run.values())))
        if not args.qrels:
            return None
        measures = args.measures or list(default_measures(args.top_k))
        score = score_rank_llm_file if args.output_format == "rank_llm" else score_run_file
        return score(args.qrels, str(out), measures, allow_unjudged=args.allow_unjudged)[0]


def _listwise_options(args: argparse.Namespace) -> ListwiseOptions:
    """--listwise/--window/--stride/--passage_length, checked (their defaults: 20, 10, 150)."""
    defaults = ListwiseOptions()
    options = ListwiseOptions(args.listwise, *(getattr(args, n) if getattr(args, n) is not None else getattr(defaults, n)
                                                for n in ("window", "stride", "passage_length")))
    options.check(prefix="--")
    return options


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = entry.ArgumentParser(prog="python -m eval.rerank_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="HF T5 dir, HF hub id or training MODEL_DIR")
    p.add_argument("--run", required=True, help="TREC run, rank_llm JSONL (*.jsonl) or candidate JSON (*.json)")
    p.add_argument("--output", required=True, help="the reranked run to write")
    p.add_argument("--corpus", help="BEIR corpus.jsonl or id<TAB>text TSV (needed for a TREC run)")
    p.add_argument("--queries", help="BEIR queries.jsonl or qid<TAB>text TSV (needed for a TREC run)")
    p.add_argument("--top_k", type=entry.positive_int, default=100, help="candidates reranked per query")
    p.add_argument("--qrels", help="print the metrics of the output against these qrels (eval.trec's JSON)")
    p.add_argument("--measures", nargs="+", help="ir-measures names (default: nDCG@10 nDCG@1 nDCG@5 RR@10 R@top_k)")
    p.add_argument("--allow_unjudged", action="store_true", help="with --qrels: ignore queries it does not judge")
    p.add_argument("--output_format", choices=OUTPUT_FORMATS, default="trec")
    p.add_argument("--batch_size", type=entry.positive_int, default=32)
    p.add_argument("--max_length", type=entry.positive_int, default=512)
    p.add_argument("--score_head", choices=SCORE_HEADS, default="difference")
    p.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32")
    p.add_argument("--truncation", default="document", help="what is cut when a pair is too long")
    p.add_argument("--pairs_per_call", type=entry.positive_int, default=1024, help="pairs handed to the scorer at once")
    p.add_argument("--run_tag", default="twolar")
    add_listwise_flags(p)
    entry.add_common_flags(p)
    multihost.add_flags(p)
    return p.parse_args(argv)


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    entry.start(args)
    multihost.initialize(args)
    metrics = rerank_file(args)
    if metrics is not None:
        print(json.dumps(metrics))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0, or 2 with one line on stderr naming the file, line, field or option (--debug: the traceback)."""
    return entry.run_console("python -m eval.rerank_run", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
