r"""One TWOLAR training step, ours (JAX) against a PyTorch reference, same weights and batch, one process.

The step: 1 query x 30 passages x 512 tokens, encoder pass + one decoder step from the start token,
score = z_true - z_false, RankNet over the teacher-ordered pairs, clip 1.0, AdamW (lr 5e-5, wd 0.01).
The reference is transformers' T5ForConditionalGeneration (first-step logits), the same RankNet and
torch.optim.AdamW, loaded from our random weights written with twolar_jax.hf_conversion.

    .venv/bin/python benchmarks/train_step.py --quick
    .venv/bin/python benchmarks/train_step.py --preset flan-t5-base --dtype bfloat16   # on a GPU

The two sides take turns step by step (after a warm-up), so a CPU shared with other jobs slows both
alike. Prints steps/s and tokens/s for both, each side's CPU seconds (user, system) and page faults per
step, the first step's loss from both (they must agree), MFU where the device's peak is known
(H100/H200/A100) and on a CPU each side's model GFLOP/s against its library's rate on one GEMM alone,
`compile_s=` of the first step in this fresh process against an empty persistent compilation cache
(cache=cold) and in a fresh subprocess that compiles the same step against the filled one (cache=warm),
and last `ratio_vs_torch=<ours steps/s / torch steps/s>`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="model preset (default: flan-t5-small; tiny with --quick)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--group_size", type=int, default=None, help="passages per query (default 30)")
    p.add_argument("--max_length", type=int, default=None, help="tokens per passage (default 512)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 5; 5 with --quick)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="the tiny preset (same 30x512 batch): under a minute on CPU")
    bench_common.add_model_flags(p)
    p.add_argument("--skip_warm_compile", action="store_true", help="do not start the warm-cache subprocess")
    p.add_argument(bench_common.PROBE_FLAG, default=None, metavar="CACHE_DIR", dest="compile_probe",
                   help=argparse.SUPPRESS)  # internal: only compile the step, against CACHE_DIR
    args = p.parse_args(argv)
    if args.quick:
        args.preset = args.preset or "tiny"
        args.group_size = args.group_size or 30
        args.max_length = args.max_length or 512
        args.steps = args.steps or 4
        args.warmup = min(args.warmup, 1)
    args.preset = args.preset or "flan-t5-small"
    args.group_size = args.group_size or 30
    args.max_length = args.max_length or 512
    args.steps = args.steps or 5
    return args


def make_batch(n: int, length: int, seed: int = 0):
    """One query's group: n full-length passages (no padding, so both sides do the same work)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, 32000, (1, n, length)).astype(np.int32)
    tokens[..., -1] = 1  # EOS
    return {
        "encoder_input_tokens": tokens,
        "decoder_input_tokens": np.zeros((1, n, 1), np.int32),
        "teacher_ranks": np.arange(n, dtype=np.int32)[None],
        "passage_mask": np.ones((1, n), np.int32),
    }


def train_flops(config, n: int, length: int) -> float:
    """Model FLOPs of one step (forward x 3): encoder matmuls + attention; the one decoder step is small."""
    d, dff, h, dkv, layers = config.d_model, config.d_ff, config.num_heads, config.d_kv, config.num_encoder_layers
    mlp = (3 if config.is_gated else 2) * d * dff
    per_token = 2 * layers * (4 * d * h * dkv + mlp) + 2 * layers * 2 * length * h * dkv
    return 3.0 * per_token * n * length


def make_jax_step(config, params, batch, tokens):
    """Our jitted step (state donated); returns (step() -> metrics, state_ready())."""
    import jax

    from twolar_jax import compiler_options, optimizers
    from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
    from twolar_jax.train_state import TrainState
    from twolar_jax.train_step import make_train_step

    opt, schedule = optimizers.make_optimizer(learning_rate=5e-5, weight_decay=0.01, clip_norm=1.0)
    model = PointwiseCrossEncoder(config, loss_name="rank_net", score_tokens=tokens)
    jitted = jax.jit(make_train_step(model, opt, schedule, enable_dropout=False), donate_argnums=(0,),
                     compiler_options=compiler_options.for_platform(jax.default_backend()))  # as the trainer does
    holder = {"state": TrainState.create(jax.device_put(params), opt)}
    batch = jax.device_put(batch)
    rng = jax.random.PRNGKey(0)

    def step():
        holder["state"], metrics = jitted(holder["state"], batch, rng)
        return metrics

    def ready():
        jax.block_until_ready(holder["state"])

    def compile_only():
        jitted.lower(holder["state"], batch, rng).compile()

    return step, ready, compile_only


def make_torch_step(hf_dir, batch, args, tokens, device):
    """transformers' T5 + torch AdamW on the same weights; returns (step() -> loss, sync())."""
    import torch
    from transformers import T5ForConditionalGeneration

    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = T5ForConditionalGeneration.from_pretrained(hf_dir, dtype=torch.float32).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    ids = torch.as_tensor(batch["encoder_input_tokens"][0], dtype=torch.long, device=device)
    attn = (ids != 0).long()
    dec = torch.zeros((ids.shape[0], 1), dtype=torch.long, device=device)
    n = ids.shape[0]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)  # teacher order = index

    def step():
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids, attention_mask=attn, decoder_input_ids=dec).logits[:, 0, :]
        logits = logits.float()
        s = logits[:, tokens.true_id] - logits[:, tokens.false_id]
        # RankNet: every pair (i better than j): log(1 + exp(s_j - s_i)), mean over pairs.
        loss = torch.nn.functional.softplus(s[None, :] - s[:, None])[upper].mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step, sync, model.config._attn_implementation


def build(args):
    """Config, params, batch and score tokens of the run, shared by the main process and the probe."""
    import jax

    from twolar_jax.model import network
    from twolar_jax.model.config import preset
    from twolar_jax.scoring import resolve_score_tokens
    from twolar_jax.tokenizer import T5Tokenizer

    config = preset(args.preset, dropout_rate=0.0, dtype=args.dtype, attention=args.attention,
                    scan_layers=args.scan_layers)
    tokens = resolve_score_tokens(T5Tokenizer())
    params = jax.device_get(network.init_params(config, 0))
    return config, params, make_batch(args.group_size, args.max_length), tokens


def run_probe(args) -> None:
    """The warm-cache measurement: a fresh process that only compiles the step."""
    bench_common.use_cache(args.compile_probe)
    config, params, batch, tokens = build(args)
    _, _, compile_only = make_jax_step(config, params, batch, tokens)
    clock = bench_common.CompileClock()
    compile_only()
    bench_common.report_probe(clock)


def main(argv: list[str] | None = None) -> None:
    bench_common.run_main(argv, parse_args, run_probe, run)


def run(args, argv, cache_dir: str) -> None:
    import jax
    import torch

    from twolar_jax.hf_conversion import save_hf_checkpoint

    print(f"load before: {bench_common.load_average()}")
    config, params, batch, tokens = build(args)
    n_tok = args.group_size * args.max_length
    backend = jax.default_backend()
    device = torch.device("cuda" if backend == "gpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"preset={args.preset} dtype={args.dtype} batch=1x{args.group_size}x{args.max_length} "
          f"attention={bench_common.attention_path(config, args.dtype)} scan_layers={config.scan_layers} "
          f"jax={jax.__version__} backend={backend} ({jax.devices()[0].device_kind}) torch={torch.__version__} "
          f"device={device} threads: torch={torch.get_num_threads() if device.type == 'cpu' else '-'} "
          f"xla={len(os.sched_getaffinity(0))} host heap: {args.host_heap_state}")

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(Path(tmp) / "hf", config.replace(dtype="float32"), params)
        torch_step, torch_sync, torch_attention = make_torch_step(str(Path(tmp) / "hf"), batch, args, tokens, device)
    jax_step, jax_ready, _ = make_jax_step(config, params, batch, tokens)

    clock = bench_common.CompileClock()
    t0 = time.perf_counter()
    j_loss = float(jax_step()["loss"])
    first_s = time.perf_counter() - t0
    compile_cold = clock.seconds
    t_loss = float(torch_step().detach())
    for _ in range(args.warmup):
        jax_step()
        torch_step()
    jax_ready()
    torch_sync()
    j_times, t_times = [], []
    j_os, t_os = bench_common.OsCost(), bench_common.OsCost()
    for _ in range(args.steps):  # the two sides take turns, so a shared CPU slows both alike
        with j_os:
            t0 = time.perf_counter()
            jax_step()
            jax_ready()
            j_times.append(time.perf_counter() - t0)
        with t_os:
            t0 = time.perf_counter()
            torch_step()
            torch_sync()
            t_times.append(time.perf_counter() - t0)
    j_step, t_step = sum(j_times) / len(j_times), sum(t_times) / len(t_times)

    print(f"first-step loss: jax={j_loss:.6f} torch={t_loss:.6f} (same weights, same batch)")
    print(f"jax:   {1 / j_step:.3f} steps/s  {n_tok / j_step:,.0f} tokens/s  (steps {', '.join(f'{t:.2f}' for t in j_times)} s; "
          f"first call {first_s:.1f} s)")
    print(f"torch: {1 / t_step:.3f} steps/s  {n_tok / t_step:,.0f} tokens/s  (steps {', '.join(f'{t:.2f}' for t in t_times)} s; "
          f"attention={torch_attention})")
    print(f"per step, jax: {j_os.describe(args.steps)}; torch: {t_os.describe(args.steps)}")
    peak = bench_common.peak_flops(jax.devices()[0].device_kind, args.dtype)
    flops = train_flops(config, args.group_size, args.max_length)
    if peak:
        print(f"MFU: jax={flops / j_step / peak:.1%} torch={flops / t_step / peak:.1%} "
              f"({flops / 1e12:.2f} TFLOP/step, peak {peak / 1e12:.0f} TFLOP/s {args.dtype})")
    elif backend == "cpu":  # no table peak: each side against its own GEMM library's rate on this host
        rates = bench_common.gemm_ceiling(args.dtype)
        print(bench_common.describe_ceiling(rates, {"ours": flops / j_step / 1e9, "torch": flops / t_step / 1e9}))
    print(f"compile_s={compile_cold:.2f} cache=cold ({clock.describe()})")
    if not args.skip_warm_compile:
        warm, parts = bench_common.warm_compile_seconds(__file__, bench_common.strip_probe(argv), cache_dir)
        print(f"compile_s={warm:.2f} cache=warm ({parts})")
    print(f"load after: {bench_common.load_average()}")
    print(f"ratio_vs_torch={t_step / j_step:.3f}")


if __name__ == "__main__":
    main()
