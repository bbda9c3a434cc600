"""The pure train and eval steps of any ranking model (twolar_jax.ranking.interface), to be partitioned.

A batch is a dict of arrays the model declares (`batch_features`). Gradient accumulation is a scan over
micro-batches inside the step, followed by one optimizer update. The loss is normalised per example over
the whole global batch (the sum of the model's weighted losses divided by the sum of its example weights,
for the pointwise model: the queries with at least two real passages), so an update with
`num_microbatches=M` equals the update on the whole batch at once, whatever the masks look like.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from twolar_jax.ranking.interface import RankingModel
from twolar_jax.train_state import TrainState

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]


def keep_unless(update: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the scalar `update` is true, else `old`, leaf by leaf (inside jit: no host sync)."""
    return jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)


def split_microbatches(batch: Batch, m: int) -> Batch:
    """[B, ...] -> [M, B/M, ...], micro-batch k = rows k, M+k, 2M+k, ...: each device keeps its own rows."""
    def split(x):
        y = jnp.swapaxes(x.reshape((x.shape[0] // m, m) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))
    return {k: split(v) for k, v in batch.items()}


def merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of split_microbatches for [M, B/M, ...] outputs."""
    return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def _accumulated_grads(model: RankingModel, params: Any, batch: Batch, step_rng: jax.Array | None,
                       m: int) -> tuple[jax.Array, Any, jax.Array]:
    """(loss sum, gradient sum, scores) over the batch, in `m` micro-batches."""
    grad_fn = jax.value_and_grad(model.loss, has_aux=True)

    def micro(mb, k):
        rng = jax.random.fold_in(step_rng, k) if step_rng is not None else None
        (loss_sum, scores), grads = grad_fn(params, mb, rng)
        return loss_sum, grads, scores

    if m == 1:
        return micro(batch, 0)

    def body(carry, xs):
        loss_sum, grads, scores = micro(*xs)
        return (carry[0] + loss_sum, jax.tree.map(jnp.add, carry[1], grads)), scores

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grad_sum), scores = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                                (split_microbatches(batch, m), jnp.arange(m)))
    return loss_sum, grad_sum, merge_microbatches(scores)


def make_train_step(model: RankingModel, optimizer: optax.GradientTransformation,
                    schedule: Optional[optax.Schedule], *, num_microbatches: int = 1,
                    enable_dropout: bool = True) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """train_step(state, batch, rng) -> (new_state, metrics); pure, so it can be partitioned.

    `rng` is the run's base key; the step folds in its own step number (and each micro-batch its index), so
    a resumed run draws the same dropout masks as an uninterrupted one. The caller checks that the batch
    splits into `num_microbatches` (trainer.Trainer, on the host, once)."""
    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        batch = model.batch_features.select(batch)
        step_rng = jax.random.fold_in(rng, state.step) if enable_dropout else None
        loss_sum, grad_sum, scores = _accumulated_grads(model, state.params, batch, step_rng, num_microbatches)
        weight = jnp.sum(model.example_weights(batch))
        count = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A batch with nothing to learn from leaves params and optimizer state as they were (AdamW's weight
        # decay and moment decay would still move them on a zero gradient).
        params, opt_state = keep_unless(weight > 0, (params, opt_state), (state.params, state.opt_state))
        rows = jax.tree.leaves(batch)[0].shape[0]
        metrics = {"loss": loss_sum / count, "grad_norm": optax.global_norm(grads),
                   "param_norm": optax.global_norm(params), "num_queries": weight,
                   "queries_without_pairs": rows - weight, "skipped_no_pairs": (weight == 0).astype(jnp.float32),
                   **model.metrics(scores, batch)}
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model: RankingModel) -> Callable[[Any, Batch], Metrics]:
    """eval_step(params, batch) -> metrics (no dropout); `num_queries` weighs batch averages."""
    def eval_step(params: Any, batch: Batch) -> Metrics:
        batch = model.batch_features.select(batch)
        loss_sum, scores = model.loss(params, batch, None)
        weight = jnp.sum(model.example_weights(batch))
        # num_queries weighs this batch in the validation mean: a batch without a pair weighs nothing.
        return {"loss": loss_sum / jnp.maximum(weight, 1.0), "num_queries": weight, **model.metrics(scores, batch)}

    return eval_step


def step_rngs(seed: int) -> tuple[jax.Array, jax.Array]:
    """(init rng, dropout rng) of a run: the one place that derives them from the seed."""
    root = jax.random.PRNGKey(seed)
    return jax.random.fold_in(root, 0), jax.random.fold_in(root, 1)


