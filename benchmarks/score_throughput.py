"""Scoring throughput: our jit-compiled Reranker against transformers' PyTorch T5 in eager mode.

Both score the same DL19 BM25 candidate texts with the same random weights (our params exported with
`save_hf_checkpoint` and loaded by transformers), the way TWOLAR, pygaggle and rerankers score: the whole
batch padded to its longest pair, full forward, one decoder step. Prints pairs/s for each and, last,
`ratio_vs_torch=<ours/torch>`. Compilation (ours) and a warm-up batch (torch) are excluded and reported.

  python benchmarks/score_throughput.py --quick            # < 60 s on a 2-core CPU
  python benchmarks/score_throughput.py --preset flan-t5-base --dtype bfloat16 --pairs 4300   # on a GPU
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

# Peak dense bf16 / fp32 throughput used for MFU, by device kind (TFLOP/s).
PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 67.0}, "H200": {"bfloat16": 989.0, "float32": 67.0}}


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


def encoder_flops_per_pair(config, length: int) -> float:
    """Forward FLOPs of the encoder over `length` tokens plus one decoder step (matmuls only)."""
    d, h, k, f = config.d_model, config.num_heads, config.d_kv, config.d_ff
    ff = (3 if config.is_gated else 2) * d * f
    enc_layer = 4 * d * h * k + ff + 2 * length * h * k
    dec_layer = 4 * d * h * k + 2 * d * h * k + ff
    return 2 * (length * enc_layer * config.num_encoder_layers + dec_layer * config.num_decoder_layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="flan-t5-small")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--quick", action="store_true", help="128 pairs (under 60 s on a 2-core CPU)")
    ap.add_argument("--skip_torch", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.pairs = min(args.pairs, 128)

    import jax
    import numpy as np

    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params
    from twolar_jax.reranker import Reranker

    queries, docs, source = load_dl19_texts(args.pairs)
    config = preset(args.preset)
    params = init_params(config, 0)
    device = jax.devices()[0]
    print(f"data: {len(docs)} DL19 pairs from {source}")
    print(f"model: {args.preset} random weights, dtype={args.dtype}, device={device.device_kind} x{jax.device_count()}")

    rr = Reranker.from_params(config, params, dtype=args.dtype, batch_size=args.batch_size, max_length=args.max_length)
    encoded = rr.encode_pairs(queries, docs)
    t0 = time.perf_counter()
    rr.score_token_ids(encoded)  # compiles each length bucket once
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours_scores = rr.score_pairs(queries, docs)  # tokenization included, as a user sees it
    ours_s = time.perf_counter() - t0
    ours_pps = len(docs) / ours_s
    print(f"ours:  {ours_pps:9.1f} pairs/s  ({ours_s:.2f} s; first pass incl. compile {compile_s:.2f} s)")
    kind = device.device_kind
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    if peak:
        flops = sum(encoder_flops_per_pair(config, len(ids)) for ids in encoded)
        print(f"ours MFU: {100 * flops / ours_s / (peak[args.dtype] * 1e12):.1f}% of {peak[args.dtype]} TFLOP/s")
    if args.skip_torch:
        return

    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_hf_checkpoint(Path(tmp) / "hf", config, params)
        tok = transformers.T5Tokenizer.from_pretrained(str(hf_dir))
        torch_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
        model = transformers.T5ForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch_dtype).eval()
    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(tdev)
    true_id, false_id = rr.score_tokens.true_id, rr.score_tokens.false_id

    def torch_score(qs, ds):
        out = []
        for i in range(0, len(ds), args.batch_size):
            texts = [f"Query: {q} Document: {d} Relevant:" for q, d in zip(qs[i:i + args.batch_size], ds[i:i + args.batch_size])]
            enc = tok(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt").to(tdev)
            with torch.inference_mode():
                logits = model(**enc, decoder_input_ids=torch.zeros((len(texts), 1), dtype=torch.long, device=tdev)).logits[:, 0, :]
            out.append((logits[:, true_id] - logits[:, false_id]).float().cpu().numpy())
        return np.concatenate(out)

    torch_score(queries[: args.batch_size], docs[: args.batch_size])  # warm-up
    t0 = time.perf_counter()
    torch_scores = torch_score(queries, docs)
    torch_s = time.perf_counter() - t0
    torch_pps = len(docs) / torch_s
    print(f"torch: {torch_pps:9.1f} pairs/s  ({torch_s:.2f} s, eager, {torch.get_num_threads()} threads, {tdev})")
    print(f"max |ours - torch| score difference: {np.abs(ours_scores - torch_scores).max():.2e}")
    print(f"ratio_vs_torch={ours_pps / torch_pps:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
