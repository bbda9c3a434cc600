"""What a training run's gin files say the step is, read without the data side (AOT never reads data).

The run file does `import data_pipeline.seqio_input.tasks` (the listwise run: `...listwise`), which would load
TensorFlow and seqio (seconds and about a GiB) only to register the configurables that make batches
(`seqio_batches`, `DistillFiles`; `listwise_seqio_batches`, `ListwiseFiles`). Binding `train.train_batches` to a placeholder alone would not stop that import, so the
import of `data_pipeline` is refused while the files are parsed, and gin skips it and the bindings of
exactly those two names (skip_unknown with a list); any other unknown name, a typo in an override for
instance, stays an error. The bindings that *refer* to them (`train.train_batches`,
`ValidationConfig.batches`, `DISTILL_FILES`, `LISTWISE_FILES`) are then bound to None, because gin refuses to finish a config
with references to unknown names; the %gin.REQUIRED MODEL_DIR and DISTILL_JSONL macros get placeholders.
Nothing reads any of them. The batch shape comes from the BATCH_SIZE, GROUP_SIZE and MAX_LENGTH macros that
the run file passes to the data source; everything else is `train(...)`'s own bindings, or its defaults
where a file binds nothing.

A train compile parses the shipped run file (RUN_DEFAULTS, runs/distill_train.gin) before the user's files
when none of them includes a run file, so that a model file alone (`--gin_file=models/flan_t5_small.gin`)
compiles the run twolar-train would make of it with the run's defaults: `train.model = %MODEL_CONFIG` (the
model the files name, never `train()`'s default 'tiny'), TRAIN_STEPS, BATCH_SIZE, GROUP_SIZE, MAX_LENGTH, the
mesh, ..., each overridable by the user's files and --gin bindings. Experiments include their run file
themselves (the pointwise `runs/distill_train.gin` or the listwise `runs/listwise_train.gin`) and are parsed
as they are (`includes_run_file`). A needed binding that is still unbound (no model file: MODEL_CONFIG), or
bound to a value the train step cannot take, is a one-line OptionError naming it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.abc
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import gin

from twolar_jax import gin_utils, partitioning, resources
from twolar_jax.errors import OptionError
from twolar_jax.model.config import resolve_model_config
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.ranking.interface import RankingModel
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder

DATA_PACKAGE = "data_pipeline"
DATA_CONFIGURABLES = ("seqio_batches", "DistillFiles", "listwise_seqio_batches", "ListwiseFiles")
PLACEHOLDERS = ("MODEL_DIR = '<aot: not used>'", "DISTILL_JSONL = '<aot: not used>'", "DISTILL_FILES = None",
                "LISTWISE_FILES = None", "train.train_batches = None", "ValidationConfig.batches = None")
TRAIN = "twolar_jax.train.train"
RUN_DEFAULTS = "runs/distill_train.gin"  # in the shipped gin folder; parsed first for a train compile
# The macro the run file binds each train() argument to, named in errors: what a user would set.
RUN_MACROS = {"model": "MODEL_CONFIG", "total_steps": "TRAIN_STEPS", "num_microbatches": "NUM_MICROBATCHES",
              "loss": "LOSS", "score_head": "SCORE_HEAD", "mesh_shape": "MESH_SHAPE",
              "logical_axis_rules": "LOGICAL_AXIS_RULES", "seed": "SEED"}
_UNBOUND_MACRO = re.compile(r"No bindings specified for '(?P<name>\w+)/gin\.macro'")


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """A training step as the gin files configure it, plus its global batch shape."""

    model: RankingModel
    optimizer: OptimizerConfig
    num_microbatches: int
    enable_dropout: bool
    mesh_shape: tuple[int, ...]
    rules: tuple
    total_steps: int
    seed: int
    batch_size: int  # queries per update (all micro-batches, all hosts)
    group_size: int  # passages per query
    max_length: int  # tokens per passage
    target_length: Optional[int] = None  # decoder target tokens (listwise students), TARGET_LENGTH

    @property
    def sizes(self) -> dict[str, int]:
        """The batch's dimension sizes by the names the model's feature declaration uses."""
        sizes = {"batch": self.batch_size, "group_size": self.group_size, "max_length": self.max_length}
        if self.target_length is not None:
            sizes["target_length"] = self.target_length
        return sizes


@dataclasses.dataclass(frozen=True)
class ScoreJob:
    """The reranker's scoring function on a [batch_size, max_length] batch of token ids."""

    model: RankingModel  # computing in the scoring dtype
    mesh_shape: tuple[int, ...]
    rules: tuple
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
                  search_paths: Sequence[str] = (), *, run_defaults: bool = True) -> None:
    """Parse the job's files and bindings into a cleared gin config, without the data side (module docstring).

    run_defaults: parse RUN_DEFAULTS first (a train compile; the score job reads none of its bindings)."""
    from twolar_jax import train as train_module

    train_module.register_configurables()
    files = list(gin_files)
    # No file at all stays parse_gin_flags' "no --gin_file given"; files that include a run file (every
    # experiment: the pointwise or the listwise run) are complete without the defaults.
    run_defaults = run_defaults and bool(files) and not includes_run_file(files, search_paths)
    if run_defaults:
        files.insert(0, str(resources.gin_dir() / RUN_DEFAULTS))
    try:
        with _without_package(DATA_PACKAGE):
            gin_utils.parse_gin_flags(files, list(PLACEHOLDERS) + list(gin_bindings), search_paths,
                                      skip_unknown=list(DATA_CONFIGURABLES))
    except gin_utils.GinConfigError as e:
        unbound = _UNBOUND_MACRO.search(str(e.__cause__ or ""))
        if unbound is None:
            raise
        name = unbound.group("name")
        if name == "MODEL_CONFIG" and run_defaults:
            raise OptionError(f"gin macro MODEL_CONFIG is not bound: a train compile reads {RUN_DEFAULTS} first "
                              "(train.model = %MODEL_CONFIG), and no file binds it: add a model file, e.g. "
                              "--gin_file=models/flan_t5_small.gin") from None
        raise OptionError(f"gin macro {name} is referenced but not bound: add --gin.{name}=VALUE") from None


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)


def includes_run_file(files: Sequence[str], search_paths: Sequence[str] = ()) -> bool:
    """Whether the files, or what they include (followed through the gin folder and `search_paths`), include a
    run file (`runs/...`): then they configure the whole train step and the run defaults would only leak."""
    roots = [Path.cwd(), resources.gin_dir(), *map(Path, search_paths)]
    todo, seen = list(files), set()
    while todo:
        name = todo.pop()
        if name.startswith("runs/"):
            return True
        path = next((r / name for r in roots if (r / name).is_file()), Path(name))
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        todo.extend(_INCLUDE.findall(path.read_text(encoding="utf-8", errors="replace")))
    return False


def _bound(name: str, default: Any) -> Any:
    """A gin parameter (`fn.arg`) or macro (`NAME`), or `default` when the files bind nothing. Only "not
    bound" gives the default: an error evaluating a bound value (a bad model_preset.name) is raised."""
    try:
        gin.query_parameter(name if "." in name else f"%{name}")
    except ValueError:
        return default
    return gin_utils.query(name)


def _binding(name: str) -> str:
    """How errors name a train() argument: the binding and the macro the run file binds it to."""
    macro = RUN_MACROS.get(name)
    return f"train.{name}" + (f" ({macro} in {RUN_DEFAULTS})" if macro else "")


def _train_arg(name: str) -> Any:
    """train()'s argument as the gin files bind it, else its default; a required one unbound is an OptionError."""
    from twolar_jax import train as train_module

    default = inspect.signature(train_module.train).parameters[name].default
    value = _bound(f"{TRAIN}.{name}", default)
    if value is inspect.Parameter.empty:
        raise OptionError(f"the gin files bind no train.{name}, which a train compile needs: add "
                          f"--gin.{RUN_MACROS.get(name, 'train.' + name)}=VALUE")
    return value


def _int(what: str, value: Any, minimum: Optional[int]) -> int:
    """An integer option (not a bool), >= minimum unless None, or an OptionError naming its binding `what`."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise OptionError(f"{what} must be an integer" + (f" >= {minimum}" if minimum is not None else "")
                          + f", got {value!r}")
    return value


def _train_int(name: str, minimum: Optional[int]) -> int:
    return _int(_binding(name), _train_arg(name), minimum)


def _macro(name: str) -> int:
    value = _bound(name, None)
    if value is None:
        raise OptionError(f"the gin files bind no {name}: a train compile reads the batch shape from BATCH_SIZE, "
                          f"GROUP_SIZE and MAX_LENGTH (as {RUN_DEFAULTS} binds them)")
    return _int(name, value, 1)


def _optional_macro(name: str) -> Optional[int]:
    value = _bound(name, None)
    return None if value is None else _int(name, value, 1)


def _train_model() -> Any:
    """train.model as bound (the run file: %MODEL_CONFIG), else MODEL_CONFIG; never train()'s default 'tiny'."""
    unbound = object()
    for name in (f"{TRAIN}.model", "MODEL_CONFIG"):
        value = _bound(name, unbound)
        if value is not unbound:
            return value  # resolve_model_config names train.model when it is no model (None, a typo)
    raise OptionError("the gin files name no model: bind MODEL_CONFIG with a model file (e.g. "
                      "--gin_file=models/flan_t5_small.gin) or train.model (--gin.train.model=\"'flan-t5-small'\")")


def _mesh_shape() -> tuple[int, ...]:
    value = _train_arg("mesh_shape")
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise OptionError(f"{_binding('mesh_shape')} must be a sequence of ints such as (-1, 1, 1), got {value!r}")
    return tuple(_int(_binding("mesh_shape") + " entries", v, -1) for v in value)


def _rules(value: Optional[Sequence]) -> tuple:
    return partitioning.normalize_rules(value or partitioning.load_logical_axis_rules())


def train_job() -> TrainJob:
    """The train step of the parsed gin files (parse_job_gin first)."""
    from twolar_jax.train import build_model

    model = build_model(_train_model(), _train_arg("model_overrides"), loss=_train_arg("loss"),
                        loss_options=_train_arg("loss_options"), score_head=_train_arg("score_head"))
    return TrainJob(model=model, optimizer=_train_arg("optimizer"),
                    num_microbatches=_train_int("num_microbatches", 1), enable_dropout=_train_arg("enable_dropout"),
                    mesh_shape=_mesh_shape(), rules=_rules(_train_arg("logical_axis_rules")),
                    total_steps=_train_int("total_steps", 0) or 1, seed=_train_int("seed", None),
                    batch_size=_macro("BATCH_SIZE"), group_size=_macro("GROUP_SIZE"),
                    max_length=_macro("MAX_LENGTH"), target_length=_optional_macro("TARGET_LENGTH"))


def score_job(*, batch_size: int, max_length: int, dtype: Optional[str]) -> ScoreJob:
    """The scoring function for the parsed gin files' model (MODEL_CONFIG), mesh and rules."""
    model = _train_model()  # never train()'s default 'tiny' when no file names a model
    if not isinstance(model, RankingModel):
        model = PointwiseCrossEncoder(resolve_model_config(model), score_head=_bound("SCORE_HEAD", "difference"))
    model = model.for_scoring(dtype=dtype or getattr(getattr(model, "config", None), "dtype", "float32"),
                              scan_layers=None)
    if batch_size < 1 or max_length < 1:
        raise OptionError(f"--batch_size={batch_size} --max_length={max_length}: both must be >= 1")
    return ScoreJob(model=model, mesh_shape=tuple(_bound("MESH_SHAPE", (-1, 1, 1))),
                    rules=_rules(_bound("LOGICAL_AXIS_RULES", None)), batch_size=batch_size, max_length=max_length)
