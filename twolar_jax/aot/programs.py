"""The real programs, traced on a TPU topology's mesh from abstract arguments: no weights, no data.

Both are built the way a run builds them, for any ranking model: the train step is `trainer.Trainer`'s
(the model's abstract state laid out by its logical axes, the step partitioned by the one `Partitioner`),
fed the model's declared batch (`batch_features.abstract`) at the gin files' shape; the scoring program is
the Reranker's `scoring_runtime.partition_scoring`, with the parameters cast to the scoring dtype and laid
out by the same rules. A model resolves its platform choices for TPU before tracing (the pointwise T5's
attention "auto" would pick the CPU path on this host), so the compile is the one a TPU run makes.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from twolar_jax import partitioning, scoring_runtime, train_state
from twolar_jax.aot import flops as flops_lib
from twolar_jax.aot import report as report_lib
from twolar_jax.aot.gin_jobs import ScoreJob, TrainJob
from twolar_jax.aot.topology import Topology
from twolar_jax.errors import OptionError
from twolar_jax.model import network
from twolar_jax.model.config import PRESETS, RUNTIME_FIELDS, T5Config
from twolar_jax.partitioner import Partitioner
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.trainer import Trainer


@dataclasses.dataclass
class Program:
    """A traced program and what the report says about it."""

    job: str
    traced: Any  # jax.stages.Traced
    mesh: Mesh
    model: RankingModel
    shape: str  # the batch, in words
    trace_s: float
    params: int  # parameter count


def _count(shapes: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def model_name(model: RankingModel | T5Config) -> str:
    """The T5 preset a model's config is (whatever its dtype, remat, dropout, attention, scan_layers), else
    'custom'; a model without a T5 config goes by its class name."""
    config = model if isinstance(model, T5Config) else getattr(model, "config", None)
    if not isinstance(config, T5Config):
        return type(model).__name__
    for name, preset in PRESETS.items():
        if preset.replace(**{f: getattr(config, f) for f in RUNTIME_FIELDS}) == config:
            return name
    return "custom"


def _for_tpu(model: RankingModel) -> RankingModel:
    config = getattr(model, "config", None)
    if not isinstance(config, T5Config):
        return model
    return dataclasses.replace(model, config=config.replace(attention=network.resolve_attention(config, "tpu"),
                                                            projection=network.resolve_projection(config, "tpu")))


def _check_split(count: int, partitioner: Partitioner, what: str) -> None:
    """`count` batch rows (or queries) must split evenly over the mesh's batch axes; say which option to change."""
    ways = partitioner.batch_parallelism
    if count % ways:
        raise OptionError(f"{what} does not split over the batch axes of mesh {partitioner.describe()} ({ways} "
                          f"ways); make it a multiple of {ways}")


def _describe(model: RankingModel) -> str:
    config = getattr(model, "config", None)
    if not isinstance(config, T5Config):
        return ""
    return f" dtype={config.dtype} remat={config.remat} scan_layers={config.scan_layers}"


def train_program(job: TrainJob, devices: Sequence[Any]) -> Program:
    """The distillation train step on `devices`, traced from abstract state, batch and rng."""
    model = _for_tpu(job.model)
    partitioner = Partitioner.create(job.mesh_shape, devices=list(devices), logical_axis_rules=job.rules)
    trainer = Trainer(model, partitioner, optimizer=job.optimizer, total_steps=job.total_steps,
                      num_microbatches=job.num_microbatches, enable_dropout=job.enable_dropout, seed=job.seed)
    m = job.num_microbatches
    if job.batch_size % m:
        raise OptionError(f"BATCH_SIZE={job.batch_size} does not split into NUM_MICROBATCHES={m}")
    per_micro = job.batch_size // m
    _check_split(per_micro, partitioner,
                 f"BATCH_SIZE / NUM_MICROBATCHES = {job.batch_size} / {m} = {per_micro} queries per micro-batch")
    try:
        batch = model.batch_features.abstract(job.sizes)
    except ValueError as e:  # a dimension the gin files do not size (TARGET_LENGTH for a listwise student)
        raise OptionError(f"{type(model).__name__}'s batch: {e}; bind its size in the gin files") from None
    rng = jax.ShapeDtypeStruct(jax.random.PRNGKey(0).shape, jnp.uint32)
    start = time.perf_counter()
    traced = trainer.train_step(batch).trace(trainer.shapes, batch, rng)
    shape = f"batch={job.batch_size}x{job.group_size}x{job.max_length} microbatches={m}" + _describe(model)
    return Program("train", traced, partitioner.mesh, model, shape, time.perf_counter() - start,
                   _count(trainer.shapes.params))


def abstract_params(model: RankingModel) -> Any:
    """Parameter shapes (jax.eval_shape of the init) in the model's scoring dtype: the Reranker casts all of them."""
    shapes = jax.eval_shape(model.init_params, jax.random.PRNGKey(0))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, model.param_dtype), shapes)


def score_program(job: ScoreJob, devices: Sequence[Any]) -> Program:
    """The Reranker's scoring program on `devices`: params cast to the scoring dtype and laid out by the
    logical-axis rules (as scoring_runtime.place_params does), tokens split on the batch axis."""
    model = _for_tpu(job.model)
    partitioner = Partitioner.create(job.mesh_shape, devices=list(devices), logical_axis_rules=job.rules)
    _check_split(job.batch_size, partitioner, f"--batch_size={job.batch_size}")
    shapes = abstract_params(model)
    params = train_state.with_shardings(shapes, partitioner.param_shardings(model.param_logical_axes(), shapes))
    sizes = {"batch": job.batch_size, "max_length": job.max_length, **model.fixed_sizes()}
    batch = model.score_features.abstract(sizes)
    start = time.perf_counter()
    traced = scoring_runtime.partition_scoring(model, partitioner, shapes, batch).trace(params, batch)
    head = getattr(model, "score_head", None)
    dims = "x".join(str(sizes[d]) for d in model.score_features.features[0].dims)
    shape = f"batch={dims}" + (f" head={head}" if head else "") + _describe(model)
    return Program("score", traced, partitioner.mesh, model, shape, time.perf_counter() - start, _count(shapes))


def compile_program(program: Program, topology: Topology, *, dump_dir: Optional[str] = None) -> report_lib.Report:
    """Lower and compile for the topology (never run); an HBM refusal becomes fits=False, not an error."""
    start = time.perf_counter()
    lowered = program.traced.lower()
    lower_s = program.trace_s + time.perf_counter() - start
    report = report_lib.Report(
        job=program.job, topology=topology.name, chips=topology.chips, hbm_bytes=topology.hbm_bytes,
        mesh=partitioning.mesh_shape_str(program.mesh),
        attention=getattr(getattr(program.model, "config", None), "attention", "-"),
        model=f"{model_name(program.model)} params={program.params:.4g}", shape=program.shape,
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
