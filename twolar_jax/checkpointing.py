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

import contextlib
import dataclasses
import errno
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from twolar_jax import user_paths
from twolar_jax.durable_io import write_json_atomic
from twolar_jax.errors import CheckpointError, MissingFileError, OptionError, TwolarError
from twolar_jax.model.config import T5Config
from twolar_jax.train_state import TrainState

MODEL_CONFIG = "model_config.json"
CHECKPOINT_SUBDIR = "checkpoints"
CORRUPT_SUBDIR = "checkpoints.corrupt"  # corrupted steps moved aside by restore()
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
    if not read_only:
        quiet_disk_full_noise()
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
    with disk_errors(manager):  # also the error of the previous background save, which orbax raises here
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
    """(state, meta) restored onto `abstract_state`'s shardings, from `step` or the latest; None if none.

    Without `step`, a latest checkpoint whose files are missing, truncated or garbled (`corruption`) is
    moved aside to MODEL_DIR/checkpoints.corrupt/ with a warning naming it, and the previous step is tried,
    so a run resumes from its last good checkpoint (its meta, hence its data position, comes with it) and
    later saves of the same step are not refused. Any other error (a tree that differs from this run's, a
    bug) is raised as before: a good checkpoint is never skipped. None left good: one CheckpointError."""
    if step is not None:
        return _restore_step(manager, abstract_state, step)
    bad: list[str] = []
    for candidate in sorted(manager.all_steps(), reverse=True):
        try:
            restored, reason = _restore_step(manager, abstract_state, candidate), None
        except Exception as e:  # noqa: BLE001 - narrowed by corruption(); anything else is re-raised
            reason = corruption(e)
            if reason is None:
                raise
        if _agreed(reason, candidate):
            return restored
        where = Path(manager.directory) / str(candidate)
        moved = _move_aside(manager, candidate)
        log.warning("checkpoint %s is corrupted (%s); moved it to %s and trying the previous step", where,
                    reason or "it failed to restore on another process", moved)
        bad.append(f"step {candidate}: {reason or 'failed on another process'}")
    if bad:
        raise CheckpointError(f"{manager.directory}: no good checkpoint left to resume from ({'; '.join(bad)}); the "
                              f"corrupted ones are under {Path(manager.directory).parent / CORRUPT_SUBDIR}: start "
                              "a new MODEL_DIR, or restore a copy of the checkpoints")
    return None


def _restore_step(manager: ocp.CheckpointManager, abstract_state: TrainState, step: int
                  ) -> tuple[TrainState, dict[str, Any]]:
    """One step's (state, meta); a tree that differs from this run's is a CheckpointError that says why."""
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


# What a restore of a step with a missing, truncated or garbled file raises (orbax 0.12.8, tensorstore 0.1.86;
# tests/test_faults.py): tensorstore's status codes for a file that is gone or shorter than its index says,
# orbax's wrapper of a chunk that does not decode, a JSON metadata file cut short, a missing file or item.
_TENSORSTORE_CORRUPT = ("NOT_FOUND:", "OUT_OF_RANGE:", "DATA_LOSS:")
_ORBAX_READ_FAILED = "Encountered error while reading array"
_MISSING_ITEM = "was not found in the checkpoint"


def corruption(exc: BaseException) -> Optional[str]:
    """Why `exc` means the step's files are damaged (a short reason), or None when it means something else.

    Concrete on purpose: a bare `except Exception` would also skip a good checkpoint over a bug or a
    config change; these are the errors a truncated, garbled or partly deleted step directory raises."""
    text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, json.JSONDecodeError):
        return f"a metadata file is not valid JSON: {exc.msg}"
    if isinstance(exc, FileNotFoundError):
        return f"a file is missing: {exc.filename or text}"
    if isinstance(exc, KeyError) and _MISSING_ITEM in str(exc):
        return f"an item is missing: {text}"
    if isinstance(exc, ValueError) and str(exc).startswith(_TENSORSTORE_CORRUPT):
        return f"an array file is missing or truncated: {text}"
    if type(exc) is Exception and str(exc).startswith(_ORBAX_READ_FAILED):
        cause = exc.__cause__ or exc.__context__
        return "an array file does not decode" + (f": {str(cause).splitlines()[0][:200]}" if cause and str(cause)
                                                  else "")
    return None


def _agreed(reason: Optional[str], step: int) -> bool:
    """Whether the step restored everywhere: on a pod a damaged shard may be read by one host only, and
    every host must resume from the same step (else the first collective hangs)."""
    if jax.process_count() == 1:
        return reason is None
    from jax.experimental import multihost_utils

    oks = multihost_utils.process_allgather(np.asarray(reason is None, np.int32))
    return bool(np.all(np.asarray(oks) == 1))


def _move_aside(manager: ocp.CheckpointManager, step: int) -> Path:
    """Move a corrupted step out of checkpoints/ (kept for a look, never deleted) and forget it."""
    source = Path(manager.directory) / str(step)
    folder = Path(manager.directory).parent / CORRUPT_SUBDIR
    target = folder / str(step)
    n = 1
    while target.exists():
        target, n = folder / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        folder.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"twolar corrupt checkpoint {step}")
    manager.reload()
    return target


# ------------------------------------------------------------------------------------ a full disk
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(TwolarError, OSError):
    """A checkpoint save that failed on a full disk or quota: the user frees space and runs the same command.

    A TwolarError as well as an OSError: gin re-raises errors of a configured call through a proxy that
    loses an OSError's errno, and a TwolarError still reads as the user's to fix (one line, exit 2)."""

    def __init__(self, path: str, what: str):
        super().__init__(errno.ENOSPC, what, path)

    def __str__(self) -> str:
        option = user_paths.option_for(self.filename)
        return f"{option + ' ' if option else ''}{self.filename}: {self.strerror}"

    def __reduce__(self):
        return (type(self), (self.filename, self.strerror))


def disk_full(exc: BaseException) -> bool:
    """Whether a save failed on a full disk or quota: orbax's writers raise tensorstore's RESOURCE_EXHAUSTED
    ValueError (naming errno 28) rather than an OSError, which entry would show as a bug's traceback."""
    if isinstance(exc, OSError):
        return exc.errno in _DISK_FULL
    code = _OS_ERROR_CODE.search(str(exc))
    return isinstance(exc, ValueError) and bool(code) and int(code.group(1)) in _DISK_FULL


@contextlib.contextmanager
def disk_errors(manager: ocp.CheckpointManager) -> Iterator[None]:
    """A full disk during a save becomes one DiskFullError naming the checkpoints folder and the last
    complete step, which stays (orbax writes a step to a temporary folder and renames it when done)."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - narrowed by disk_full(); anything else is re-raised as it is
        if not disk_full(e) or isinstance(e, DiskFullError):
            raise
        directory = Path(manager.directory)
        done = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
        kept = f"the last complete checkpoint, step {done[-1]}, is kept" if done else "no checkpoint was complete"
        raise DiskFullError(str(directory), f"No space left on device while writing a checkpoint ({kept}; free "
                            "space and run the same command again to resume)") from e


class _OrbaxDiskNoise(logging.Filter):
    """Drops orbax's own ERROR report (with traceback) of a background write that hit a full disk: the
    save's DiskFullError says it once, as the one line the console shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and disk_full(exc):  # "Save Finalize thread failed", "Failed to run ... Commit"
            return False
        text = record.getMessage()
        return not ("raised an exception" in text and disk_full(ValueError(text)))


def _drop_closed_loop_noise(previous: Any) -> Any:
    """An unraisable hook that drops "Event loop is closed" from tensorstore's callbacks: after one write
    fails on a full disk orbax closes its event loop, and each write still in flight reports into it."""

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook.twolar_quiet = True  # type: ignore[attr-defined]
    return hook


def quiet_disk_full_noise() -> None:
    """Once per process, before a save can fail: the two kinds of orbax/tensorstore chatter a full disk
    causes (dozens of tracebacks) are dropped, so the console shows the DiskFullError line alone."""
    import sys

    absl_logger = logging.getLogger("absl")
    if not any(isinstance(f, _OrbaxDiskNoise) for f in absl_logger.filters):
        absl_logger.addFilter(_OrbaxDiskNoise())
    if not getattr(sys.unraisablehook, "twolar_quiet", False):
        sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)


def finish_saves(manager: ocp.CheckpointManager) -> None:
    """Wait for a started save, then close the manager (also when the save failed: its threads stop)."""
    try:
        with disk_errors(manager):
            manager.wait_until_finished()
    finally:
        manager.close()


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
