"""Shared fixtures for the trainer tests: a tiny model, deterministic synthetic batches, quiet run options."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from twolar_jax.checkpointing import CheckpointConfig
from twolar_jax.model.config import preset
from twolar_jax.optimizers import OptimizerConfig
from twolar_jax.train_loop import LoggingConfig

QUIET = LoggingConfig(progress=False, tensorboard=False, write_gin_config=False)


def run_options(*, learning_rate: float = 5e-5, schedule: str = "constant", warmup_steps: int = 0,
                save_period: int = 1000, log_period: int = 10, **optimizer) -> dict:
    """train() keyword arguments for the option objects, with a quiet logger."""
    return dict(optimizer=OptimizerConfig(learning_rate=learning_rate, schedule=schedule, warmup_steps=warmup_steps,
                                          **optimizer),
                checkpoints=CheckpointConfig(period=save_period),
                logging_config=LoggingConfig(period=log_period, progress=False, tensorboard=False,
                                             write_gin_config=False))

B, N, L = 8, 4, 32


def tiny_config(**overrides):
    return preset("tiny", **overrides)


def synthetic_batch(index: int, *, batch_size: int = B, group_size: int = N, max_length: int = L,
                    seed: int = 0) -> dict[str, np.ndarray]:
    """Batch `index` of a fixed stream: random tokens, some padding, teacher order 0..N-1, a short group."""
    rng = np.random.default_rng([seed, index])
    tokens = rng.integers(2, 32000, (batch_size, group_size, max_length)).astype(np.int32)
    lengths = rng.integers(max_length // 2, max_length + 1, (batch_size, group_size))
    tokens[np.arange(max_length)[None, None, :] >= lengths[..., None]] = 0
    mask = np.ones((batch_size, group_size), np.int32)
    mask[0, group_size - 1] = 0  # one query with a padded passage
    tokens[0, group_size - 1] = 0
    return {
        "encoder_input_tokens": tokens,
        "teacher_ranks": np.tile(np.arange(group_size, dtype=np.int32), (batch_size, 1)),
        "passage_mask": mask,
        "teacher_scores": rng.normal(size=(batch_size, group_size)).astype(np.float32),
    }


class SyntheticSource:
    """A BatchSource over synthetic_batch(i); `fail_after` raises after that many batches (a crash)."""

    def __init__(self, *, fail_after: int | None = None, limit: int | None = None, **batch_kw):
        self.fail_after, self.limit, self.batch_kw = fail_after, limit, batch_kw
        self.calls: list[dict] = []

    def __call__(self, *, shard_index: int, num_shards: int, skip_batches: int) -> Iterator[dict]:
        self.calls.append({"shard_index": shard_index, "num_shards": num_shards, "skip_batches": skip_batches})
        i, served = skip_batches, 0
        while self.limit is None or i < self.limit:
            if self.fail_after is not None and served >= self.fail_after:
                raise RuntimeError("simulated preemption")
            yield synthetic_batch(i, **self.batch_kw)
            i += 1
            served += 1
