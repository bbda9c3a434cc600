"""What a run needs before its first step: the model config, mesh, optimizer, step spec, shardings, and
the train state, created fresh, imported from an HF checkpoint, or restored from MODEL_DIR.

Restores go onto abstract targets built from the *current* mesh and rules, so a checkpoint written on
one layout resumes on another (t5x/MaxText habit).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Mapping, Optional, Sequence

import jax
import optax
from jax.sharding import Mesh

from twolar_jax import checkpointing, partitioning, train_state, trainer
from twolar_jax.errors import CheckpointError, OptionError
from twolar_jax.model import network
from twolar_jax.model.config import RUNTIME_FIELDS, T5Config, preset
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.train_state import TrainState

log = logging.getLogger("twolar_jax.train")


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """The static parts of a run: model, mesh, rules, optimizer, step spec and the state's layout."""

    config: T5Config
    mesh: Mesh
    rules: tuple
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    spec: trainer.StepSpec
    shapes: TrainState  # abstract (jax.ShapeDtypeStruct leaves)
    shardings: TrainState

    @property
    def restore_target(self) -> TrainState:
        return train_state.with_shardings(self.shapes, self.shardings)


@dataclasses.dataclass
class StartState:
    """Where the loop starts: the state, how many batches were consumed, and the step it was restored from."""

    state: TrainState
    batches_consumed: int
    restored_step: Optional[int]  # None: a fresh start (random init or an HF checkpoint)


def resolve_model_config(model: str | T5Config | Mapping[str, Any],
                         overrides: Optional[Mapping[str, Any]] = None) -> T5Config:
    """A preset name ('tiny', 'flan-t5-base', ...), a T5Config or its dict, plus field overrides.

    A bad preset, field or value (dtype, attention, ...) is an OptionError naming train.model or
    train.model_overrides, raised before anything is built."""
    try:
        if isinstance(model, T5Config):
            config = model
        elif isinstance(model, str):
            try:
                config = preset(model)
            except OptionError as e:  # preset names its gin binding (model_preset.name); here it is train.model
                raise OptionError(f"train.model={model!r}: {str(e).split(': ', 1)[-1]}") from None
        elif isinstance(model, Mapping):
            config = T5Config.from_dict(model)
        else:
            raise OptionError(f"train.model: expected a preset name, T5Config or dict, got {type(model).__name__}")
    except (ValueError, TypeError) as e:
        if isinstance(e, OptionError):
            raise
        raise OptionError(f"train.model={model!r}: {e}") from None
    try:
        return config.replace(**dict(overrides)) if overrides else config
    except (ValueError, TypeError) as e:
        raise OptionError(f"train.model_overrides={dict(overrides)!r}: {e}") from None


def select_devices(num_devices: Optional[int]) -> Optional[list[jax.Device]]:
    """All devices (None), or the first `num_devices` (single-process debugging and tests only)."""
    if num_devices is None:
        return None
    if jax.process_count() > 1:
        raise OptionError("train.num_devices is for single-process runs; multi-host meshes use every device")
    if not 1 <= num_devices <= jax.device_count():
        raise OptionError(f"train.num_devices={num_devices}: {jax.device_count()} devices are available")
    return jax.devices()[:num_devices]


def seed_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init rng, dropout rng) of a run: the one place that derives them from the seed."""
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


def initial_params(config: T5Config, seed: int) -> Any:
    """The parameters a run with this seed starts from (no init_checkpoint): "student before training"."""
    return network.init_params(config, seed_rngs(seed)[0])


def prepare(*, config: T5Config, total_steps: int, optimizer: OptimizerConfig, spec: trainer.StepSpec,
            mesh_shape: Sequence[int], num_devices: Optional[int], logical_axis_rules: Optional[Sequence],
            seed: int, devices: Optional[Sequence[jax.Device]] = None) -> RunSetup:
    """Mesh, rules, optimizer and the abstract state with its shardings; allocates nothing.

    `devices` replaces the local ones (num_devices) for a mesh over devices that are only compiled for,
    e.g. a TPU topology's (twolar_jax.aot)."""
    rules = partitioning.normalize_rules(logical_axis_rules or partitioning.load_logical_axis_rules())
    mesh = partitioning.make_mesh(mesh_shape, devices=list(devices) if devices is not None
                                  else select_devices(num_devices))
    log.info("mesh %s over %d devices (%d processes)", partitioning.mesh_shape_str(mesh), mesh.size,
             jax.process_count())
    tx, schedule = optimizer.build(total_steps)
    shapes = train_state.abstract_state(lambda r: network.init_params(config, r), tx, seed_rngs(seed)[0])
    shardings = train_state.state_shardings(shapes, network.logical_axes(config), mesh, rules)
    return RunSetup(config, mesh, rules, tx, schedule, spec, shapes, shardings)


def _runtime_fields(config: T5Config) -> dict[str, Any]:
    """Fields a run may set differently from the checkpoint it starts from (how it computes, not what)."""
    return {name: getattr(config, name) for name in RUNTIME_FIELDS}


def _from_hf(setup: RunSetup, init_checkpoint: str) -> TrainState:
    from twolar_jax.hf_conversion import load_hf_checkpoint

    ckpt_config, params = load_hf_checkpoint(init_checkpoint, scan_layers=setup.config.scan_layers)
    if ckpt_config.replace(**_runtime_fields(setup.config)) != setup.config:
        raise CheckpointError(f"train.init_checkpoint={init_checkpoint}: its config {ckpt_config} does not match "
                              f"the model {setup.config}")
    log.info("initialised from the HF checkpoint %s", init_checkpoint)
    return train_state.place_params(params, setup.optimizer, setup.shardings)


def create_or_restore(setup: RunSetup, manager, *, resume: bool, init_checkpoint: Optional[str],
                      seed: int) -> StartState:
    """MODEL_DIR's latest checkpoint when there is one (and `resume`), else init_checkpoint, else random."""
    restored = checkpointing.restore(manager, setup.restore_target) if resume else None
    if restored is not None:
        state, meta = restored
        consumed = int(meta.get("batches_consumed", meta["step"]))
        log.info("resumed from step %d (checkpoint %s/%d, %d batches consumed)", meta["step"],
                 manager.directory, meta["step"], consumed)
        return StartState(state, consumed, int(meta["step"]))
    if init_checkpoint:
        return StartState(_from_hf(setup, init_checkpoint), 0, None)
    state = train_state.init_sharded_state(lambda r: network.init_params(setup.config, r), setup.optimizer,
                                           seed_rngs(seed)[0], setup.shardings)
    return StartState(state, 0, None)
