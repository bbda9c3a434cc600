"""What a training run's gin files say the step is, read without the data side (AOT never reads data).

The run file does `import data_pipeline.seqio_input.tasks`, which would load TensorFlow and seqio (seconds
and about a GiB) only to register the two configurables that make batches (`seqio_batches`,
`DistillFiles`). Binding `train.train_batches` to a placeholder alone would not stop that import, so the
import of `data_pipeline` is refused while the files are parsed, and gin skips it and the bindings of
exactly those two names (skip_unknown with a list); any other unknown name, a typo in an override for
instance, stays an error. The bindings that *refer* to them (`train.train_batches`,
`ValidationConfig.batches`, `DISTILL_FILES`) are then bound to None, because gin refuses to finish a config
with references to unknown names; the %gin.REQUIRED MODEL_DIR and DISTILL_JSONL macros get placeholders.
Nothing reads any of them. The batch shape comes from the BATCH_SIZE, GROUP_SIZE and MAX_LENGTH macros that
the run file passes to the data source; everything else is `train(...)`'s own bindings, or its defaults
where a file binds nothing.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import inspect
import sys
from typing import Any, Iterator, Optional, Sequence

from twolar_jax import gin_utils, partitioning, trainer
from twolar_jax.errors import OptionError
from twolar_jax.model.config import T5Config
from twolar_jax.optimizers import OptimizerConfig

DATA_PACKAGE = "data_pipeline"
DATA_CONFIGURABLES = ("seqio_batches", "DistillFiles")
PLACEHOLDERS = ("MODEL_DIR = '<aot: not used>'", "DISTILL_JSONL = '<aot: not used>'", "DISTILL_FILES = None",
                "train.train_batches = None", "ValidationConfig.batches = None")
TRAIN = "twolar_jax.train.train"


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """A training step as the gin files configure it, plus its global batch shape."""

    config: T5Config
    optimizer: OptimizerConfig
    spec: trainer.StepSpec
    mesh_shape: tuple[int, ...]
    rules: tuple
    total_steps: int
    seed: int
    batch_size: int  # queries per update (all micro-batches, all hosts)
    group_size: int  # passages per query
    max_length: int  # tokens per passage


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """The reranker's scoring function on a [batch_size, max_length] batch of token ids."""

    config: T5Config  # dtype set to the scoring dtype
    mesh_shape: tuple[int, ...]
    rules: tuple
    score_head: str
    batch_size: int
    max_length: int


class _RefuseImports(importlib.abc.MetaPathFinder):
    """A sys.meta_path entry under which importing `package` (not yet imported) fails like a missing module."""

    def __init__(self, package: str):
        self.package = package

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == self.package or fullname.startswith(self.package + "."):
            raise ModuleNotFoundError(f"{fullname} is not imported by ahead-of-time compiles", name=fullname)
        return None


@contextlib.contextmanager
def _without_package(package: str) -> Iterator[None]:
    finder = _RefuseImports(package)
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)


def parse_job_gin(gin_files: Sequence[str], gin_bindings: Sequence[str] = (),
                  search_paths: Sequence[str] = ()) -> None:
    """Parse the job's files and bindings into a cleared gin config, without the data side (module docstring)."""
    from twolar_jax import train as train_module

    train_module.register_configurables()
    with _without_package(DATA_PACKAGE):
        gin_utils.parse_gin_flags(gin_files, list(PLACEHOLDERS) + list(gin_bindings), search_paths,
                                  skip_unknown=list(DATA_CONFIGURABLES))


def _bound(name: str, default: Any) -> Any:
    """A gin parameter (`fn.arg`) or macro (`NAME`), or `default` when the files bind nothing."""
    try:
        return gin_utils.query(name)
    except ValueError:
        return default


def _train_arg(name: str) -> Any:
    from twolar_jax import train as train_module

    return _bound(f"{TRAIN}.{name}", inspect.signature(train_module.train).parameters[name].default)


def _macro(name: str) -> Any:
    value = _bound(name, None)
    if value is None:
        raise OptionError(f"the gin files bind no {name}: a train compile reads the batch shape from BATCH_SIZE, "
                          "GROUP_SIZE and MAX_LENGTH (as gin/runs/distill_train.gin binds them)")
    return value


def _rules(value: Optional[Sequence]) -> tuple:
    return partitioning.normalize_rules(value or partitioning.load_logical_axis_rules())


def train_job() -> TrainJob:
    """The train step of the parsed gin files (parse_job_gin first)."""
    from twolar_jax.train_setup import resolve_model_config

    spec = trainer.make_step_spec(loss=_train_arg("loss"), loss_options=_train_arg("loss_options"),
                                  score_head=_train_arg("score_head"),
                                  num_microbatches=_train_arg("num_microbatches"),
                                  enable_dropout=_train_arg("enable_dropout"))
    return TrainJob(config=resolve_model_config(_train_arg("model"), _train_arg("model_overrides")),
                    optimizer=_train_arg("optimizer"), spec=spec,
                    mesh_shape=tuple(_train_arg("mesh_shape")), rules=_rules(_train_arg("logical_axis_rules")),
                    total_steps=int(_train_arg("total_steps") or 1), seed=int(_train_arg("seed")),
                    batch_size=int(_macro("BATCH_SIZE")), group_size=int(_macro("GROUP_SIZE")),
                    max_length=int(_macro("MAX_LENGTH")))


def score_job(*, batch_size: int, max_length: int, dtype: Optional[str]) -> ScoreJob:
    """The scoring function for the parsed gin files' model (MODEL_CONFIG), mesh and rules."""
    from twolar_jax.train_setup import resolve_model_config

    model = _bound("MODEL_CONFIG", None) or _train_arg("model")
    config = resolve_model_config(model)
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if batch_size < 1 or max_length < 1:
        raise OptionError(f"--batch_size={batch_size} --max_length={max_length}: both must be >= 1")
    return ScoreJob(config=config, mesh_shape=tuple(_bound("MESH_SHAPE", (-1, 1, 1))),
                    rules=_rules(_bound("LOGICAL_AXIS_RULES", None)),
                    score_head=_bound("SCORE_HEAD", "difference"), batch_size=batch_size, max_length=max_length)
