"""Import TensorFlow for the input pipeline only, with accelerators hidden from it (as t5x does).

Why: tf.data runs on the host. If TF saw the GPUs it would reserve their memory before JAX could.
Every data_pipeline module that needs TF imports it from here; nothing outside data_pipeline does.
"""
from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

logger = logging.getLogger(__name__)


def hide_accelerators_from_tf() -> None:
    """Make TF CPU-only. A no-op (with a debug log) once TF has already initialised its devices."""
    for kind in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], kind)
        except (RuntimeError, ValueError) as e:  # already initialised, or no such device kind
            logger.debug("could not hide %s devices from TensorFlow: %s", kind, e)


hide_accelerators_from_tf()

__all__ = ["tf", "hide_accelerators_from_tf"]
