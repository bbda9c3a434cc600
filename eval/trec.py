"""Score any TREC run file: `python -m eval.trec --qrels QRELS --run RUN [--measures nDCG@10 RR@10 ...]`.

`--rank_llm_jsonl FILE` instead of `--run` scores rank_llm's results JSONL in file order.
Prints one JSON object keyed by ir-measures names, e.g. {"nDCG@10": 0.5058, ...}; with
`--per_query FILE` also writes per-query values. Works for runs from any reranker (monoT5,
rank_llm, ours): the run file is the interchange format.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from eval.metrics import DEFAULT_MEASURES, evaluate_run, parse_measures, write_json
from retrieval.readers import read_qrels, read_rank_llm_jsonl, read_run, requests_in_file_order
from retrieval.runs import TIE_RULES
from twolar_jax import entry, user_paths
from twolar_jax.errors import FormatError


def score_run_file(qrels_path: str, run_path: str, measures: Sequence[str] = DEFAULT_MEASURES, *,
                   ties: str = "trec_eval", allow_unjudged: bool = False):
    """(aggregate, per-query) for a run file; queries the qrels do not know are an error unless allowed."""
    qrels = read_qrels(qrels_path)
    run = read_run(run_path, known_queries=None if allow_unjudged else set(qrels), known_from=f"the qrels {qrels_path}")
    return evaluate_run(qrels, run, measures, ties=ties)


def score_rank_llm_file(qrels_path: str, path: str, measures: Sequence[str] = DEFAULT_MEASURES, *,
                        allow_unjudged: bool = False):
    """(aggregate, per-query) for a rank_llm results JSONL, candidates taken in file (reranked) order."""
    qrels = read_qrels(qrels_path)
    requests = read_rank_llm_jsonl(path)
    unknown = [r.qid for r in requests if r.qid not in qrels]
    if unknown and not allow_unjudged:
        raise FormatError(path, None, "query.qid", f"unknown queries {unknown[:3]} (not in {qrels_path})")
    run = {q: docs for q, docs in requests_in_file_order(requests).items() if q in qrels}
    return evaluate_run(qrels, run, measures)


def _parser() -> argparse.ArgumentParser:
    parser = entry.ArgumentParser(prog="python -m eval.trec", description=__doc__.split("\n")[0],
                                     epilog="gin files: none (plain flags only).",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qrels", required=True, help="TREC qrels (qid iter docid rel), .gz allowed")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="TREC run (qid Q0 docid rank score tag), .gz allowed")
    source.add_argument("--rank_llm_jsonl", help="rank_llm results JSONL (candidates in reranked order)")
    parser.add_argument("--measures", nargs="+", default=list(DEFAULT_MEASURES), help="ir-measures names")
    parser.add_argument("--ties", choices=TIE_RULES, default="trec_eval",
                        help="tied scores: trec_eval's rule, docid descending (default), or docid ascending")
    parser.add_argument("--allow_unjudged", action="store_true",
                        help="ignore run queries absent from the qrels instead of failing")
    parser.add_argument("--per_query", help="also write per-query values to this JSON file")
    parser.add_argument("--digits", type=int, default=None, help="round values in the printed JSON")
    entry.add_common_flags(parser, log_level="WARNING", compile_cache=False)
    return parser


def _main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    entry.start(args)
    parse_measures(args.measures)  # a bad measure name is an error before any file is read
    if args.per_query:
        user_paths.check_output("--per_query", args.per_query)
    if args.run:
        aggregate, per_query = score_run_file(args.qrels, args.run, args.measures, ties=args.ties,
                                              allow_unjudged=args.allow_unjudged)
    else:
        aggregate, per_query = score_rank_llm_file(args.qrels, args.rank_llm_jsonl, args.measures,
                                                   allow_unjudged=args.allow_unjudged)
    if args.per_query:
        write_json(args.per_query, per_query)
    if args.digits is not None:
        aggregate = {k: round(v, args.digits) for k, v in aggregate.items()}
    print(json.dumps(aggregate))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """0, or 2 with one line on stderr naming the file, line and field of a bad input (--debug: traceback)."""
    return entry.run_console("python -m eval.trec", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
