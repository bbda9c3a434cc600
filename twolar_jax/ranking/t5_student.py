"""What every T5-based student shares: its parameters. The pointwise cross-encoder and the listwise FiD read
the same T5 (presets, dtypes, scan, logical axes) and load the same HF checkpoints; only the maths on top
differs, so the parameter members are written once, here."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from twolar_jax.errors import CheckpointError
from twolar_jax.model import network
from twolar_jax.model import scan as model_scan
from twolar_jax.model.config import RUNTIME_FIELDS, T5Config
from twolar_jax.ranking.interface import RankingModel


class T5Student(RankingModel):
    """The parameter half of `RankingModel` for a model whose `config` is a `T5Config`."""

    config: T5Config

    def init_params(self, rng: jax.Array) -> Any:
        return network.init_params(self.config, rng)

    def param_logical_axes(self) -> Any:
        return network.logical_axes(self.config)

    def prepare_params(self, params: Any) -> Any:
        return model_scan.match_layout(params, self.config)  # either tree form in, the config's form out

    @property
    def param_dtype(self) -> Any:
        return jnp.bfloat16 if self.config.dtype == "bfloat16" else jnp.float32

    def load_init_checkpoint(self, path: str) -> Any:
        """An HF T5 directory whose config is this model's up to how it computes (dtype, remat, scan, ...):
        monoT5 and Flan-T5 for the pointwise head, LiT5-Distill (a plain T5ForConditionalGeneration) for FiD."""
        from twolar_jax.hf_conversion import load_hf_checkpoint

        ckpt_config, params = load_hf_checkpoint(path, scan_layers=self.config.scan_layers)
        runtime = {name: getattr(self.config, name) for name in RUNTIME_FIELDS}
        if ckpt_config.replace(**runtime) != self.config:
            raise CheckpointError(f"train.init_checkpoint={path}: its config {ckpt_config} does not match "
                                  f"the model {self.config}")
        return params

    def checkpoint_config(self) -> dict[str, Any]:
        return self.config.to_dict()
