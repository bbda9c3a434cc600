"""Scoring throughput: our jit-compiled Reranker against transformers' PyTorch T5 in eager mode.

Both score the same DL19 BM25 candidate texts with the same random weights (our params exported with
`save_hf_checkpoint` and loaded by transformers), the way TWOLAR, pygaggle and rerankers score: the whole
batch padded to its longest pair, full forward, one decoder step. Ours goes through the public Reranker
(tokenization included, its batch planner and length buckets as they are); `--per_query` scores each
query's candidates as its own group, as `Reranker.rank` does (torch batches within each query). The two
sides take turns, `--rounds` passes each over all pairs, so a CPU shared with other jobs slows both
alike; the ratio is total torch time over total ours time. Prints pairs/s for each, MFU where the device's
peak is known (on a CPU each side's model GFLOP/s against its library's rate on one GEMM alone),
`compile_s=` for the first pass in this fresh process against an empty persistent compilation cache
(cache=cold) and in a fresh subprocess against the filled one (cache=warm), and last
`ratio_vs_torch=<ours pairs/s / torch pairs/s>`. Before that, `cold_start_overhead_s=` and
`warm_start_overhead_s=`: the first `Reranker.rank()` of one query's 100 candidates minus the second, each
in a fresh subprocess, first against an empty cache folder (it compiles and stores the scoring programs),
then against that folder (it loads them: twolar_jax/executable_cache.py).

  python benchmarks/score_throughput.py --quick            # 128 pairs, one round: about a minute on 2 cores
  python benchmarks/score_throughput.py                    # 512 pairs, 2 rounds
  python benchmarks/score_throughput.py --per_query        # the same pairs, one query at a time
  python benchmarks/score_throughput.py --preset flan-t5-base --dtype bfloat16 --pairs 4300   # on a GPU
  python benchmarks/score_throughput.py --start_only       # only the cold/warm start overheads
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_common  # noqa: E402


def load_dl19_texts(n: int) -> tuple[list[str], list[str], str]:
    for candidate in (REPO / "data" / "trec_dl" / "dl19_bm25_top100.json",
                      REPO.parent / "shared" / "data" / "trec_dl" / "dl19_bm25_top100.json"):
        if candidate.exists():
            rows = json.loads(candidate.read_text())
            queries, docs = [], []
            for row in rows:
                for hit in row["hits"]:
                    queries.append(row["query"])
                    docs.append(hit["content"])
            return queries[:n], docs[:n], str(candidate)
    raise SystemExit("DL19 candidates not found: neither data/trec_dl nor ../shared/data/trec_dl is present")


START_FLAG = "--start_probe"
START_PREFIX = "start_probe "  # the probe's last line: start_probe first_s=<s> second_s=<s> stats=<json>
START_CANDIDATES = 100


def one_query_candidates(n: int = START_CANDIDATES) -> tuple[str, list[str], str]:
    """The first DL19 query and its top-n BM25 passages, or synthetic text when the data is absent."""
    try:
        queries, docs, source = load_dl19_texts(n)
        return queries[0], [d for q, d in zip(queries, docs) if q == queries[0]], source
    except SystemExit as e:
        import random

        rng = random.Random(0)
        words = "the of turing award machine learning network deep passage query relevant model score".split()
        docs = [" ".join(rng.choice(words) for _ in range(rng.randint(20, 160))) for _ in range(n)]
        return "who won the turing award", docs, f"synthetic text ({e})"


def run_start_probe(args) -> None:
    """A fresh process, as a user's script: build the Reranker, rank one query's candidates twice."""
    bench_common.use_cache(args.start_probe)
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params
    from twolar_jax.reranker import Reranker

    query, docs, _ = one_query_candidates()
    config = preset(args.preset, attention=args.attention, scan_layers=args.scan_layers)
    rr = Reranker.from_params(config, init_params(config, 0), dtype=args.dtype, batch_size=args.batch_size,
                              max_length=args.max_length, length_buckets=args.length_buckets,
                              scan_layers=reranker_scan_layers(args))
    first = bench_common.timed(lambda: rr.rank(query, docs))
    second = bench_common.timed(lambda: rr.rank(query, docs))
    stats = rr.executable_cache.stats.as_dict() if rr.executable_cache is not None else None
    print(f"{START_PREFIX}first_s={first:.3f} second_s={second:.3f} stats={json.dumps(stats)}", flush=True)


def start_overheads(argv: list[str]) -> None:
    """cold_start_overhead_s (empty cache folder) and warm_start_overhead_s (the folder the cold run filled),
    each the first rank() minus the second in a fresh subprocess."""
    import re
    import subprocess

    _, docs, source = one_query_candidates()
    print(f"start: {len(docs)} candidates of one query from {source}")
    with tempfile.TemporaryDirectory(prefix="twolar_bench_start_") as cache_dir:
        for label in ("cold", "warm"):
            done = subprocess.run([sys.executable, __file__, *argv, START_FLAG, cache_dir], capture_output=True,
                                  text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            found = re.findall(rf"^{START_PREFIX}first_s=([0-9.]+) second_s=([0-9.]+) stats=(.*)$", done.stdout, re.M)
            if done.returncode != 0 or not found:
                raise RuntimeError(f"start probe failed (rc={done.returncode}): {done.stderr[-2000:]}")
            first, second, stats = float(found[-1][0]), float(found[-1][1]), found[-1][2]
            print(f"{label}_start_overhead_s={first - second:.2f} (first rank() {first:.2f} s, second {second:.2f} s, "
                  f"executable cache {stats})", flush=True)


def encoder_flops_per_pair(config, length: int) -> float:
    """Forward model FLOPs of the encoder over `length` tokens plus one decoder step (matmuls only; the
    decoder's cross-attention counted as computed, through the key/value kernels)."""
    d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
    ff = (3 if config.is_gated else 2) * d * f
    enc_layer = 4 * d * h * k + ff + 2 * length * h * k
    dec_layer = 4 * d * h * k + 4 * d * h * k + 2 * length * h * d + ff
    return 2 * (length * enc_layer * config.num_encoder_layers + dec_layer * config.num_decoder_layers)


def length_buckets(text: str) -> tuple[int, ...]:
    """--length_buckets: comma-separated token counts, e.g. 128,256,384,512 (the Reranker checks the rest)."""
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 128,256,384,512") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flan-t5-small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=None, help="timed passes per side, taking turns (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="128 pairs, one round (about a minute on a 2-core CPU)")
    ap.add_argument("--per_query", action="store_true",
                    help="score each query's candidates as one group (score_groups, as Reranker.rank scores one "
                         "query; torch batches within each query) instead of all pairs as one list")
    bench_common.add_model_flags(ap)
    ap.add_argument("--length_buckets", default=None, type=length_buckets,
                    help="comma-separated Reranker length buckets (default: its own, 16 of them up to 512); fewer "
                         "buckets compile fewer shapes, at the cost of more padding")
    ap.add_argument("--unrolled_layers", action="store_true",
                    help="score with unrolled layers (the Reranker's scan_layers=False) instead of its scanned default")
    ap.add_argument("--skip_torch", action="store_true")
    ap.add_argument("--skip_warm_compile", action="store_true", help="do not start the warm-cache subprocess")
    ap.add_argument("--start_only", action="store_true",
                    help="measure only cold_start_overhead_s and warm_start_overhead_s")
    ap.add_argument("--skip_start", action="store_true", help="do not measure the start overheads")
    ap.add_argument(bench_common.PROBE_FLAG, default=None, metavar="CACHE_DIR", dest="compile_probe",
                    help=argparse.SUPPRESS)  # internal: only the first pass, against CACHE_DIR
    ap.add_argument(START_FLAG, default=None, metavar="CACHE_DIR", dest="start_probe",
                    help=argparse.SUPPRESS)  # internal: rank() twice in a fresh process, against CACHE_DIR
    args = ap.parse_args(argv)
    if args.quick:
        args.pairs = min(args.pairs, 128)
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


def build_reranker(args):
    """Our Reranker on random weights, the pairs it scores, and what the torch side needs to match it."""
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params
    from twolar_jax.reranker import Reranker

    queries, docs, source = load_dl19_texts(args.pairs)
    config = preset(args.preset, attention=args.attention, scan_layers=args.scan_layers)
    params = init_params(config, 0)
    rr = Reranker.from_params(config, params, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length,
                              length_buckets=args.length_buckets, scan_layers=reranker_scan_layers(args))
    return rr, config, params, queries, docs, source


def reranker_scan_layers(args: argparse.Namespace) -> bool:
    """The Reranker's layer form: its default (scanned) unless --unrolled_layers."""
    return not args.unrolled_layers


def query_runs(queries: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each run of equal consecutive queries: one query's candidates."""
    runs, start = [], 0
    for i in range(1, len(queries) + 1):
        if i == len(queries) or queries[i] != queries[start]:
            runs.append((start, i))
            start = i
    return runs


def score_ours(args, rr, queries: list[str], docs: list[str]):
    """Our scores as a user gets them (tokenization included): one list, or one group per query."""
    import numpy as np

    if not args.per_query:
        return rr.score_pairs(queries, docs)
    groups = [list(zip(queries[a:b], docs[a:b])) for a, b in query_runs(queries)]
    return np.concatenate(list(rr.score_groups(groups)))


def run_probe(args) -> None:
    """The warm-cache measurement: a fresh process whose only work is the first pass."""
    bench_common.use_cache(args.compile_probe)
    rr, _, _, queries, docs, _ = build_reranker(args)
    clock = bench_common.CompileClock()
    score_ours(args, rr, queries, docs)
    bench_common.report_probe(clock)


def torch_scorer(args, config, params, true_id: int, false_id: int):
    """transformers' T5 on the same weights; returns score(queries, docs) -> np.ndarray and a description."""
    import numpy as np
    import torch
    import transformers

    from twolar_jax.hf_conversion import save_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf_checkpoint(Path(tmp) / "hf", config, params)
        tok = transformers.T5Tokenizer.from_pretrained(str(hf_dir))
        torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        model = transformers.T5ForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(tdev)

    def score(qs, ds):
        out = []
        runs = query_runs(qs) if args.per_query else [(0, len(ds))]
        for i, end in ((i, e) for a, e in runs for i in range(a, e, args.batch_size)):
            stop = min(i + args.batch_size, end)
            texts = [f"Query: {q} Document: {d} Relevant:" for q, d in zip(qs[i:stop], ds[i:stop])]
            enc = tok(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt").to(tdev)
            with torch.inference_mode():
                logits = model(**enc, decoder_input_ids=torch.zeros((len(texts), 1), dtype=torch.long, device=tdev)).logits[:, 0, :]
            out.append((logits[:, true_id] - logits[:, false_id]).float().cpu().numpy())
        if tdev == "cuda":
            torch.cuda.synchronize()
        return np.concatenate(out)

    return score, f"eager, {torch.get_num_threads()} threads, {tdev}, attention={model.config._attn_implementation}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.start_probe:
        return run_start_probe(args)
    if not args.skip_start:
        start_overheads([a for a in argv if a not in ("--start_only", "--skip_start")])
    if not args.start_only:
        bench_common.run_main(argv, parse_args, run_probe, run)


def run(args: argparse.Namespace, argv: list[str], cache_dir: str) -> None:
    import jax
    import numpy as np

    print(f"load before: {bench_common.load_average()}")
    rr, config, params, queries, docs, source = build_reranker(args)
    device = jax.devices()[0]
    print(f"data: {len(docs)} DL19 pairs from {source}"
          + (f", {len(query_runs(queries))} queries scored one by one" if args.per_query else ", one list"))
    print(f"model: {args.preset} random weights, dtype={args.dtype}, device={device.device_kind} x{jax.device_count()}, "
          f"xla threads={len(os.sched_getaffinity(0))}, attention={bench_common.attention_path(config, args.dtype)}, "
          f"scan_layers={rr.config.scan_layers} (the Reranker's), batch_size={args.batch_size}, jax={jax.__version__}, "
          f"host heap: {args.host_heap_state}")

    encoded = rr.encode_pairs(queries, docs)
    clock = bench_common.CompileClock()
    first_s = bench_common.timed(lambda: score_ours(args, rr, queries, docs))  # compiles each shape once
    compile_cold = clock.seconds
    print(f"ours first pass: {first_s:.2f} s, of which compile {compile_cold:.2f} s ({clock.describe()})")

    ours_times, torch_times, ours_scores, torch_scores = [], [], None, None
    if not args.skip_torch:
        score_torch, torch_desc = torch_scorer(args, config, params, rr.score_tokens.true_id, rr.score_tokens.false_id)
        score_torch(queries[: args.batch_size], docs[: args.batch_size])  # warm-up
    for _ in range(args.rounds):  # the two sides take turns, so a shared CPU slows both alike
        t0 = time.perf_counter()
        ours_scores = score_ours(args, rr, queries, docs)  # tokenization included, as a user sees it
        ours_times.append(time.perf_counter() - t0)
        if not args.skip_torch:
            t0 = time.perf_counter()
            torch_scores = score_torch(queries, docs)
            torch_times.append(time.perf_counter() - t0)
    ours_pps = len(docs) * len(ours_times) / sum(ours_times)
    print(f"ours:  {ours_pps:9.1f} pairs/s  (passes {', '.join(f'{t:.2f}' for t in ours_times)} s)")
    peak = bench_common.peak_flops(device.device_kind, args.dtype)
    flops_per_pair = sum(encoder_flops_per_pair(config, len(ids)) for ids in encoded) / len(docs)  # unpadded
    if peak:
        print(f"ours MFU: {100 * flops_per_pair * ours_pps / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s ({args.dtype})")
    print(f"compile_s={compile_cold:.2f} cache=cold ({clock.describe()})")
    if not args.skip_warm_compile:
        warm, parts = bench_common.warm_compile_seconds(__file__, bench_common.strip_probe(argv), cache_dir)
        print(f"compile_s={warm:.2f} cache=warm ({parts})")
    print(f"load after: {bench_common.load_average()}")
    if args.skip_torch:
        return
    torch_pps = len(docs) * len(torch_times) / sum(torch_times)
    print(f"torch: {torch_pps:9.1f} pairs/s  (passes {', '.join(f'{t:.2f}' for t in torch_times)} s, {torch_desc})")
    if not peak and device.platform == "cpu":  # each side against its own GEMM library's rate on this host
        rates = bench_common.gemm_ceiling(args.dtype)
        print(bench_common.describe_ceiling(rates, {"ours": flops_per_pair * ours_pps / 1e9,
                                                    "torch": flops_per_pair * torch_pps / 1e9})
              + " (unpadded tokens: padding counts as lost work)")
    print(f"max |ours - torch| score difference: {np.abs(ours_scores - torch_scores).max():.2e}")
    print(f"ratio_vs_torch={ours_pps / torch_pps:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
