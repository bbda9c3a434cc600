"""Ahead-of-time TPU compiles on a CPU-only host (twolar_jax.aot): the tiny model on a v5e:2x2 slice.

libtpu's compiler builds the slice; nothing runs. The compiles share one module-scoped run of each layout,
so the whole file costs four small TPU compiles (about 15 s of CPU each) and one of flan-t5-small with
scanned layers (about 10 s).
"""
from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from twolar_jax.aot import flops, gin_jobs, main, report, topology
from twolar_jax.errors import OptionError
from twolar_jax.model import network
from twolar_jax.model.config import preset

TINY_FILE, NO_DROPOUT = "experiments/tiny_smoke.gin", "DROPOUT_RATE = 0.0"  # dropout doubles compile time
TINY = [f"--gin_file={TINY_FILE}", "--gin.DROPOUT_RATE=0.0"]
needs_libtpu = pytest.mark.skipif(not topology.libtpu_available(),
                                  reason="libtpu is not installed (pip install 'twolar-jax[aot]')")


def fields(text: str) -> dict[str, str]:
    """Every `key=value` token of the printed report (the mesh keeps its own `=`s)."""
    return dict(tok.split("=", 1) for tok in text.split() if "=" in tok)


def blocks(text: str) -> dict[str, dict[str, str]]:
    """The printed reports by job."""
    out = {}
    for block in text.split("job=")[1:]:
        values = fields("job=" + block)
        out[values["job"]] = values
    return out


def param_count(name: str) -> int:
    """Parameters of a preset, from the model's own (abstract) parameter tree."""
    shapes = jax.eval_shape(lambda: network.init_params(preset(name), jax.random.PRNGKey(0)))
    return sum(int(x.size) for x in jax.tree.leaves(shapes))


def cli_error(capsys, *args: str) -> str:
    """The one stderr line of a command that must fail with exit code 2 and print nothing on stdout."""
    assert main.main(["--topology=v5e:2x2", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith("twolar compile: error: ") and "Traceback" not in captured.err
    return captured.err


def run_cli(capsys, tmp_path: Path, *args: str) -> dict[str, dict[str, str]]:
    code = main.main(["--topology=v5e:2x2", f"--dump_dir={tmp_path}", *TINY, *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return blocks(out)


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    """tiny_smoke's own layout (pure data parallelism): train and score in one call."""
    tmp = tmp_path_factory.mktemp("aot_dp")
    reports = list(main.compile_jobs(topology_name="v5e:2x2", jobs=("train", "score"), gin_files=[TINY_FILE],
                                     gin_bindings=[NO_DROPOUT], dump_dir=str(tmp)))
    return {r.job: r for r in reports}, tmp


# ------------------------------------------------------------------------------------------ no libtpu needed
def test_aot_topology_names_and_hbm():
    v5e = topology.parse_topology("v5e:4x4")
    assert (v5e.chips, v5e.hbm_bytes, v5e.accelerator_type) == (16, 16 * 2**30, "v5litepod-16")
    v4 = topology.parse_topology("v4:2x2x4")
    assert (v4.chips, v4.generation.hbm_gib, v4.accelerator_type) == (16, 32.0, "v4-32")
    assert topology.parse_topology("v5p:4x4x4").generation.hbm_gib == 95.0
    assert topology.parse_topology("v5e:16x16").chips == 256
    assert topology.parse_topology("v6e:2x2").generation.hbm_gib == 32.0


@pytest.mark.parametrize("bad", ["v5e-16", "v5litepod-16", "v9:2x2", "v4:2x2", "v5e:4x4x4", "v5e:0x4", "tpu", ""])
def test_aot_bad_topology_is_a_one_line_option_error(bad):
    with pytest.raises(OptionError) as info:
        topology.parse_topology(bad)
    message = str(info.value)
    assert "\n" not in message and "--topology" in message and "v5e:4x4" in message and "v4:2x2x4" in message


def test_aot_cli_bad_topology_exits_2_with_one_line(capsys):
    assert main.main(["--topology=v5e-16", *TINY]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("twolar compile: error: --topology='v5e-16': expected GENERATION:AxB")


def test_aot_flops_multiply_scan_bodies_by_their_length():
    x = jax.ShapeDtypeStruct((64, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((32, 32), jnp.float32)

    def one(x, w):
        return x @ w

    def scanned(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=12)[0]

    single = flops.jaxpr_matmul_flops(jax.make_jaxpr(one)(x, w))
    assert single == 2 * 64 * 32 * 32
    assert flops.jaxpr_matmul_flops(jax.make_jaxpr(scanned)(x, w)) == 12 * single
    # XLA's own count sees the scan body once: what flops.py exists to correct.
    compiled = jax.jit(scanned).lower(x, w).compile()
    assert report.xla_flops(compiled) < 2 * single


def test_aot_collective_counts_read_opcodes_not_names():
    """Opcodes, not instruction names; async pairs once; XLA:TPU's reduce-scatter fusion as one reduce-scatter."""
    hlo = """HloModule jit_step, is_scheduled=true

%all-reduce-scatter.2.clone (input.1: f32[8]) -> f32[2] {
  %input.1 = f32[8]{0} parameter(0)
  %all-reduce.7 = f32[8]{0} all-reduce(f32[8]{0} %input.1), to_apply=%add
  ROOT %dynamic-slice.1 = f32[2]{0} dynamic-slice(f32[8]{0} %all-reduce.7, u32[] %i), dynamic_slice_sizes={2}
}

ENTRY %main (p: f32[2], x: f32[8]) -> f32[8] {
  %all-gather.3 = f32[8]{0} all-gather(f32[2]{0} %p), dimensions={0}
  %ars = (f32[8]{0}, f32[8]{0}) all-reduce-start(f32[8]{0} %x)
  %ard = f32[8]{0} all-reduce-done((f32[8]{0}, f32[8]{0}) %ars)
  %fusion.4 = f32[2]{0} fusion(f32[8]{0} %ard), kind=kCustom, calls=%all-reduce-scatter.2.clone
  ROOT %cp = f32[8]{0} collective-permute-start(f32[8]{0} %all-gather.3), source_target_pairs={{0,1}}
}
"""
    assert report.count_collectives(hlo) == {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 1,
                                             "all-to-all": 0, "collective-permute": 1}


def test_aot_does_not_import_the_data_side():
    """The run file's `import data_pipeline.seqio_input.tasks` is refused while parsing (gin_jobs docstring)."""
    import subprocess
    import sys

    code = ("import sys; from twolar_jax.aot import gin_jobs; "
            "gin_jobs.parse_job_gin(['experiments/twolar_flan_t5_xl_rank_net.gin']); job = gin_jobs.train_job(); "
            "print(job.batch_size, job.group_size, job.max_length, job.num_microbatches, job.mesh_shape, "
            "job.model.config.scan_layers, any(m.startswith(('data_pipeline', 'tensorflow')) for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout.split()
    assert out == ["32", "30", "512", "4", "(1,", "-1,", "4)", "True", "False"]


def test_aot_a_model_file_alone_trains_with_the_run_defaults():
    """No run file: the train compile reads runs/distill_train.gin first, as if included before the model file;
    --gin bindings override its defaults. Before, train.model stayed 'tiny' and train.total_steps unbound."""
    gin_jobs.parse_job_gin(["models/tiny.gin", "runs/distill_train.gin"], run_defaults=False)
    with_run_file = gin_jobs.train_job()  # what twolar-train makes of the model file plus the run file
    gin_jobs.parse_job_gin(["models/tiny.gin"])
    alone = gin_jobs.train_job()
    assert alone == with_run_file and alone.total_steps > 1 and alone.model.config == preset("tiny", dropout_rate=0.1)
    assert (alone.batch_size, alone.group_size, alone.max_length) == (32, 30, 512)
    smoke = ["TRAIN_STEPS = 20", "BATCH_SIZE = 8", "GROUP_SIZE = 4", "MAX_LENGTH = 64", "LEARNING_RATE = 1e-3",
             NO_DROPOUT]
    gin_jobs.parse_job_gin(["models/tiny.gin"], smoke)
    overridden = gin_jobs.train_job()
    gin_jobs.parse_job_gin([TINY_FILE])  # the experiment is the model file, the run file and these macros
    assert overridden == gin_jobs.train_job() and overridden.batch_size == 8


def test_aot_experiments_parse_as_they_did_without_the_run_defaults():
    """Every experiment includes the run file itself, so reading it first changes none of its bindings."""
    import gin

    from twolar_jax import resources

    experiments = [p for p in sorted(resources.gin_dir().glob("experiments/*.gin"))
                   if not p.name.startswith("demo")]  # the demo's files configure its other stages too
    assert len(experiments) >= 6
    for path in experiments:
        name = str(path.relative_to(resources.gin_dir()))
        gin_jobs.parse_job_gin([name], run_defaults=False)
        before, job = gin.config_str(), gin_jobs.train_job()
        gin_jobs.parse_job_gin([name])
        assert gin.config_str() == before and gin_jobs.train_job() == job, name


def test_aot_train_needs_a_model_file_one_line(capsys):
    """A train compile without a model file used to compile 'tiny'; now MODEL_CONFIG is named, before libtpu."""
    err = cli_error(capsys, "--job=train", "--gin_file=mesh/fsdp.gin")
    assert "MODEL_CONFIG is not bound" in err and "--gin_file=models/" in err


@pytest.mark.parametrize("binding, named", [
    ("--gin.TRAIN_STEPS=None", "train.total_steps (TRAIN_STEPS"),
    ("--gin.NUM_MICROBATCHES=None", "train.num_microbatches (NUM_MICROBATCHES"),
    ("--gin.MESH_SHAPE=None", "train.mesh_shape (MESH_SHAPE"),
    ("--gin.BATCH_SIZE=None", "bind no BATCH_SIZE"),
    ("--gin.MAX_LENGTH='64'", "MAX_LENGTH must be an integer >= 1, got '64'"),
    ("--gin.GROUP_SIZE=%UNSET_GROUP_SIZE", "gin macro UNSET_GROUP_SIZE is referenced but not bound"),
])
def test_aot_unbound_or_bad_train_binding_is_one_line_naming_it(capsys, binding, named):
    assert named in cli_error(capsys, "--job=train", "--gin_file=models/tiny.gin", binding)


def test_aot_unbound_total_steps_is_an_option_error_not_a_type_error():
    """Without the run defaults (and so without train.total_steps) train_job() names the binding; the model is the
    model file's MODEL_CONFIG, never train()'s default 'tiny'."""
    gin_jobs.parse_job_gin(["models/flan_t5_small.gin"], run_defaults=False)
    with pytest.raises(OptionError, match=r"bind no train\.total_steps.*--gin\.TRAIN_STEPS=VALUE"):
        gin_jobs.train_job()
    gin_jobs.parse_job_gin(["models/flan_t5_small.gin"], ["train.total_steps = 1", "BATCH_SIZE = 8", "GROUP_SIZE = 4",
                                                          "MAX_LENGTH = 64"], run_defaults=False)
    assert gin_jobs.train_job().model.config == preset("flan-t5-small", dropout_rate=0.1)


# --------------------------------------------------------------------------------------------- compiles
@needs_libtpu
def test_aot_libtpu_refuses_an_impossible_slice_with_an_option_error():
    with pytest.raises(OptionError, match="libtpu cannot build"):
        topology.topology_devices(topology.parse_topology("v5e:3x5"))


@needs_libtpu
def test_aot_tiny_compiles_both_jobs_with_sane_fields(dp_run):
    reports, _ = dp_run
    assert set(reports) == {"train", "score"}
    for r in reports.values():
        assert r.fits and r.memory is not None and 0 < r.per_chip_bytes < r.hbm_bytes
        assert r.flops > 0 and r.xla_flops > 0 and r.compile_s > 0
        assert math.prod(int(kv.split("=")[1]) for kv in r.mesh.split(",")) == r.chips == 4
        assert r.attention == "einsum"  # "auto" resolved for TPU, not for this CPU host
        assert r.memory.generated_code > 0 and r.memory.arguments > 0
    train = reports["train"]
    assert train.memory.aliased > 0  # the donated state is reused for the new one
    assert train.collectives["all-reduce"] > 0  # data parallel: gradients are summed over replicas
    assert train.collectives["all-gather"] == train.collectives["reduce-scatter"] == 0


@needs_libtpu
def test_aot_cli_prints_every_field_fsdp_layout_gathers_parameters(capsys, tmp_path):
    """`--gin_file=mesh/fsdp.gin` after the experiment: parameters split, gathered for use, gradients scattered."""
    out = run_cli(capsys, tmp_path, "--gin_file=mesh/fsdp.gin", "--job=train")["train"]
    for key in ("mesh", "arguments", "outputs", "aliased", "temporaries", "generated_code", "per_chip_gib",
                "hbm_gib", "fits", "flops", "xla_flops", "all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                "collective-permute", "attention", "compile_s", "lower_s"):
        assert key in out, key
    assert out["mesh"] == "data=1,fsdp=4,model=1" and out["fits"] == "True" and out["hbm_gib"] == "16"
    assert float(out["per_chip_gib"]) > 0 and float(out["flops"]) > 0 and out["attention"] == "einsum"
    assert int(out["all-gather"]) + int(out["reduce-scatter"]) > 0
    assert (tmp_path / "train.hlo.txt").exists() and (tmp_path / "train.json").exists()


@needs_libtpu
def test_aot_scan_layers_compiles_a_while_loop_with_the_same_flops(dp_run, capsys, tmp_path):
    reports, unscanned_dir = dp_run
    assert " while(" not in (unscanned_dir / "train.hlo.txt").read_text()
    out = run_cli(capsys, tmp_path, "--gin.model_preset.scan_layers=True", "--job=train")["train"]
    assert out["scan_layers"] == "True"
    assert " while(" in (tmp_path / "train.hlo.txt").read_text()
    assert float(out["flops"]) == pytest.approx(reports["train"].flops, rel=1e-3)  # same arithmetic, loop-aware


@needs_libtpu
def test_aot_out_of_memory_is_fits_false_not_a_crash(capsys, tmp_path):
    """A scoring batch far beyond a v5e chip's 16 GiB: the TPU compiler refuses it, the report says so."""
    out = run_cli(capsys, tmp_path, "--job=score", "--batch_size=131072")["score"]
    assert out["fits"] == "False" and float(out["per_chip_gib"]) > 16
    assert "all-gather" not in out  # nothing compiled, so no collectives to count


@needs_libtpu
def test_aot_a_batch_that_does_not_split_names_the_options(capsys):
    """xxl's 32 queries cannot give each of 256 fsdp replicas one: the error says which macros to change."""
    args = ["--topology=v5e:16x16", "--gin_file=experiments/twolar_flan_t5_xxl_rank_net.gin", "--gin_file=mesh/fsdp.gin"]
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "BATCH_SIZE / NUM_MICROBATCHES = 32 / 1" in err and "multiple of 256" in err


@needs_libtpu
def test_aot_train_compiles_the_model_file_it_is_given(capsys):
    """flan-t5-small's model file alone: the report names flan-t5-small and counts its parameters (was: tiny's)."""
    code = main.main(["--topology=v5e:2x2", "--job=train", "--gin_file=models/flan_t5_small.gin",
                      "--gin.train.total_steps=1", "--gin.BATCH_SIZE=8", "--gin.GROUP_SIZE=4", "--gin.MAX_LENGTH=64",
                      "--gin.DROPOUT_RATE=0.0", "--gin.model_preset.scan_layers=True"])  # both only compile faster
    out = capsys.readouterr().out
    assert code == 0, out
    train = blocks(out)["train"]
    assert train["model"] == "flan-t5-small" and train["batch"] == "8x4x64" and train["scan_layers"] == "True"
    assert float(train["params"]) == pytest.approx(param_count("flan-t5-small"), rel=1e-3)
    assert param_count("flan-t5-small") > 10 * param_count("tiny")  # far from what it compiled before
