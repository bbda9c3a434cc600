"""The library objects that gin files may name, registered through the one helper (gin_utils.register).

Entry points call `register_library()`; nothing is registered at import time of the library itself, so
using twolar_jax from Python never touches gin's global registry.
"""
from __future__ import annotations

from twolar_jax import gin_utils, resources
from twolar_jax.checkpointing import CheckpointConfig
from twolar_jax.model.config import T5Config, preset
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.train_loop import LoggingConfig, ValidationConfig


def register_library() -> None:
    """Model presets and configs, the training option objects, and the shipped-data paths."""
    gin_utils.register(preset, name="model_preset")
    gin_utils.register(T5Config)
    gin_utils.register(OptimizerConfig)
    gin_utils.register(CheckpointConfig)
    gin_utils.register(ValidationConfig)
    gin_utils.register(LoggingConfig)
    gin_utils.register(resources.shipped_data)
    gin_utils.register(resources.shipped_data_dir)
