"""Pure train and eval steps for listwise distillation, and their jit with shardings.

A batch is a dict of arrays (see BATCH_FEATURES): B queries, N passages each, L tokens per
passage. The student scores every (query, passage) pair with one encoder pass and one decoder step
(the [B*N, L] flattened tokens), a score head turns the first-step logits into [B, N] scores, and a
listwise loss compares them with the teacher's order.

Gradient accumulation is a scan over micro-batches inside the step, followed by one optimizer
update. The loss is normalised per query over the whole global batch (sum of per-query losses
divided by the number of queries that have at least two real passages), so an update with
`num_microbatches=M` equals the update on the whole batch at once, whatever the masks look like.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from twolar_jax import compiler_options, losses, partitioning, ranking_metrics, scoring
from twolar_jax.errors import OptionError, TwolarError
from twolar_jax.model.config import T5Config
from twolar_jax.model.network import T5
from twolar_jax.train_state import TrainState

Batch = Mapping[str, Any]
Metrics = dict[str, jax.Array]

# name -> (rank, kind, required). Kinds: "int" (any integer dtype), "float", "intbool".
BATCH_FEATURES: dict[str, tuple[int, str, bool]] = {
    "encoder_input_tokens": (3, "int", True),  # [B, N, L]
    "teacher_ranks": (2, "int", True),  # [B, N], 0 = the teacher's best
    "passage_mask": (2, "intbool", True),  # [B, N], 1 = real passage
    "teacher_scores": (2, "float", False),  # [B, N], for margin_mse
}


def select_features(batch: Batch) -> dict[str, Any]:
    """The model features only (a batch may carry qids or texts for logging)."""
    return {k: v for k, v in batch.items() if k in BATCH_FEATURES}


class BatchError(TwolarError, ValueError):
    """A batch that does not match BATCH_FEATURES (names, ranks, dtypes, shapes)."""


def validate_batch(
    batch: Batch,
    *,
    group_size: int | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    where: str = "batch",
) -> None:
    """Check names, ranks, dtypes and shapes on the host, before anything is traced or placed.

    The message names the feature and the shapes, so a data bug does not surface as an XLA error.
    """
    if not isinstance(batch, Mapping):
        raise BatchError(f"{where}: expected a dict of arrays, got {type(batch).__name__}")
    missing = [k for k, (_, _, req) in BATCH_FEATURES.items() if req and k not in batch]
    if missing:
        raise BatchError(f"{where}: missing feature(s) {missing}; got {sorted(batch)}")
    shapes = {k: tuple(np.shape(v)) for k, v in batch.items()}
    for name, (rank, kind, _) in BATCH_FEATURES.items():
        if name not in batch:
            continue
        value = batch[name]
        shape, dtype = shapes[name], np.dtype(value.dtype if hasattr(value, "dtype") else np.asarray(value).dtype)
        if len(shape) != rank:
            raise BatchError(f"{where}: feature {name!r} must have rank {rank}, got shape {shape}")
        ok = {
            "int": np.issubdtype(dtype, np.integer),
            "float": np.issubdtype(dtype, np.floating),
            "intbool": np.issubdtype(dtype, np.integer) or dtype == np.bool_,
        }[kind]
        if not ok:
            raise BatchError(f"{where}: feature {name!r} has dtype {dtype}, expected {kind.replace('intbool', 'int or bool')}")
    b, n, length = shapes["encoder_input_tokens"]
    for name in ("teacher_ranks", "passage_mask", "teacher_scores"):
        if name in shapes and shapes[name] != (b, n):
            raise BatchError(
                f"{where}: feature {name!r} has shape {shapes[name]} but encoder_input_tokens has shape "
                f"{(b, n, length)}; expected {(b, n)} ([batch, num_passages])")
    if group_size is not None and n != group_size:
        raise BatchError(f"{where}: encoder_input_tokens has {n} passages per query (shape {(b, n, length)}), "
                         f"expected group_size={group_size}")
    if max_length is not None and length > max_length:
        raise BatchError(f"{where}: encoder_input_tokens has length {length} (shape {(b, n, length)}) > max_length={max_length}")
    if batch_size is not None and b != batch_size:
        raise BatchError(f"{where}: batch has {b} queries (encoder_input_tokens shape {(b, n, length)}), expected {batch_size}")


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What a step computes, beside the model: loss, score head and accumulation."""

    loss: str = "rank_net"
    loss_options: tuple[tuple[str, Any], ...] = ()
    score_head: str = "difference"
    score_tokens: scoring.ScoreTokens | None = None  # None: looked up in the default vocabulary
    num_microbatches: int = 1
    enable_dropout: bool = True
    ndcg_k: int | None = 10

    def __post_init__(self) -> None:
        scoring.check_head(self.score_head)
        losses.get_loss(self.loss)
        if self.score_tokens is None:
            object.__setattr__(self, "score_tokens", scoring.default_score_tokens())
        if any(k == "reduction" for k, _ in self.loss_options):
            raise OptionError("loss_options: 'reduction' is set by the trainer (per-query mean over the global batch)")
        if self.num_microbatches < 1:
            raise OptionError(f"num_microbatches must be >= 1, got {self.num_microbatches}")

    def per_query_loss(self) -> Callable[..., jax.Array]:
        return functools.partial(losses.get_loss(self.loss), reduction="none", **dict(self.loss_options))


def make_step_spec(*, loss: str = "rank_net", loss_options: Mapping[str, Any] | None = None, **kw: Any) -> StepSpec:
    return StepSpec(loss=loss, loss_options=tuple(sorted((loss_options or {}).items())), **kw)


def compute_scores(
    model: T5, params: Any, encoder_tokens: jax.Array, spec: StepSpec, *, dropout_rng: jax.Array | None = None
) -> jax.Array:
    """fp32 scores [B, N] from tokens [B, N, L]: all pairs go through the model as one [B*N, L] batch."""
    b, n, length = encoder_tokens.shape
    flat = encoder_tokens.reshape(b * n, length)
    flat = nn.with_logical_constraint(flat, ("batch", "length"))
    enable_dropout = dropout_rng is not None
    logits = model.apply(
        {"params": params},
        flat,
        enable_dropout=enable_dropout,
        vocab_ids=scoring.head_vocab_ids(spec.score_head, spec.score_tokens),
        method=T5.first_step_logits,
        rngs={"dropout": dropout_rng} if enable_dropout else None,
    )
    return scoring.score_from_selected(logits, spec.score_head).reshape(b, n)


def query_weights(mask: jax.Array) -> jax.Array:
    """1.0 for a query with at least two real passages (a ranking to learn from), else 0.0."""
    return (jnp.sum(mask != 0, axis=-1) >= 2).astype(jnp.float32)


def keep_unless(update: jax.Array, new: Any, old: Any) -> Any:
    """`new` where the scalar `update` is true, else `old`, leaf by leaf (inside jit: no host sync)."""
    return jax.tree.map(lambda n, o: jnp.where(update, n, o), new, old)


def count_ranked_queries(passage_mask: Any) -> int:
    """Host-side: how many queries of a batch have at least two real passages (a pair to learn from)."""
    return int(np.sum(np.sum(np.asarray(passage_mask) != 0, axis=-1) >= 2))


GROUPS_WITHOUT_PAIRS = ("error", "skip")


def _loss_sum(model, params, mb: Batch, spec: StepSpec, dropout_rng) -> tuple[jax.Array, jax.Array]:
    scores = compute_scores(model, params, mb["encoder_input_tokens"], spec, dropout_rng=dropout_rng)
    per_query = spec.per_query_loss()(scores, mb["teacher_ranks"], mb["passage_mask"], mb.get("teacher_scores"))
    weights = query_weights(mb["passage_mask"])
    return jnp.sum(per_query * weights), scores


def _split_microbatches(batch: Batch, m: int) -> Batch:
    """[B, ...] -> [M, B/M, ...], micro-batch k = rows k, M+k, 2M+k, ...: each device keeps its own rows."""
    def split(x):
        b = x.shape[0]
        y = x.reshape((b // m, m) + x.shape[1:])
        y = jnp.swapaxes(y, 0, 1)
        return nn.with_logical_constraint(y, (None, "batch") + (None,) * (x.ndim - 1))
    return {k: split(v) for k, v in batch.items()}


def _merge_microbatches(x: jax.Array) -> jax.Array:
    """Inverse of _split_microbatches for [M, B/M, ...] outputs."""
    y = jnp.swapaxes(x, 0, 1)
    return y.reshape((-1,) + x.shape[2:])


def _metrics(scores, batch: Batch, spec: StepSpec) -> Metrics:
    return ranking_metrics.ranking_metrics(scores, batch["teacher_ranks"], batch["passage_mask"], ndcg_k=spec.ndcg_k)


def make_train_step(
    config: T5Config,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule | None,
    spec: StepSpec,
) -> Callable[[TrainState, Batch, jax.Array], tuple[TrainState, Metrics]]:
    """train_step(state, batch, rng) -> (new_state, metrics); pure, so it can be jitted and sharded.

    `rng` is the run's base key; the step folds in its own step number, so a resumed run draws the
    same dropout masks as an uninterrupted one.
    """
    model = T5(config)
    m = spec.num_microbatches

    def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        batch = {k: v for k, v in batch.items() if k in BATCH_FEATURES}
        step_rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(functools.partial(_loss_sum, model), has_aux=True)

        def micro(params, mb, k):
            dropout_rng = jax.random.fold_in(step_rng, k) if spec.enable_dropout else None
            (loss_sum, scores), grads = grad_fn(params, mb, spec, dropout_rng)
            return loss_sum, grads, scores

        if m == 1:
            loss_sum, grad_sum, scores = micro(state.params, batch, 0)
        else:
            if batch["encoder_input_tokens"].shape[0] % m:
                raise BatchError(f"batch of {batch['encoder_input_tokens'].shape[0]} queries does not split into "
                                 f"num_microbatches={m}")
            mbs = _split_microbatches(batch, m)

            def body(carry, xs):
                acc_loss, acc_grads = carry
                mb, k = xs
                loss_sum, grads, scores = micro(state.params, mb, k)
                acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
                return (acc_loss + loss_sum, acc_grads), scores

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss_sum, grad_sum), scores = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros),
                                                        (mbs, jnp.arange(m)))
            scores = _merge_microbatches(scores)
        ranked = jnp.sum(query_weights(batch["passage_mask"]))
        count = jnp.maximum(ranked, 1.0)
        grads = jax.tree.map(lambda g: g / count, grad_sum)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A batch without a comparable pair teaches nothing: leave params and optimizer state as they were
        # (AdamW's weight decay and moment decay would still move them on a zero gradient).
        params, opt_state = keep_unless(ranked > 0, (params, opt_state), (state.params, state.opt_state))
        metrics = {
            "loss": loss_sum / count,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "num_queries": ranked,
            "queries_without_pairs": batch["passage_mask"].shape[0] - ranked,
            "skipped_no_pairs": (ranked == 0).astype(jnp.float32),
            **_metrics(scores, batch, spec),
        }
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(config: T5Config, spec: StepSpec) -> Callable[[Any, Batch], Metrics]:
    """eval_step(params, batch) -> metrics (no dropout); `num_queries` weighs batch averages."""
    model = T5(config)

    def eval_step(params: Any, batch: Batch) -> Metrics:
        batch = {k: v for k, v in batch.items() if k in BATCH_FEATURES}
        loss_sum, scores = _loss_sum(model, params, batch, spec, None)
        ranked = jnp.sum(query_weights(batch["passage_mask"]))
        # num_queries weighs this batch in the validation mean: a batch without a pair weighs nothing.
        return {"loss": loss_sum / jnp.maximum(ranked, 1.0), "num_queries": ranked, **_metrics(scores, batch, spec)}

    return eval_step


class PartitionedStep:
    """A jitted step that runs with the mesh and the logical-axis rules in scope.

    The rules must be active while tracing so the model's logical constraints turn into sharding
    constraints; calls after the first reuse the compiled executable. It compiles with the XLA options
    of the mesh's platform (`compiler_options.for_mesh`: the memory-optimised scheduler on CPU).
    """

    def __init__(self, fn: Callable, mesh, rules, *, in_shardings, out_shardings, donate_argnums=()):
        self.mesh, self.rules = mesh, rules
        self.jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                              donate_argnums=donate_argnums, compiler_options=compiler_options.for_mesh(mesh))

    def __call__(self, *args):
        with partitioning.activation_context(self.mesh, self.rules):
            return self.jitted(*args)

    def lower(self, *args):
        with partitioning.activation_context(self.mesh, self.rules):
            return self.jitted.lower(*args)

    def trace(self, *args):
        """The traced step (its jaxpr; `.lower()` continues), e.g. for abstract arguments (twolar_jax.aot)."""
        with partitioning.activation_context(self.mesh, self.rules):
            return self.jitted.trace(*args)


def partition_train_step(
    train_step: Callable, mesh, rules, state_shardings: TrainState, batch_like: Batch
) -> PartitionedStep:
    """jit with explicit in/out shardings; the state is donated (updated in place on device)."""
    rep = partitioning.replicated(mesh)
    batch_sh = partitioning.batch_shardings(batch_like, mesh, rules)
    return PartitionedStep(train_step, mesh, rules, in_shardings=(state_shardings, batch_sh, rep),
                           out_shardings=(state_shardings, rep), donate_argnums=(0,))


def partition_eval_step(eval_step: Callable, mesh, rules, param_shardings: Any, batch_like: Batch) -> PartitionedStep:
    rep = partitioning.replicated(mesh)
    batch_sh = partitioning.batch_shardings(batch_like, mesh, rules)
    return PartitionedStep(eval_step, mesh, rules, in_shardings=(param_shardings, batch_sh), out_shardings=rep)
