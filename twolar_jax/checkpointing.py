"""Training checkpoints: orbax CheckpointManager under MODEL_DIR, restored onto the current mesh.

Layout of a MODEL_DIR:
    model_config.json        T5Config.to_dict() (what load_inference_params and Reranker read)
    config.gin               the operative gin config of the run
    checkpoints/<step>/      orbax items: params, opt_state (sharded arrays), meta (JSON: step and
                             data position, so a resumed run reads the batches it has not seen yet)

Restores always go onto abstract targets built from the *current* mesh and rules (t5x/MaxText
habit), so a checkpoint written on a 4x2 mesh restores on one CPU or on a 2x4 mesh unchanged.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from twolar_jax.durable_io import write_json_atomic
from twolar_jax.errors import CheckpointError, MissingFileError, OptionError
from twolar_jax.model.config import T5Config
from twolar_jax.train_state import TrainState

MODEL_CONFIG = "model_config.json"
CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("params", "opt_state", "meta")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """How a run checkpoints (`train.checkpoints = @CheckpointConfig()`): every `period` steps, keep the
    last `keep`, write in the background (`async_save`), and resume from MODEL_DIR's latest (`resume`)."""

    period: int = 1000
    keep: Optional[int] = 3
    async_save: bool = True
    resume: bool = True

    def __post_init__(self) -> None:
        if self.period < 1:
            raise OptionError(f"CheckpointConfig.period={self.period}: must be >= 1")
        if self.keep is not None and self.keep < 1:
            raise OptionError(f"CheckpointConfig.keep={self.keep}: must be >= 1 or None (keep all)")


# --------------------------------------------------------------------------------- model config
def write_model_config(model_dir: str | os.PathLike, config: T5Config | dict[str, Any]) -> Path:
    """model_config.json (a T5Config or a model's `checkpoint_config()`), atomically."""
    values = config.to_dict() if isinstance(config, T5Config) else config
    return write_json_atomic(Path(model_dir) / MODEL_CONFIG, values, indent=2)


def read_model_config(model_dir: str | os.PathLike) -> T5Config:
    path = Path(model_dir) / MODEL_CONFIG
    if not path.exists():
        raise MissingFileError(f"{path}: not found; is {model_dir} a training MODEL_DIR?")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    try:
        return T5Config.from_dict(values)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------- manager
def make_manager(
    model_dir: str | os.PathLike,
    *,
    max_to_keep: int | None = 3,
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """An orbax manager over MODEL_DIR/checkpoints, keeping the last `max_to_keep` checkpoints."""
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else 1,  # the period is applied by save()
        max_to_keep=None if read_only else max_to_keep,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
    )
    directory = Path(model_dir).absolute() / CHECKPOINT_SUBDIR
    if read_only and not directory.exists():
        raise MissingFileError(f"{directory}: no checkpoints directory")
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    *,
    data_state: dict[str, Any] | None = None,
    period: int | None = None,
    force: bool = False,
) -> bool:
    """Save when the step is a multiple of `period` (or `force`). Returns whether a save started.

    Our own rule rather than orbax's interval policy, which also saves the first step it sees.

    Orbax copies the arrays to host before returning, so the state may be donated to the next step
    while the files are written in the background.
    """
    step = int(jax.device_get(state.step))
    if not force and (not period or step % period):
        return False
    meta = {"step": step, **(data_state or {})}
    return manager.save(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardSave(state.params),
            opt_state=ocp.args.StandardSave(state.opt_state),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )


def restore(
    manager: ocp.CheckpointManager, abstract_state: TrainState, step: int | None = None
) -> tuple[TrainState, dict[str, Any]] | None:
    """(state, meta) restored onto `abstract_state`'s shardings, from `step` or the latest; None if none."""
    step = manager.latest_step() if step is None else step
    if step is None:
        return None
    try:
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                meta=ocp.args.JsonRestore(),
            ),
        )
    except ValueError as e:
        if "tree structures do not match" not in str(e):
            raise
        raise CheckpointError(
            f"{Path(manager.directory) / str(step)}: its parameter or optimizer-state tree differs from this "
            "run's: resume with the optimizer and T5Config.scan_layers the run was started with (a scanned "
            "Adafactor state written before per-layer Adafactor differs too), or start a new MODEL_DIR with "
            f"INIT_CHECKPOINT set to this run's exported params. orbax: {str(e).splitlines()[0]}") from None
    meta = dict(restored.meta)
    step_sharding = getattr(abstract_state.step, "sharding", None)
    state_step = jax.device_put(np.asarray(step, np.int32), step_sharding)
    state = TrainState(step=state_step, params=restored.params, opt_state=restored.opt_state)
    return state, meta


def all_steps(model_dir: str | os.PathLike) -> list[int]:
    manager = make_manager(model_dir, read_only=True)
    try:
        return list(manager.all_steps())
    finally:
        manager.close()


# ----------------------------------------------------------------------------------- inference
def load_inference_params(model_dir: str | os.PathLike, step: int | None = None) -> tuple[T5Config, Any]:
    """(config, params) of a training MODEL_DIR, params only, on one device (the first local one)."""
    from twolar_jax.model import network

    config = read_model_config(model_dir)
    manager = make_manager(model_dir, read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise MissingFileError(f"{model_dir}: no checkpoint saved yet")
        if step not in manager.all_steps():
            raise MissingFileError(f"{model_dir}: no checkpoint for step {step}; have {list(manager.all_steps())}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shapes = jax.eval_shape(lambda: network.init_params(config, jax.random.PRNGKey(0)))
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return config, restored.params
    finally:
        manager.close()


def export_hf(
    model_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, *, dtype: str = "float32"
) -> Path:
    """Write a checkpoint as an HF T5 directory (config.json + model.safetensors + spiece.model).

    In a multi-process run (a pod) every process must call it: orbax restores collectively. Process 0
    writes the directory and the others wait until it has, so none leaves before the export is done."""
    from twolar_jax.hf_conversion import save_hf_checkpoint

    config, params = load_inference_params(model_dir, step)
    out = Path(out_dir)
    if jax.process_index() == 0:
        out = save_hf_checkpoint(out_dir, config, jax.device_get(params), dtype=dtype)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"twolar export_hf {out}")
    return out
