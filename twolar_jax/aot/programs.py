"""The real programs, traced on a TPU topology's mesh from abstract arguments: no weights, no data.

The train step is the one `twolar-train` runs: `train_setup.prepare` (mesh, rules, optimizer, abstract state
from jax.eval_shape, state shardings) and `trainer.partition_train_step(make_train_step(...))`, fed a
ShapeDtypeStruct batch of the gin files' shape. The scoring program is the Reranker's
`scoring_runtime.score_batch` with the parameters laid out by the same logical-axis rules and the tokens
split on the batch axis. Attention "auto"
is resolved for TPU before tracing (on this host it would pick the CPU path), so the compile is the one a
TPU run makes.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from twolar_jax import partitioning, scoring, scoring_runtime, train_setup, train_state, trainer
from twolar_jax.aot import flops as flops_lib
from twolar_jax.aot import report as report_lib
from twolar_jax.aot.gin_jobs import ScoreJob, TrainJob
from twolar_jax.aot.topology import Topology
from twolar_jax.errors import OptionError
from twolar_jax.model import network
from twolar_jax.model.config import PRESETS, RUNTIME_FIELDS, T5Config


@dataclasses.dataclass
class Program:
    """A traced program and what the report says about it."""

    job: str
    traced: Any  # jax.stages.Traced
    mesh: Mesh
    config: T5Config
    shape: str  # the batch, in words
    trace_s: float
    params: int  # parameter count


def _count(shapes: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def model_name(config: T5Config) -> str:
    """The preset a config is (whatever its dtype, remat, dropout, attention, scan_layers), else 'custom'."""
    for name, preset in PRESETS.items():
        if preset.replace(**{f: getattr(config, f) for f in RUNTIME_FIELDS}) == config:
            return name
    return "custom"


def _for_tpu(config: T5Config) -> T5Config:
    return config.replace(attention=network.resolve_attention(config, "tpu"),
                          projection=network.resolve_projection(config, "tpu"))


def _check_split(count: int, mesh: Mesh, rules: Sequence, what: str) -> None:
    """`count` batch rows (or queries) must split evenly over the mesh's batch axes; say which option to change."""
    ways = partitioning.batch_parallelism(mesh, rules)
    if count % ways:
        raise OptionError(f"{what} does not split over the batch axes of mesh "
                          f"{partitioning.mesh_shape_str(mesh)} ({ways} ways); make it a multiple of {ways}")


def abstract_batch(job: TrainJob) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch as the data pipeline builds it (data_pipeline/seqio_input/batches.py)."""
    b, n, length = job.batch_size, job.group_size, job.max_length
    return {"encoder_input_tokens": jax.ShapeDtypeStruct((b, n, length), jnp.int32),
            "teacher_ranks": jax.ShapeDtypeStruct((b, n), jnp.int32),
            "passage_mask": jax.ShapeDtypeStruct((b, n), jnp.int32),
            "teacher_scores": jax.ShapeDtypeStruct((b, n), jnp.float32)}


def train_program(job: TrainJob, devices: Sequence[Any]) -> Program:
    """The distillation train step on `devices`, traced from abstract state, batch and rng."""
    config = _for_tpu(job.config)
    setup = train_setup.prepare(config=config, total_steps=job.total_steps, optimizer=job.optimizer, spec=job.spec,
                                mesh_shape=job.mesh_shape, num_devices=None, logical_axis_rules=job.rules,
                                seed=job.seed, devices=devices)
    m = job.spec.num_microbatches
    if job.batch_size % m:
        raise OptionError(f"BATCH_SIZE={job.batch_size} does not split into NUM_MICROBATCHES={m}")
    per_micro = job.batch_size // m
    _check_split(per_micro, setup.mesh, setup.rules,
                 f"BATCH_SIZE / NUM_MICROBATCHES = {job.batch_size} / {m} = {per_micro} queries per micro-batch")
    batch = abstract_batch(job)
    step = trainer.partition_train_step(trainer.make_train_step(config, setup.optimizer, setup.schedule, job.spec),
                                        setup.mesh, setup.rules, setup.shardings, batch)
    rng = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32)
    start = time.perf_counter()
    traced = step.trace(setup.shapes, batch, rng)
    shape = (f"batch={job.batch_size}x{job.group_size}x{job.max_length} microbatches={m} "
             f"dtype={config.dtype} remat={config.remat} scan_layers={config.scan_layers}")
    return Program("train", traced, setup.mesh, config, shape, time.perf_counter() - start,
                   _count(setup.shapes.params))


def abstract_params(config: T5Config, dtype: Any) -> Any:
    """Parameter shapes (jax.eval_shape of the init) in `dtype`: the Reranker casts all of them."""
    shapes = jax.eval_shape(lambda: network.init_params(config, jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), shapes)


def score_program(job: ScoreJob, devices: Sequence[Any]) -> Program:
    """The Reranker's scoring_runtime.score_batch on `devices`: params cast to the scoring dtype and laid out by
    the logical-axis rules (as scoring_runtime.place_params does), tokens split on the batch axis."""
    config = _for_tpu(job.config)
    rules = partitioning.normalize_rules(job.rules)
    mesh = partitioning.make_mesh(job.mesh_shape, devices=list(devices))
    _check_split(job.batch_size, mesh, rules, f"--batch_size={job.batch_size}")
    shapes = abstract_params(config, jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32)
    shardings = partitioning.tree_shardings(network.logical_axes(config), shapes, mesh, rules)
    params = train_state.with_shardings(shapes, shardings)
    tokens = jax.ShapeDtypeStruct((job.batch_size, job.max_length), jnp.int32,
                                  sharding=NamedSharding(mesh, partitioning.batch_spec(2, rules)))
    vocab_ids = scoring.head_vocab_ids(job.score_head, scoring.default_score_tokens())
    start = time.perf_counter()
    with partitioning.activation_context(mesh, rules):
        traced = scoring_runtime.score_batch.trace(params, tokens, config=config, head=job.score_head,
                                                   vocab_ids=vocab_ids, rules=rules)
    shape = (f"batch={job.batch_size}x{job.max_length} head={job.score_head} dtype={config.dtype} "
             f"scan_layers={config.scan_layers}")
    return Program("score", traced, mesh, config, shape, time.perf_counter() - start, _count(shapes))


def compile_program(program: Program, topology: Topology, *, dump_dir: Optional[str] = None) -> report_lib.Report:
    """Lower and compile for the topology (never run); an HBM refusal becomes fits=False, not an error."""
    start = time.perf_counter()
    lowered = program.traced.lower()
    lower_s = program.trace_s + time.perf_counter() - start
    report = report_lib.Report(
        job=program.job, topology=topology.name, chips=topology.chips, hbm_bytes=topology.hbm_bytes,
        mesh=partitioning.mesh_shape_str(program.mesh), attention=program.config.attention,
        model=f"{model_name(program.config)} params={program.params:.4g}", shape=program.shape,
        lower_s=lower_s, compile_s=0.0, flops=flops_lib.jaxpr_matmul_flops(program.traced.jaxpr))
    start = time.perf_counter()
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses a program that does not fit in HBM
        if not report_lib.is_out_of_memory(e):
            raise
        report.compile_s = time.perf_counter() - start
        report.oom_bytes, report.error = report_lib.oom_report(e)
        return report
    report.compile_s = time.perf_counter() - start
    report.memory = report_lib.MemoryBytes.of(compiled)
    report.xla_flops = report_lib.xla_flops(compiled)
    hlo = compiled.as_text()
    report.collectives = report_lib.count_collectives(hlo)
    if dump_dir:
        Path(dump_dir, f"{program.job}.hlo.txt").write_text(hlo)
    return report
