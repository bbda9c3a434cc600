"""The whole DL19 evaluation job: rerank the BM25 top-100 of 43 queries (4,300 pairs) through Reranker.

Random weights with a real model shape (default flan-t5-base), so nDCG is meaningless; what this
measures is the job's wall time: model init, tokenization, jit compilation of the length buckets,
scoring over all local devices, run file and metrics. Prints pairs/s and, last, `seconds=<x>` for the
whole job (compilation included).

  python benchmarks/eval_dl19.py                                  # flan-t5-base, 4,300 pairs (GPU)
  python benchmarks/eval_dl19.py --dtype bfloat16 --batch_size 128
  python benchmarks/eval_dl19.py --quick                          # tiny preset, 3 queries: a CPU smoke run
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def find_data_dir() -> Path:
    for candidate in (REPO / "data", REPO.parent / "shared" / "data"):
        if (candidate / "trec_dl" / "dl19_bm25_top100.json").is_file():
            return candidate
    raise SystemExit("DL19 candidates not found: neither data/trec_dl nor ../shared/data/trec_dl is present")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flan-t5-base")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--top_k", type=int, default=100)
    ap.add_argument("--max_queries", type=int, default=None, help="first N judged queries only")
    ap.add_argument("--pairs_per_call", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="tiny preset, 3 queries (CPU smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.preset = "tiny" if args.preset == "flan-t5-base" else args.preset
        args.max_queries = args.max_queries or 3

    start = time.perf_counter()
    import jax

    from eval.run import evaluate
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params
    from twolar_jax.reranker import Reranker

    data_dir = find_data_dir()
    config = preset(args.preset)
    params = init_params(config, 0)
    reranker = Reranker.from_params(config, params, dtype=args.dtype, batch_size=args.batch_size,
                                    max_length=args.max_length)
    t_model = time.perf_counter() - start
    devices = jax.devices()
    print(f"data: {data_dir / 'trec_dl'}")
    print(f"model: {args.preset} random weights, dtype={args.dtype}, batch={reranker.batch_size}, "
          f"device={devices[0].device_kind} x{len(devices)}, init {t_model:.1f}s")

    pairs = []

    class Counting:
        def score_pairs(self, queries, docs):
            pairs.append(len(docs))
            return reranker.score_pairs(queries, docs)

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        res = evaluate(output_dir=out, datasets=["trec_dl/dl19"], data_dir=str(data_dir), reranker=Counting(),
                       top_k=args.top_k, max_queries=args.max_queries, pairs_per_call=args.pairs_per_call)
        t_job = time.perf_counter() - t0
    total = time.perf_counter() - start
    n = sum(pairs)
    print(f"pairs={n} rerank+eval {t_job:.2f}s pairs/s={n / t_job:.1f} (compilation included)")
    print(f"nDCG@10={res['trec_dl/dl19']['nDCG@10']:.4f} (random weights: not a quality number)")
    print(f"seconds={total:.2f}")


if __name__ == "__main__":
    main()
