"""The evaluation job: first stage, rerank top-k through `Reranker`, run files, metrics, tables.

    twolar-eval --gin_file=eval/trec_dl19.gin --gin.RerankerConfig.checkpoint="'/path/model'"
    python -m eval.run --gin_file=eval/beir.gin --gin.evaluate.mode="'bm25'"

Outputs under output_dir: <dataset>/run.trec (reranked, or the first stage in bm25 mode),
<dataset>/first_stage.trec (the retriever's own scores), <dataset>/metrics.json (mean + per query, and
how many of the set's queries), <dataset>/scores.jsonl + scores.meta.json (resume log and what it was
written for: eval.score_log), results.md and results.json (one row per dataset + the BEIR average),
config.gin. Runs are ordered and evaluated with trec_eval's rule (score descending, ties by docid
descending: retrieval.runs.sort_hits).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from eval import datasets as eval_sets
from eval import multihost, score_log
from eval.metrics import (default_measures, evaluate_run, parse_measures, queries_label, results_table,
                          to_markdown, write_json, write_text)
from eval.listwise import ListwiseOptions, add_listwise_flags, load_listwise
from eval.rerank import PairScorer
from retrieval.candidates import requests_from_run
from retrieval.readers import read_run
from retrieval.runs import Run, write_trec_run
from twolar_jax import dir_lock, entry, gin_utils, resources, user_paths
from twolar_jax.errors import OptionError, check_choice

log = logging.getLogger("eval")
MODES = ("rerank", "bm25")


@dataclasses.dataclass(frozen=True)
class FirstStage:
    """How candidates are found (gin: `evaluate.first_stage = @FirstStage()`): BM25 over BEIR corpora (or
    the shipped TREC DL candidates), or run files. depth None: as deep as evaluate's top_k."""

    depth: Optional[int] = None
    split: str = "test"
    k1: float = 0.9
    b: float = 0.4
    remove_query: bool = True
    cache_dir: Optional[str] = None
    threads: int = 1
    runs: Mapping[str, str] = dataclasses.field(default_factory=dict)  # dataset name -> TREC run file


@dataclasses.dataclass(frozen=True)
class RerankerConfig:
    """The checkpoint an eval job reranks with and how it scores (gin: `evaluate.reranker = @RerankerConfig()`).

    checkpoint: our MODEL_DIR (its latest step), an HF T5 dir or a hub id. mesh_shape (data, fsdp, model)
    lays the parameters out by the training rules: (1, -1, 1) is fsdp over every device of this host (on a
    pod each host scores its own share of the queries: eval.multihost)."""

    checkpoint: Optional[str] = None
    score_head: str = "difference"
    dtype: str = "float32"
    batch_size: int = 32
    max_length: int = 512
    truncation: str = "document"
    mesh_shape: Sequence[int] = (-1, 1, 1)
    listwise: Optional[str] = None  # "first" | "generate": a listwise (FiD) student, ranked over windows
    window: int = 20
    stride: int = 10
    passage_length: int = 150

    @property
    def listwise_options(self) -> ListwiseOptions:
        return ListwiseOptions(self.listwise, self.window, self.stride, self.passage_length)

    def check(self) -> None:
        """Every field, named as a gin binding (`RerankerConfig.dtype='float16': ...`)."""
        from twolar_jax.model.config import COMPUTE_DTYPES
        from twolar_jax.scoring import SCORE_HEADS
        from twolar_jax.ranking.pointwise_inputs import TRUNCATION_MODES

        for name, choices in (("score_head", SCORE_HEADS), ("dtype", COMPUTE_DTYPES),
                              ("truncation", TRUNCATION_MODES)):
            check_choice(f"RerankerConfig.{name}", getattr(self, name), choices)
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"RerankerConfig.{name}={value!r}: expected an integer >= 1")
        _check_mesh_shape(self.mesh_shape)
        self.listwise_options.check()

    def load(self) -> tuple[PairScorer, dict]:
        """(the Reranker, the model half of its score-log key)."""
        if not self.checkpoint:
            raise OptionError("evaluate.mode='rerank' needs RerankerConfig.checkpoint: "
                              "--gin.RerankerConfig.checkpoint=\"'DIR'\" (or --gin.evaluate.mode=\"'bm25'\")")
        return load_keyed_reranker(self.checkpoint, score_head=self.score_head, dtype=self.dtype,
                                   batch_size=self.batch_size, max_length=self.max_length,
                                   truncation=self.truncation, mesh_shape=self.mesh_shape,
                                   listwise=self.listwise_options)


def load_reranker(checkpoint: str, *, score_head: str, dtype: str, batch_size: int, max_length: int,
                  truncation: str, step: Optional[int] = None,
                  mesh_shape: Sequence[int] = (-1, 1, 1)) -> PairScorer:
    """Our MODEL_DIR (at `step`, None = the latest) or an HF T5 dir, through the public Reranker API only.

    mesh_shape (data, fsdp, model) shards the parameters with the training rules: (1, -1, 1) is fsdp over
    every device, for a model that does not fit one; the default replicates it."""
    from twolar_jax.reranker import Reranker

    extra = {"step": step} if step is not None else {}
    return Reranker.from_pretrained(checkpoint, score_head=score_head, dtype=dtype, batch_size=batch_size,
                                    max_length=max_length, truncation=truncation, mesh_shape=tuple(mesh_shape),
                                    **extra)


def load_keyed_reranker(checkpoint: str, *, score_head: str, dtype: str, batch_size: int, max_length: int,
                        truncation: str, mesh_shape: Sequence[int] = (-1, 1, 1),
                        listwise: ListwiseOptions = ListwiseOptions()) -> tuple[PairScorer, dict]:
    """(scorer, the model half of its score-log key): the checkpoint is resolved once (a hub id to its
    snapshot dir), and a MODEL_DIR is loaded at the step the key names. `listwise.method` set: a listwise
    student ranked over sliding windows (eval.listwise) instead of the pointwise Reranker."""
    from twolar_jax.hub import resolve_checkpoint

    local = resolve_checkpoint(checkpoint)
    identity = score_log.checkpoint_identity(local)
    if listwise.method:
        scorer = load_listwise(str(local), listwise, dtype=dtype, batch_size=batch_size, mesh_shape=mesh_shape,
                               step=identity.get("step"))
    else:
        scorer = load_reranker(str(local), score_head=score_head, dtype=dtype, batch_size=batch_size,
                               max_length=max_length, truncation=truncation, step=identity.get("step"),
                               mesh_shape=mesh_shape)
    key = score_log.score_key(identity, score_head=score_head, dtype=dtype, max_length=max_length,
                              truncation=truncation)
    return scorer, {**key, **listwise.key()}


def first_stage_run(ds: eval_sets.EvalSet, name: str, stage: FirstStage) -> Run:
    """The candidates of the judged queries: a given run file, or the set's own first stage."""
    if name in stage.runs:
        first = read_run(stage.runs[name], known_queries=set(ds.qrels) | set(ds.queries))
    else:
        first = ds.first_stage(stage.depth)
    return {q: docs for q, docs in first.items() if q in ds.qrels}


def load_dataset(name: str, data_dir: Path, stage: FirstStage, max_queries: Optional[int]) -> eval_sets.EvalSet:
    """The named set, cut to its first `max_queries` judged queries (sorted ids) when asked."""
    if name.startswith("beir/"):
        ds = eval_sets.load_set(name, data_dir, split=stage.split, cache_dir=stage.cache_dir, k1=stage.k1, b=stage.b,
                                remove_query=stage.remove_query, threads=stage.threads)
    else:
        ds = eval_sets.load_set(name, data_dir)
    if max_queries is not None:
        ds.qrels = {q: ds.qrels[q] for q in sorted(ds.qrels)[:max_queries]}
    return ds


def _load_in_turn(name: str, data_dir: Path, stage: FirstStage, max_queries: Optional[int]) -> eval_sets.EvalSet:
    """load_dataset on every host, process 0 first: a BM25 index it builds in a shared cache_dir is then
    reused by the others instead of being built by all hosts at once (one process: just load)."""
    index, count = multihost.process_layout()
    if index > 0:
        multihost.barrier(f"eval {name}: loaded", count)
    ds = load_dataset(name, data_dir, stage, max_queries)
    if index == 0:
        multihost.barrier(f"eval {name}: loaded", count)
    return ds


def evaluate_dataset(name: str, *, data_dir: Path, out: Path, stage: FirstStage, scorer: Optional[PairScorer],
                     resume_key: Optional[dict], top_k: int, measures: Sequence[str], run_tag: str,
                     pairs_per_call: int, max_queries: Optional[int]
                     ) -> Optional[tuple[dict[str, float], tuple[int, int]]]:
    """One dataset: first stage, rerank (unless scorer is None: bm25 mode), run files and metrics.json.

    Returns (means, (queries evaluated, judged queries of the set)). On a pod each host scores its share
    of the queries (eval.multihost); process 0 alone writes the files and returns, the others return None."""
    ds = _load_in_turn(name, data_dir, stage, max_queries)
    first = first_stage_run(ds, name, stage)
    ds_dir = out / name.replace("/", "_")
    chief = multihost.process_layout()[0] == 0
    if chief:
        write_trec_run(ds_dir / "first_stage.trec", first, tag="first_stage", depth=stage.depth)
    if scorer is None:
        final = first if chief else None
    else:
        requests = requests_from_run(first, ds.queries, ds.doc_text, k=stage.depth, source=stage.runs.get(name, name))
        # scores.jsonl is resumed only for the same checkpoint, settings and candidates (eval.score_log)
        final = multihost.rerank_on_hosts(scorer, requests, top_k=top_k, pairs_per_call=pairs_per_call,
                                          log_path=ds_dir / "scores.jsonl", meta_path=ds_dir / "scores.meta.json",
                                          model_key=resume_key, desc=name, barrier_name=f"eval {name}")
    if final is None:
        return None
    write_trec_run(ds_dir / "run.trec", final, tag=run_tag if scorer is not None else "first_stage")
    aggregate, per_query = evaluate_run(ds.qrels, final, measures)
    counts = (len(ds.qrels), ds.total_queries)
    write_json(ds_dir / "metrics.json", {
        "dataset": name, "mode": "bm25" if scorer is None else "rerank", "queries": queries_label(*counts),
        "num_queries": counts[0], "total_queries": counts[1], "first_stage_depth": stage.depth,
        "reranked_depth": None if scorer is None else min(top_k, stage.depth), "mean": aggregate,
        "per_query": per_query})
    return aggregate, counts


def evaluate(
    *,
    output_dir: str,
    datasets: Sequence[str] = ("trec_dl/dl19",),
    data_dir: Optional[str] = None,
    mode: str = "rerank",
    first_stage: FirstStage = FirstStage(),
    reranker: RerankerConfig | PairScorer = RerankerConfig(),
    top_k: int = 100,
    measures: Optional[Sequence[str]] = None,
    run_tag: str = "twolar",
    pairs_per_call: int = 1024,
    max_queries: Optional[int] = None,
) -> dict[str, dict[str, float]]:
    """Evaluate one model (or the first stage alone with mode="bm25") on the named datasets.

    datasets: "trec_dl/dl19", "trec_dl/dl20", "beir/<name>", "beir/*" (every BEIR dir under data_dir/beir);
    data_dir defaults to the shipped data. first_stage: how candidates are found (its `runs`, {dataset name:
    TREC run file}, replace BM25 / the shipped candidates for those sets). reranker: a RerankerConfig (its
    checkpoint is loaded), or an in-memory object with `score_pairs` (tests, notebooks). max_queries: keep
    only the first N judged queries (sorted ids) of each set; metrics.json, results.md and results.json then
    say "N of <total>" queries. measures: ir-measures names; None = default_measures(depth), recall named by
    the depth of the runs (top_k reranked, or the first-stage depth in bm25 mode). Runs are ordered as
    trec_eval orders them. Returns {dataset: {measure: mean}}; the tables also hold the BEIR average. On a
    pod (jax.distributed), every host scores its share of the queries and process 0 alone writes the files
    and returns the means; the others return {} (eval.multihost).
    """
    check_choice("evaluate.mode", mode, MODES)
    data_path = Path(data_dir) if data_dir else resources.data_dir()
    names = eval_sets.expand_names(list(datasets), data_path)
    stage = first_stage if first_stage.depth is not None else dataclasses.replace(first_stage, depth=top_k)
    unknown = set(stage.runs) - set(names)
    if unknown:
        raise OptionError(f"FirstStage.runs names datasets not evaluated: {sorted(unknown)}")
    depth = stage.depth if mode == "bm25" else min(top_k, stage.depth)
    measures = _measures_for(measures, depth)
    resume_key = None  # scores.jsonl is reused only for the same checkpoint, settings and candidates
    checkpoint = reranker.checkpoint if isinstance(reranker, RerankerConfig) else None
    if mode == "rerank" and reranker is None:
        raise OptionError("evaluate.mode='rerank' needs a reranker (a RerankerConfig or an object with score_pairs)")
    if mode == "rerank" and isinstance(reranker, RerankerConfig):
        reranker.check()
    if mode == "rerank" and isinstance(reranker, RerankerConfig):
        reranker, resume_key = reranker.load()  # a bad checkpoint fails here, before output_dir exists
    lock = dir_lock.hold(output_dir, option="evaluate.output_dir",
                         lock_name=dir_lock.lock_name(multihost.process_layout()[0]))
    with lock:  # before any data is read or scored: a second job on this output_dir refuses
        out = Path(output_dir)
        results, counts, timings = _evaluate_all(
            names, data_dir=data_path, out=out, stage=stage, scorer=reranker if mode == "rerank" else None,
            resume_key=resume_key, top_k=top_k, measures=measures, run_tag=run_tag,
            pairs_per_call=pairs_per_call, max_queries=max_queries)
        if multihost.process_layout()[0] != 0:  # a pod's process > 0: process 0 writes and reports
            return {}
        header = {"mode": mode, "checkpoint": checkpoint, "depth": depth, "measures": list(measures)}
        print(_write_tables(out, results, counts, header, seconds=timings), end="")
        return results


def _evaluate_all(names: Sequence[str], **kwargs: Any) -> tuple[dict, dict, dict]:
    """evaluate_dataset on each set, logged: ({set: means}, {set: query counts}, {set: seconds}); all
    empty on a pod's process > 0, which scores its share of each set and reports nothing."""
    results: dict[str, dict[str, float]] = {}
    counts: dict[str, tuple[int, int]] = {}
    timings: dict[str, float] = {}
    for name in names:
        start = time.time()
        done = evaluate_dataset(name, **kwargs)
        if done is None:
            continue
        results[name], counts[name] = done
        timings[name] = time.time() - start
        log.info("%s (%s queries): %s (%.1fs)", name, queries_label(*counts[name]),
                 " ".join(f"{k}={v:.4f}" for k, v in results[name].items()), timings[name])
    return results, counts, timings


def _write_tables(out: Path, results: dict, counts: dict, header: dict, *, seconds: dict) -> str:
    """results.md (with how many of each set's queries) and results.json, a BEIR average row; the table."""
    measures = header["measures"]
    beir = [n for n in results if n.startswith("beir/")]
    rows = results_table(results, measures, beir_datasets=beir)
    counted = results_table(results, measures, beir_datasets=beir, counts=counts)
    table = to_markdown(counted, measures)
    write_text(out / "results.md", table)
    queries = {r["dataset"]: {k: r[k] for k in ("queries", "num_queries", "total_queries")} for r in counted}
    write_json(out / "results.json", {**header, "rows": rows, "queries": queries, "seconds": seconds})
    return table


def _measures_for(measures: Optional[Sequence[str]], depth: int) -> tuple[str, ...]:
    """The default measures for runs `depth` deep, or the given ones (a recall deeper than the runs is
    logged: it can only repeat R@depth)."""
    if measures is None:
        return default_measures(depth)
    for m in parse_measures(measures):
        cutoff = m.params.get("cutoff")
        if m.NAME == "R" and isinstance(cutoff, int) and cutoff > depth:
            log.warning("%s is measured on runs %d deep: it equals R@%d", m, depth, depth)
    return tuple(measures)


def register_configurables() -> Any:
    """Register `evaluate`, its two configs (and the model presets and shipped-data paths) with gin,
    idempotently; returns it configured. Not the training option objects: an eval job loads no optimizer,
    trainer or orbax."""
    from twolar_jax import configurables

    configurables.register_resources()
    gin_utils.register(FirstStage, module="eval")
    gin_utils.register(RerankerConfig, module="eval")
    return gin_utils.register(evaluate, name="evaluate")


EVAL_NOTE = ("rerank mode (the default) needs RerankerConfig.checkpoint (an HF T5 dir or a training MODEL_DIR): "
             "--gin.RerankerConfig.checkpoint=\"'DIR'\"; every job needs --gin.evaluate.output_dir=\"'DIR'\"; "
             "--gin.evaluate.mode=\"'bm25'\" scores the first stage alone. How candidates are found: FirstStage.* "
             "(depth, split, k1, b, remove_query, cache_dir, threads, runs); how they are scored: RerankerConfig.* "
             "(checkpoint, score_head, dtype, batch_size, max_length, truncation, mesh_shape).")


def _flags(argv: Sequence[str]):
    parser = entry.parser_with_gin_help("twolar-eval", "Rerank and evaluate on TREC DL / BEIR (gin configures the job).",
                                        "eval/", "mesh/", note=EVAL_NOTE)
    add_listwise_flags(parser)
    entry.add_common_flags(parser)
    multihost.add_flags(parser)
    return parser.parse_args(list(argv))


def listwise_bindings(flags: Any) -> list[str]:
    """The gin bindings the listwise flags stand for (parsed after the user's, so a flag wins)."""
    names = ("listwise", "window", "stride", "passage_length")
    return [f"RerankerConfig.{n} = {getattr(flags, n)!r}" for n in names if getattr(flags, n) is not None]


def _bound(name: str) -> Any:
    """The value gin binds to `name` (macros followed), or None when unbound."""
    try:
        return gin_utils.query(name)
    except (ValueError, KeyError):
        return None


def check_bound_options() -> None:
    """Validate the job's options where they are given (the gin bindings), before any data is read."""
    mode = _bound("evaluate.mode")
    if mode is not None:
        check_choice("evaluate.mode", mode, MODES)
    if not _bound("evaluate.output_dir"):
        raise OptionError("evaluate.output_dir is required: --gin.evaluate.output_dir=\"'DIR'\"")
    user_paths.check_output("evaluate.output_dir", _bound("evaluate.output_dir"), kind="dir")
    if _bound("evaluate.data_dir"):
        user_paths.check_input("evaluate.data_dir", _bound("evaluate.data_dir"), kind="dir")
    for name in ("evaluate.top_k", "evaluate.max_queries", "evaluate.pairs_per_call"):
        value = _bound(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionError(f"{name}={value!r}: expected an integer >= 1")
    reranker = _bound("evaluate.reranker")
    if (mode or "rerank") == "rerank" and isinstance(reranker, RerankerConfig):
        reranker.check()
        if not reranker.checkpoint:
            raise OptionError("evaluate.mode='rerank' needs RerankerConfig.checkpoint: "
                              "--gin.RerankerConfig.checkpoint=\"'DIR'\" (or --gin.evaluate.mode=\"'bm25'\")")


def _check_mesh_shape(shape: Any) -> None:
    """RerankerConfig.mesh_shape: three sizes over (data, fsdp, model) that the devices can fill."""
    if shape is None:
        return
    if not isinstance(shape, (list, tuple)) or len(shape) != 3 or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in shape):
        raise OptionError(f"RerankerConfig.mesh_shape={shape!r}: expected three integers (data, fsdp, model), "
                          "one of them may be -1")
    import jax

    from twolar_jax.partitioning import fill_mesh_shape

    try:
        fill_mesh_shape(tuple(shape), jax.local_device_count())  # the Reranker's devices: this host's
    except OptionError as e:
        raise OptionError(f"RerankerConfig.mesh_shape: {e}") from None


def _main(argv: list[str]) -> int:
    files, bindings, paths, rest = gin_utils.split_gin_args(argv)
    flags = _flags(rest)
    entry.start(flags)
    multihost.initialize(flags)
    configured = register_configurables()
    gin_utils.parse_gin_flags(files, bindings + listwise_bindings(flags), paths)
    check_bound_options()
    entry.on_interrupt(f"the scores of every finished query are in {gin_utils.query('evaluate.output_dir')}")
    configured()
    if multihost.process_layout()[0] == 0:
        gin_utils.write_operative_config(gin_utils.query("evaluate.output_dir"))
    return 0


def console_main(argv: Optional[Sequence[str]] = None) -> int:
    """`twolar-eval` / `python -m eval.run`: gin flags in, `evaluate(...)` out; exit code 0, or 2 with one line
    on stderr for a user error (--debug: with the traceback)."""
    return entry.run_console("twolar-eval", _main, argv)


if __name__ == "__main__":
    sys.exit(console_main())
