"""Every gin file of the training side parses (unknown names are errors), and binds what it says."""
from __future__ import annotations

import gin
import pytest

from twolar_jax import gin_utils, partitioning, resources
from twolar_jax.model.config import T5Config
from twolar_jax.train import register_configurables

GIN_DIR = resources.gin_dir()
FILES = sorted(str(p.relative_to(GIN_DIR)) for sub in ("runs", "mesh", "experiments", "eval")
               for p in (GIN_DIR / sub).glob("*.gin"))


@pytest.fixture(autouse=True)
def clean_gin():
    register_configurables()
    gin.clear_config()
    yield
    gin.clear_config()


def _parse(*files: str, bindings=()):
    gin_utils.parse_gin_flags(list(files), list(bindings), skip_unknown=False)


def test_train_gin_files_found():
    assert any(f.startswith("runs/") for f in FILES) and any(f.startswith("experiments/") for f in FILES)
    assert "mesh/rules.gin" in FILES


REQUIRED = ["MODEL_DIR = '/tmp/model_dir'", "DISTILL_JSONL = '/tmp/distill.jsonl'"]


def _is_demo(name: str) -> bool:
    """The demo's experiments (owned by twolar_jax.demo) also name the build and eval configurables."""
    return name.startswith("experiments/demo")


BUILD_REQUIRED = ["OUTPUT_DIR = '/tmp/out'", "MSMARCO_COLLECTION = 'c.tsv'", "DOC2QUERY_CKPT = 'd'",
                  "SPLADE_CKPT = 's'", "DRAGON_QUERY_ENCODER = 'q'", "DRAGON_CONTEXT_ENCODER = 'c'", "MONOT5_CKPT = 'm'"]


@pytest.mark.parametrize("name", FILES)
def test_train_gin_file_parses(name):
    """Every shipped gin file parses with unknown names as errors (build and eval files through their entries)."""
    if _is_demo(name):
        from twolar_jax import demo

        demo.register_configurables()
        _parse(name, bindings=REQUIRED + ["OUTPUT_DIR = '/tmp/out'"])
    elif name.startswith("runs/build_"):
        from data_pipeline.set_builder.configurables import register_build

        register_build()
        _parse(name, bindings=[b for b in BUILD_REQUIRED if b.split(" =")[0] in (GIN_DIR / name).read_text()])
    elif name.startswith("eval/"):
        from eval.run import register_configurables as register_eval

        register_eval()
        _parse(name)
    elif name.startswith("mesh/"):
        _parse(name)
    elif name.startswith("runs/"):  # a run file needs a model file, as experiments provide
        _parse("models/tiny.gin", name, bindings=REQUIRED)
    else:
        _parse(name, bindings=REQUIRED)


def test_train_gin_required_macros_are_enforced():
    with pytest.raises(ValueError, match="MODEL_DIR.*gin.REQUIRED"):
        _parse("experiments/tiny_smoke.gin", bindings=["DISTILL_JSONL = 'x'"])


@pytest.mark.parametrize("name", [f for f in FILES if f.startswith("experiments/") and not _is_demo(f)])
def test_train_gin_experiment_binds_a_model_and_mesh(name):
    _parse(name, bindings=REQUIRED)
    config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    assert isinstance(config, T5Config)
    shape = gin.query_parameter("%MESH_SHAPE")
    assert len(shape) == 3 and list(shape).count(-1) == 1
    rules = partitioning.normalize_rules(gin.query_parameter("%LOGICAL_AXIS_RULES"))
    assert rules == partitioning.load_logical_axis_rules()


def test_train_gin_eval_files_include_the_base():
    """One base eval file: every per-dataset file includes it and sets only what differs."""
    for path in (GIN_DIR / "eval").glob("*.gin"):
        if path.name != "base.gin":
            assert "include 'eval/base.gin'" in path.read_text(), path
            assert "RerankerConfig.score_head" not in path.read_text(), path


def test_train_gin_xl_experiment_values():
    _parse("experiments/twolar_flan_t5_xl_rank_net.gin", bindings=["MODEL_DIR = '/tmp/x'", "DISTILL_JSONL = 'x'"])
    config = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    assert (config.d_model, config.num_encoder_layers, config.dtype, config.remat) == (2048, 24, "bfloat16", True)
    assert tuple(gin.query_parameter("%MESH_SHAPE")) == (1, -1, 4)
    assert gin.query_parameter("%NUM_MICROBATCHES") == 4


def test_train_gin_twolar_recipe_defaults():
    _parse("experiments/twolar_flan_t5_large_rank_net.gin", bindings=["MODEL_DIR = '/tmp/x'", "DISTILL_JSONL = 'x'"])
    assert gin.query_parameter("%LEARNING_RATE") == 5e-5
    assert gin.query_parameter("OptimizerConfig.weight_decay") == 0.01
    assert gin.query_parameter("OptimizerConfig.clip_norm") == 1.0
    assert gin.query_parameter("OptimizerConfig.name") == "adamw"
    assert gin.query_parameter("%LOSS") == "rank_net"
    assert gin.query_parameter("%BATCH_SIZE") == 32 and gin.query_parameter("%NUM_MICROBATCHES") == 32
    assert gin.query_parameter("%GROUP_SIZE") == 30


def test_train_gin_unknown_binding_is_an_error():
    with pytest.raises(ValueError, match="No configurable matching 'trian'"):
        _parse("runs/distill_train.gin", bindings=["trian.total_steps = 3"])


def test_train_gin_each_parse_starts_from_a_clear_config():
    """A second run in one process (train, then eval in a notebook) neither fails on the first run's
    finalized config nor inherits its bindings."""
    recipe = "experiments/twolar_flan_t5_large_rank_net.gin"
    _parse(recipe, bindings=["MODEL_DIR = '/tmp/first'", "DISTILL_JSONL = 'x'", "OptimizerConfig.clip_norm = 0.5"])
    assert gin.config_is_locked() and gin.query_parameter("OptimizerConfig.clip_norm") == 0.5
    _parse(recipe, bindings=["MODEL_DIR = '/tmp/second'", "DISTILL_JSONL = 'x'"])
    assert gin.query_parameter("%MODEL_DIR") == "/tmp/second"
    assert gin.query_parameter("OptimizerConfig.clip_norm") == 1.0  # the recipe's, not the first run's
