"""The Reranker's device side: a mesh, parameters laid out by the training rules, and a scoring stream.

Parameters are placed with the same logical-axis rules as training (`partitioning`), so a model that
does not fit one device is scored fsdp- or tensor-parallel by changing only the mesh shape; batches
split over the rule table's batch axes. Scoring is a stream: a background thread tokenizes and
assembles length-bucketed batches (`group_batches`, cut by `plan_batches` to pad the fewest tokens),
the caller's thread dispatches them and fetches each result only a few batches later (`stream_scores`),
so the host never waits on the device between batches. Batches depend only on each window's lengths;
a pair's score can move in the last fp32 bits with its batch (its padded length and row count).
"""
from __future__ import annotations

import bisect
import collections
import concurrent.futures
import inspect
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding

from twolar_jax import compiler_options, partitioning
from twolar_jax.errors import CheckpointError, OptionError
from twolar_jax.executable_cache import ExecutableCache, compile_fresh, environment
from twolar_jax.partitioner import PartitionedFunction, Partitioner
from twolar_jax.prefetch import EMPTY, BackgroundIterator
from twolar_jax.ranking.interface import RankingModel

DEFAULT_MESH_SHAPE = (-1, 1, 1)  # replicated parameters, batches split over every device
_POLL_S = 0.005  # how long the dispatcher waits for the next batch before checking finished results


# ----------------------------------------------------------------------------------------- mesh
def check_mesh_shape(mesh_shape: Any, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, model) with at most one -1, filled for `num_devices`; errors name `mesh_shape`."""
    names = partitioning.MESH_AXES
    if (isinstance(mesh_shape, (str, bytes)) or not isinstance(mesh_shape, Sequence) or len(mesh_shape) != len(names)
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in mesh_shape)):
        raise OptionError(f"mesh_shape={mesh_shape!r}: expected {len(names)} integers {names}, one may be -1")
    try:
        return partitioning.fill_mesh_shape(mesh_shape, num_devices)
    except OptionError as e:
        raise OptionError(f"mesh_shape={tuple(mesh_shape)!r}: {e}") from None


def build_partitioner(mesh_shape: Sequence[int], devices: Sequence[jax.Device], logical_axis_rules: Any) -> Partitioner:
    """The scorer's partitioner: `mesh_shape` over `devices` (checked) and the rule table (default: training's)."""
    return Partitioner.create(check_mesh_shape(mesh_shape, len(devices)), devices=devices,
                              logical_axis_rules=logical_axis_rules)


def place_params(params: Any, model: RankingModel, partitioner: Partitioner) -> Any:
    """Cast to the model's scoring dtype and lay out each parameter by its logical axes (host -> shards directly)."""
    cast = model.param_dtype
    try:
        shardings = partitioner.param_shardings(model.param_logical_axes(), params)
    except ValueError as e:
        raise CheckpointError(f"parameters do not match the model config's parameter tree: {e}") from None

    def put(x: Any, sharding: NamedSharding) -> jax.Array:
        x = x.astype(cast) if isinstance(x, jax.Array) else np.asarray(x).astype(cast)
        return jax.device_put(x, sharding)

    return jax.tree.map(put, params, shardings)


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds of a placed pytree, from its arrays' addressable shards."""
    out: dict[jax.Device, int] = collections.defaultdict(int)
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] += shard.data.nbytes
    return dict(out)


def score_function(model: RankingModel) -> Callable[[Any, Any], jax.Array]:
    """The one scoring program: (params, a `score_features` batch) -> fp32 scores. The Reranker runs it on
    {"encoder_input_tokens": [rows, length]}, `twolar compile --job=score` compiles it for TPU slices; both
    partition it with `Partitioner.partition`."""
    def score(params: Any, batch: Any) -> jax.Array:
        return model.scores(params, batch)
    return score


def partition_scoring(model: RankingModel, partitioner: Partitioner, params_like: Any,
                      batch_like: Any) -> PartitionedFunction:
    """`score_function` jitted with the parameters' shardings and the batch's (rows split on the batch axes,
    as the model's score_features declare); the scores' layout is left to the compiler."""
    param_shardings = partitioner.param_shardings(model.param_logical_axes(), params_like)
    batch_shardings = partitioner.batch_shardings(batch_like, model.score_features)
    return partitioner.partition(score_function(model), in_shardings=(param_shardings, batch_shardings),
                                 out_shardings=None)


def _pairs(tokens: Any) -> dict[str, Any]:
    """A pointwise score batch (POINTWISE_SCORE_BATCH) of pair tokens [rows, length]."""
    return {"encoder_input_tokens": tokens}


def token_sharding(partitioner: Partitioner) -> NamedSharding:
    return partitioner.sharding(("batch", None))


# The modules whose source decides what the scoring program compiles to: an edit to any of them is a new program.
_PROGRAM_SOURCES = tuple(Path(__file__).parent / name for name in (
    "model/config.py", "model/network.py", "model/scan.py", "scoring.py", "scoring_runtime.py", "partitioning.py",
    "partitioner.py", "compiler_options.py", "ranking/interface.py", "ranking/pointwise.py"))


def model_sources(model: RankingModel) -> tuple[Path, ...]:
    """The file that defines the model's class (a family outside the library too): its edit is a new program."""
    source = inspect.getsourcefile(type(model))
    return (Path(source),) if source else ()


def _load_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that reads stored programs ahead of dispatch (loading one costs about 0.1 s of CPU), so
    a load overlaps the batches already running instead of waiting in front of the next one."""
    global _LOAD_POOL
    with _LOAD_POOL_LOCK:
        if _LOAD_POOL is None:
            _LOAD_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="twolar-program-load")
        return _LOAD_POOL


_LOAD_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_LOAD_POOL_LOCK = threading.Lock()


class ScoreProgram:
    """The scoring program bound to one Reranker's model, parameters and partitioner: tokens -> scores.

    Without a cache it calls the jit as it always did. With an `ExecutableCache` each tokens shape is
    compiled ahead of time (the same lowering the jit does, so the same executable and scores) and the
    executable is kept on disk, so a fresh process loads it instead of tracing and lowering the model
    again (flan-t5-small: about a second per shape). `prefetch` starts those loads as soon as the batch
    planner knows a window's shapes, while earlier batches run."""

    def __init__(self, params: Any, *, model: RankingModel, partitioner: Partitioner,
                 cache: ExecutableCache | None) -> None:
        self.params, self.model, self.partitioner, self.cache = params, model, partitioner, cache
        self.fn = partition_scoring(model, partitioner, params, _pairs(np.zeros((1, 1), np.int32)))
        self._programs: dict[tuple[int, ...], Any] = {}
        self._pending: dict[tuple[int, ...], concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._base: dict[str, Any] | None = None
        self._devices = list(partitioner.mesh.devices.flat)  # the order of the executable's device assignment
        self._trees = (jax.tree.structure(((params, _pairs(0)), {})), jax.tree.structure(0))  # (in, out)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        if self.cache is None:
            return self.fn(self.params, _pairs(tokens))
        shape = tokens.shape
        program = self._programs.get(shape)
        if program is not None:
            return program(self.params, _pairs(tokens))
        with self._lock:
            pending = self._pending.pop(shape, None)
        if pending is not None:
            pending.result()  # it is in the cache's memory now, or was not stored (then compiled below)
        program, compiled = self._load_or_compile(tokens)
        try:
            out = program(self.params, _pairs(tokens))
        except (TypeError, ValueError) as e:  # a stored program that does not take these arguments
            if compiled:
                raise
            self.cache.reject(self.description(shape), f"{type(e).__name__}: {e}")
            program, _ = self._load_or_compile(tokens)
            out = program(self.params, _pairs(tokens))
        self._programs[shape] = program
        return out

    def prefetch(self, shapes: Iterable[tuple[int, ...]]) -> None:
        """Start loading the stored programs of `shapes` (from any thread; a no-op without a cache)."""
        if self.cache is None:
            return
        with self._lock:
            for shape in dict.fromkeys(tuple(s) for s in shapes):
                if shape not in self._programs and shape not in self._pending:
                    self._pending[shape] = _load_pool().submit(self._load, shape)

    def _load(self, shape: tuple[int, ...]) -> Any:
        return self.cache.load(self.description(shape), in_tree=self._trees[0], out_tree=self._trees[1],
                               devices=self._devices)

    def _load_or_compile(self, tokens: jax.Array) -> tuple[Any, bool]:
        def compile_fn() -> tuple[Any, bool]:
            return compile_fresh(self.fn.lower(self.params, _pairs(tokens)))

        return self.cache.get_or_compile(self.description(tokens.shape), compile_fn, in_tree=self._trees[0],
                                         out_tree=self._trees[1], devices=self._devices)

    def description(self, shape: tuple[int, ...]) -> dict[str, Any]:
        """Everything that determines the program for a tokens `shape` (the executable cache's key)."""
        with self._lock:
            if self._base is None:
                self._base = self._describe_base()
        return {**self._base, "tokens": [list(shape), "int32"]}

    def _describe_base(self) -> dict[str, Any]:
        def leaf(path: Any, x: jax.Array) -> list:
            sharding = x.sharding
            spec = str(sharding.spec) if isinstance(sharding, NamedSharding) else repr(sharding)
            return [partitioning.tree_path_str(path), list(x.shape), str(x.dtype), spec]

        mesh = self.partitioner.mesh
        return {
            "program": "twolar_jax.scoring_runtime.score_function",
            "model": {"class": f"{type(self.model).__module__}.{type(self.model).__qualname__}",
                      **self.model.describe()},
            "rules": [[name, target] for name, target in self.partitioner.rules],
            "compiler_options": compiler_options.for_mesh(mesh),
            "params": [leaf(p, x) for p, x in jax.tree_util.tree_flatten_with_path(self.params)[0]],
            "mesh": {"axes": list(mesh.axis_names), "shape": list(mesh.devices.shape),
                     "device_ids": [d.id for d in self._devices]},
            "tokens_sharding": str(token_sharding(self.partitioner).spec),
            "environment": environment(self._devices, _PROGRAM_SOURCES + model_sources(self.model)),
        }


# -------------------------------------------------------------------------------------- batches
@dataclass(frozen=True)
class Batch:
    """Rows `rows` of group `group`, padded to `tokens` (rows x bucket length, int32)."""

    group: int
    rows: np.ndarray
    tokens: np.ndarray


@dataclass(frozen=True)
class GroupEnd:
    group: int
    size: int


def rows_for(n: int, *, batch_size: int, parallelism: int) -> int:
    """Rows of a batch holding n inputs: the full batch, or for a last partial batch the next power of
    two times the batch parallelism, so padding stays under 2x with a handful of compiled shapes."""
    rows = parallelism
    while rows < n:
        rows *= 2
    return min(rows, batch_size)


# What one more batch costs beyond its padded tokens, in tokens: a dispatch and its small matmuls. It
# keeps the planner from cutting a run into many tiny batches to save a few padded positions.
BATCH_OVERHEAD_TOKENS = 256


def plan_batches(lengths: Sequence[int], *, buckets: Sequence[int], batch_size: int, parallelism: int,
                 overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[np.ndarray]:
    """Which inputs to score together: positions into `lengths`, one array per batch, padding the fewest tokens.

    A batch of n inputs costs rows_for(n) rows times its bucket (the shortest one holding its longest
    input), plus `overhead_tokens`. Some cheapest plan cuts the inputs, sorted by length, into runs (swapping
    a long input of a short-bucket batch for a short one of a long-bucket batch never costs more), so a
    dynamic programme over the cut points finds it in O(n x batch_size). Ties keep input order, so the plan
    depends only on the lengths."""
    lengths = np.asarray(lengths, np.int64)
    n = len(lengths)
    if n == 0:
        return []
    bucket_arr = np.asarray(buckets, np.int64)
    order = np.argsort(lengths, kind="stable")
    padded = bucket_arr[np.searchsorted(bucket_arr, lengths[order])]  # each sorted input's own bucket
    rows = np.array([0] + [rows_for(k, batch_size=batch_size, parallelism=parallelism)
                           for k in range(1, batch_size + 1)], np.int64)
    best = np.zeros(n + 1, np.int64)
    cut = np.zeros(n + 1, np.int64)
    for end in range(1, n + 1):  # the batch ending at sorted input end-1 starts at some i in [end-B, end)
        starts = np.arange(max(0, end - batch_size), end)
        costs = best[starts] + rows[end - starts] * padded[end - 1] + overhead_tokens
        pick = int(np.argmin(costs))  # the first minimum: the longest batch among equal costs
        best[end], cut[end] = costs[pick], starts[pick]
    plan, end = [], n
    while end > 0:
        plan.append(np.sort(order[cut[end]:end]))
        end = int(cut[end])
    return plan[::-1]


def group_batches(group: int, encoded: Iterable[Sequence[int]], *, buckets: Sequence[int], batch_size: int,
                  parallelism: int, window: int | None = None,
                  on_plan: Callable[[list[tuple[int, int]]], None] | None = None) -> Iterator[Batch | GroupEnd]:
    """Batches of one group: inputs are read `window` at a time (default 16 batches' worth) and each window
    is cut by `plan_batches`, so the device starts on a long group before all of it is tokenized.
    `on_plan` hears each window's batch shapes, in order, before its first batch is yielded."""
    window = window or 16 * batch_size
    pending: list[tuple[int, Sequence[int]]] = []

    def emit_window() -> Iterator[Batch]:
        plan = plan_batches([len(ids) for _, ids in pending], buckets=buckets, batch_size=batch_size,
                            parallelism=parallelism)
        if on_plan is not None:
            on_plan([(rows_for(len(members), batch_size=batch_size, parallelism=parallelism),
                      buckets[bisect.bisect_left(buckets, max(len(pending[m][1]) for m in members))])
                     for members in plan])
        for members in plan:
            longest = max(len(pending[m][1]) for m in members)
            tokens = np.zeros((rows_for(len(members), batch_size=batch_size, parallelism=parallelism),
                               buckets[bisect.bisect_left(buckets, longest)]), np.int32)
            for row, m in enumerate(members):
                ids = pending[m][1]
                tokens[row, :len(ids)] = ids
            yield Batch(group, np.array([pending[m][0] for m in members], np.int64), tokens)
        pending.clear()

    size = 0
    for i, ids in enumerate(encoded):
        if len(ids) > buckets[-1]:
            raise ValueError(f"input {i} has {len(ids)} tokens, more than the longest length bucket {buckets[-1]}")
        pending.append((i, ids))
        size += 1
        if len(pending) == window:
            yield from emit_window()
    if pending:
        yield from emit_window()
    yield GroupEnd(group, size)


# --------------------------------------------------------------------------------------- stream
class _Collector:
    """Scores of the groups in flight; hands back whole groups in input order."""

    def __init__(self) -> None:
        self.parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = collections.defaultdict(list)
        self.outstanding: collections.Counter = collections.Counter()
        self.sizes: dict[int, int] = {}
        self.next_group = 0

    def ready(self) -> Iterator[np.ndarray]:
        while self.next_group in self.sizes and self.outstanding[self.next_group] == 0:
            g = self.next_group
            scores = np.zeros(self.sizes.pop(g), np.float32)
            for rows, values in self.parts.pop(g, []):
                scores[rows] = values
            del self.outstanding[g]
            self.next_group += 1
            yield scores


def stream_scores(items: Iterable[Batch | GroupEnd], dispatch: Callable[[np.ndarray], jax.Array], *,
                  prefetch: int = 4, in_flight: int = 3,
                  on_scored: Callable[[int], None] | None = None) -> Iterator[np.ndarray]:
    """fp32 scores per group, in group order. `items` runs on a background thread (`prefetch` items
    ahead); up to `in_flight` dispatched batches are on the device before the oldest is fetched, and a
    finished one is fetched as soon as it is ready. When `items` fails, the groups completed before the
    failure are yielded first, then its exception is raised."""
    if not isinstance(in_flight, int) or in_flight < 1:
        raise OptionError(f"in_flight={in_flight!r}: must be an integer >= 1")
    collector = _Collector()
    queue: collections.deque = collections.deque()  # (device scores, group, rows)

    def fetch_oldest() -> None:
        out, group, rows = queue.popleft()
        collector.parts[group].append((rows, np.asarray(out)[:len(rows)]))
        collector.outstanding[group] -= 1
        if on_scored is not None:
            on_scored(len(rows))

    with BackgroundIterator(items, size=prefetch, name="twolar-score-prefetch") as source:
        finished, error = False, None
        while not finished or queue:
            while queue and queue[0][0].is_ready():
                fetch_oldest()
            yield from collector.ready()
            if finished or len(queue) >= in_flight:
                if queue:
                    fetch_oldest()
                continue
            try:
                item = source.get(timeout=_POLL_S if queue else None)
            except StopIteration:
                finished = True
                continue
            except Exception as e:  # noqa: BLE001 - groups finished before the failure still come out first
                finished, error = True, e
                continue
            if item is EMPTY:
                continue
            if isinstance(item, GroupEnd):
                collector.sizes[item.group] = item.size
                continue
            out = dispatch(item.tokens)
            out.copy_to_host_async()
            queue.append((out, item.group, item.rows))
            collector.outstanding[item.group] += 1
        yield from collector.ready()
        if error is not None:
            raise error


def round_batch_size(batch_size: int, parallelism: int) -> int:
    return math.ceil(batch_size / parallelism) * parallelism
