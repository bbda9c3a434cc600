"""Listwise reranking throughput: our ListwiseReranker against a LiT5 reference in PyTorch, run as rank_llm runs it.

Workload: DL19 BM25 top-k (data/trec_dl/dl19_bm25_top100.json), each query's candidates reordered by sliding
windows (20 / 10 by default, back to front). Both sides use the same random flan-t5-small-shaped weights
(ours exported with `save_hf_checkpoint`, loaded by transformers' T5ForConditionalGeneration), the same
encoder inputs (`listwise_inputs.encode_window`: LiT5's template, 150 tokens per passage) and the same
step through window positions: the windows of all queries at one position go through in batches of
`--batch_size` windows. Ours: `method="first"` at window 20 and at window 100 (one pass), and
`method="generate"` (greedy, 4 tokens per identifier). Torch: Fusion-in-Decoder as rank_llm's LiT5 (each
passage through the encoder alone, states joined, greedy `generate` over them), eager. Timed passes
include tokenization and exclude our compiles (a warm-up batch of each shape first; torch gets one
warm-up batch too). Prints queries/s, then `first_vs_generate=` (ours first w20 / ours generate) and
`ratio_vs_torch=` (ours first w20 / torch generate), and how often ours generate and torch agree.

  python benchmarks/listwise_throughput.py --quick            # 2 queries, top 20: a minute or two on 2 cores
  python benchmarks/listwise_throughput.py --queries 8 --top_k 100
  python benchmarks/listwise_throughput.py --preset flan-t5-base --dtype bfloat16   # on a GPU: all 43 queries
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_common  # noqa: E402

Item = tuple[str, list[str], list[str]]  # (query, passages, docids)


def load_dl19(top_k: int, queries: int | None) -> tuple[list[Item], str]:
    """(query, top-k passages, docids) per DL19 query, in file order."""
    for candidate in (REPO / "data" / "trec_dl" / "dl19_bm25_top100.json",
                      REPO.parent / "shared" / "data" / "trec_dl" / "dl19_bm25_top100.json"):
        if candidate.exists():
            rows = json.loads(candidate.read_text())[:queries]
            return [(r["query"], [h["content"] for h in r["hits"][:top_k]], [str(h["docid"]) for h in r["hits"][:top_k]])
                    for r in rows], str(candidate)
    raise SystemExit("DL19 candidates not found: neither data/trec_dl nor ../shared/data/trec_dl is present")


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flan-t5-small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--top_k", type=int, default=100, help="candidates per query (BM25 order)")
    ap.add_argument("--queries", type=int, default=None, help="the first N DL19 queries (default: all 43)")
    ap.add_argument("--batch_size", type=int, default=16, help="windows per device call, both sides")
    ap.add_argument("--passage_length", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=1, help="timed passes per side, taking turns")
    ap.add_argument("--quick", action="store_true", help="2 queries, top 20 (one window each)")
    ap.add_argument("--skip_torch", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.queries, args.top_k = args.queries or 2, min(args.top_k, 20)
    return args


def batch_shapes(workload: list[Item], rr: Any) -> set[tuple[int, int]]:
    """The (rows, slots) of every batch `rank_many` will dispatch on this workload (one compile each)."""
    from twolar_jax import scoring_runtime
    from twolar_jax.ranking.listwise_inputs import sliding_windows

    plans = [sliding_windows(len(docs), window=rr.window, stride=rr.stride) for _, docs, _ in workload]
    shapes = set()
    for position in range(max(len(p) for p in plans)):
        sizes = [p[position][1] - p[position][0] for p in plans if position < len(p)]
        for lo in range(0, len(sizes), rr.batch_size):
            chunk = sizes[lo: lo + rr.batch_size]
            shapes.add((scoring_runtime.rows_for(len(chunk), batch_size=rr.batch_size, parallelism=rr.parallelism),
                        max(chunk)))
    return shapes


def ours(config: Any, params: Any, args: argparse.Namespace, workload: list[Item],
         **options: Any) -> Callable[[], list[list[str]]]:
    """Our ListwiseReranker, compiled for every shape of the workload before timing; returns rank(workload)."""
    from twolar_jax.listwise_reranker import ListwiseReranker

    rr = ListwiseReranker(config, params, dtype=args.dtype, batch_size=args.batch_size,
                          passage_length=args.passage_length, **options)
    for rows, slots in sorted(batch_shapes(workload, rr)):
        rr.reorder_windows(["warm up"] * rows, [["a passage"] * slots] * rows)
    return lambda: [[r.doc_id for r in q] for q in rr.rank_many(workload)]


def torch_lit5(config: Any, params: Any, args: argparse.Namespace, window: int = 20,
               stride: int = 10) -> tuple[Callable[[list[Item]], list[list[str]]], str]:
    """LiT5 in PyTorch as rank_llm runs it: FiD encode, greedy generate, parse, slide; batched across queries."""
    import numpy as np
    import torch
    import transformers

    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.ranking import listwise_inputs as li
    from twolar_jax.tokenizer import T5Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf_checkpoint(Path(tmp) / "hf", config, params)
        dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        model = transformers.T5ForConditionalGeneration.from_pretrained(str(hf_dir), dtype=dtype).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    tok = T5Tokenizer()

    def permutations(queries: list[str], windows: list[list[str]]) -> list[list[int]]:
        enc = [li.encode_window(tok, q, w, window=window, passage_length=args.passage_length) for q, w in zip(queries, windows)]
        tokens = torch.tensor(np.stack([t for t, _ in enc]), dtype=torch.long, device=device)
        b, n, length = tokens.shape
        flat = tokens.reshape(b * n, length)
        with torch.inference_mode():
            states = model.encoder(input_ids=flat, attention_mask=(flat > 0).long()).last_hidden_state
            outputs = transformers.modeling_outputs.BaseModelOutput(last_hidden_state=states.reshape(b, n * length, -1))
            out = model.generate(encoder_outputs=outputs, attention_mask=(flat > 0).long().reshape(b, n * length),
                                 max_new_tokens=4 * window, do_sample=False, num_beams=1).cpu().numpy()[:, 1:]
        texts = [tok.decode([int(t) for t in row if t > 1]) for row in out]  # drop padding (0) and EOS (1)
        return [li.parse_permutation(text, len(w)) for text, w in zip(texts, windows)]

    def rank(workload: list[Item]) -> list[list[str]]:
        orders = [list(range(len(docs))) for _, docs, _ in workload]
        plans = [li.sliding_windows(len(docs), window=window, stride=stride) for _, docs, _ in workload]
        for position in range(max(len(p) for p in plans)):
            jobs = [(q, plans[q][position]) for q in range(len(workload)) if position < len(plans[q])]
            for lo in range(0, len(jobs), args.batch_size):
                chunk = jobs[lo: lo + args.batch_size]
                perms = permutations([workload[q][0] for q, _ in chunk],
                                     [[workload[q][1][d] for d in orders[q][s:e]] for q, (s, e) in chunk])
                for (q, (s, e)), perm in zip(chunk, perms):
                    orders[q] = li.apply_window(orders[q], s, e, perm)
        return [[workload[q][2][d] for d in order] for q, order in enumerate(orders)]

    rank([("warm up", ["a passage"] * window, [str(i) for i in range(window)])])
    desc = f"eager, {torch.get_num_threads()} threads, {device}, attention={model.config._attn_implementation}"
    return rank, desc


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    import jax

    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    workload, source = load_dl19(args.top_k, args.queries)
    config = preset(args.preset)
    params = init_params(config, 0)
    print(f"load before: {bench_common.load_average()}")
    print(f"data: {len(workload)} DL19 queries x top {args.top_k} from {source}")
    print(f"model: {args.preset} random weights, dtype={args.dtype}, device={jax.devices()[0].device_kind} "
          f"x{jax.device_count()}, batch_size={args.batch_size} windows, passage_length={args.passage_length}, "
          f"jax={jax.__version__}")
    sides = {"ours_first_w20": ours(config, params, args, workload, method="first", window=20, stride=10),
             "ours_first_w100": ours(config, params, args, workload, method="first", window=100, stride=10),
             "ours_generate_w20": ours(config, params, args, workload, method="generate", window=20, stride=10)}
    if not args.skip_torch:
        rank_torch, torch_desc = torch_lit5(config, params, args)
        sides["torch_generate_w20"] = lambda: rank_torch(workload)
    times = {name: [] for name in sides}
    results = {}
    for _ in range(args.rounds):  # the sides take turns, so a shared CPU slows them alike
        for name, fn in sides.items():
            t0 = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - t0)
    qps = {name: len(workload) * len(t) / sum(t) for name, t in times.items()}
    for name, value in qps.items():
        extra = f", {torch_desc}" if name.startswith("torch") else ""
        print(f"{name}: {value:.3f} queries/s (passes {', '.join(f'{t:.2f}' for t in times[name])} s{extra})")
    print(f"load after: {bench_common.load_average()}")
    print(f"first_vs_generate={qps['ours_first_w20'] / qps['ours_generate_w20']:.2f}")
    if not args.skip_torch:
        same = sum(a == b for a, b in zip(results["ours_generate_w20"], results["torch_generate_w20"]))
        print(f"generate agreement (ours vs torch, identical final order): {same}/{len(workload)} queries")
        print(f"ratio_vs_torch={qps['ours_first_w20'] / qps['torch_generate_w20']:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
