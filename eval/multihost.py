"""Eval on a pod: every host runs the same job, scores its share of the queries on its own devices, and
process 0 writes the one run file and the metrics.

Why this shape: scoring needs no collective at all (each host's Reranker lays the model over its local
devices), so hosts never wait on each other while they score, and a host that is killed loses only its
own share. Query i goes to host i % process_count: deterministic, balanced to one query, no communication.
Each host appends its scores to its own resumable log (`scores.host1-of-4.jsonl`, keyed by what that host
scores: eval.score_log), so no two hosts write one file; after a barrier, process 0 reads every host's
log through the shared filesystem and writes exactly what one process would have written. The other
processes write no run, metrics or table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence, TypeVar

from eval import score_log
from eval.rerank import PairScorer, logged_scores, rerank
from retrieval.readers import RankRequest
from retrieval.runs import Run

T = TypeVar("T")


def process_layout() -> tuple[int, int]:
    """(this process's index, process count) of a job that called jax.distributed.initialize (--multiprocess);
    else (0, 1), asked without starting a backend (a bm25 job never touches the accelerator)."""
    jax = sys.modules.get("jax")
    if jax is None or not jax.distributed.is_initialized():
        return 0, 1
    return jax.process_index(), jax.process_count()


def share(items: Sequence[T], index: int, count: int) -> list[T]:
    """The items host `index` of `count` works on: item i goes to host i % count."""
    return list(items[index::count])


def host_path(path: Path, suffix: str, index: int, count: int) -> Path:
    """Host `index`'s own copy of a log file: `scores.jsonl` -> `scores.host1-of-2.jsonl` (one process: as is)."""
    if count == 1:
        return path
    name = path.name[:-len(suffix)] if path.name.endswith(suffix) else path.name
    return path.with_name(f"{name}.host{index}-of-{count}{suffix}")


def barrier(name: str, count: int) -> None:
    """Wait until every process gets here (nothing to wait for in one process)."""
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The multi-host flags of twolar-train (t5x's --multiprocess_gpu flags), for the eval commands."""
    parser.add_argument("--multiprocess", action="store_true",
                        help="a pod: call jax.distributed.initialize; each host scores its share of the queries")
    parser.add_argument("--coordinator_address", default=None, help="host:port of process 0 (bare GPU hosts)")
    parser.add_argument("--process_count", type=int, default=None)
    parser.add_argument("--process_index", type=int, default=None)
    return parser


def initialize(flags: argparse.Namespace) -> None:
    """jax.distributed.initialize when the flags ask for it (on a TPU pod jax finds the values itself)."""
    if not (flags.multiprocess or flags.coordinator_address):
        return
    from twolar_jax import partitioning

    partitioning.initialize_distributed(coordinator_address=flags.coordinator_address,
                                        process_count=flags.process_count, process_index=flags.process_index,
                                        multiprocess=flags.multiprocess)


def _log_key(model_key: Optional[dict], requests: Sequence[RankRequest], top_k: int) -> Optional[dict]:
    return None if model_key is None else {**model_key, "candidates": score_log.candidates_digest(requests, top_k)}


def rerank_on_hosts(scorer: PairScorer, requests: Sequence[RankRequest], *, top_k: int, pairs_per_call: int,
                    log_path: Path, meta_path: Path, model_key: Optional[dict], desc: str,
                    barrier_name: str) -> Optional[Run]:
    """eval.rerank.rerank over this host's share, logged to its own resumable log (one process: the
    whole job, the log as named). Returns the whole run (request order) on process 0, None elsewhere.
    model_key: the model half of the log key (eval.score_log), None for an in-memory scorer."""
    if len({r.qid for r in requests}) != len(requests):  # before the split: hosts would not see it
        raise ValueError("duplicate query ids in the rerank requests")
    index, count = process_layout()
    mine = share(requests, index, count)
    log_i = host_path(log_path, ".jsonl", index, count)
    meta_i = host_path(meta_path, ".meta.json", index, count)
    scores = score_log.open_score_log(log_i, meta_i, _log_key(model_key, mine, top_k))
    run = rerank(scorer, mine, top_k=top_k, pairs_per_call=pairs_per_call, scores_path=scores, desc=desc)
    if count == 1:
        return run
    barrier(f"{barrier_name}: scored", count)
    if index != 0:
        return None
    return gather(requests, top_k=top_k, log_path=log_path, meta_path=meta_path, model_key=model_key, count=count)


def gather(requests: Sequence[RankRequest], *, top_k: int, log_path: Path, meta_path: Path,
           model_key: Optional[dict], count: int) -> Run:
    """Every host's scores, read from the logs the hosts finished (after the barrier), in request order.
    A log written for other candidates or another model, or missing a query, is an error, never a gap."""
    run: Run = {}
    for host in range(count):
        part = [RankRequest(r.qid, r.query, r.candidates[:top_k]) for r in share(requests, host, count)]
        log_j = host_path(log_path, ".jsonl", host, count)
        expected = _log_key(model_key, part, top_k)
        meta_j = host_path(meta_path, ".meta.json", host, count)
        if expected is not None and _read_json(meta_j) != expected:
            raise RuntimeError(f"{meta_j}: host {host}'s score log was written for another model or candidates")
        got = logged_scores(log_j, {r.qid: r for r in part})
        missing = [r.qid for r in part if r.candidates and r.qid not in got]
        if missing:
            raise RuntimeError(f"{log_j}: host {host} finished without the scores of queries {missing[:3]}")
        run.update(got)
        run.update({r.qid: {} for r in part if not r.candidates})
    return {r.qid: run[r.qid] for r in requests}


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
