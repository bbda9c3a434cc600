"""The library objects that gin files may name, registered through the one helper (gin_utils.register).

Entry points call these; nothing is registered at import time of the library itself, so using twolar_jax
from Python never touches gin's global registry. `register_resources` imports nothing heavy, so the build
(which needs only the shipped-data paths) starts without loading jax, orbax or optax.
"""
from __future__ import annotations

from twolar_jax import gin_utils, resources
from twolar_jax.model.config import T5Config, preset


def register_resources() -> None:
    """The shipped-data paths and the model presets (plain Python: no jax)."""
    gin_utils.register(resources.shipped_data)
    gin_utils.register(resources.shipped_data_dir)
    gin_utils.register(preset, name="model_preset")
    gin_utils.register(T5Config)


def register_library() -> None:
    """Everything above plus the training option objects (these import jax, optax and orbax)."""
    from twolar_jax.checkpointing import CheckpointConfig
    from twolar_jax.optimizers import OptimizerConfig
    from twolar_jax.ranking.listwise import FiDRanker
    from twolar_jax.train_loop import LoggingConfig, ValidationConfig

    register_resources()
    for option in (OptimizerConfig, CheckpointConfig, ValidationConfig, LoggingConfig):
        gin_utils.register(option)
    gin_utils.register(FiDRanker)  # train.model = @FiDRanker() (gin/runs/listwise_train.gin)
