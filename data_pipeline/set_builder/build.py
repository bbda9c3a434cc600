"""Build the TWOLAR distillation set: queries -> first-stage candidates -> teacher order -> JSONL.

Three stages, each durable so that kill -9 at any moment loses nothing and a re-run repeats nothing:
  1. queries.jsonl     written once, atomically (with queries_meta.json): the mixed, deduped query set.
  2. candidates.jsonl  append-only, one line per query: merged candidates with their `source`, in their
                       final order. The teacher stage reads its inputs from this file only.
  3. train.jsonl       append-only, one line per labelled query (the distillation JSONL of
                       data_pipeline/distill_format.py), preceded by its teacher_log.jsonl line; the
                       teacher's call cache (llm_cache.jsonl) makes re-asking a finished window free.
manifest.json is rewritten atomically every `manifest_every_s` seconds and at the end.
The command line is data_pipeline/set_builder/cli.py (`twolar-build`).

Resume rules (a resumed build sends the requests and writes the lines of an uninterrupted one):
  - Retrieval batches are cut from the whole query list; a batch on disk is skipped, a half-written
    one is retrieved whole again and only its missing lines are appended. A dense or SPLADE encoder's
    floats move with what else is in its batch, so any other batching could reorder near ties.
  - Floats order candidates once, when their line is written (retrieval.runs.sort_hits, then the
    merge); the teacher's inputs are read back from candidates.jsonl, never recomputed.
  - A teacher answer is in the call cache before the next window is built from it.
  - Accounting: each answered call is appended to the call cache exactly once, before anything is built
    from it, so the manifest's `paid` (answers, tokens, cost) sums the cache lines each run appended
    (manifest.CallLedger), never teacher_log lines. A query's teacher_log line is written before its
    train line; a kill between them makes the next run label it again from the cache (a second log
    line, all cache hits). Its paid fields are summed over its log lines and its label fields
    (windows, cache hits, repairs) are its last line's, so `teacher_labels` counts it once.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

from data_pipeline.distill_format import Candidate, DistillRecord, record_to_json
from data_pipeline.set_builder import pricing
from data_pipeline.set_builder.manifest import CallLedger, ManifestState, load_runs, write_manifest
from data_pipeline.set_builder.queries import QuerySource, mix_queries, read_queries_file, write_queries
from data_pipeline.set_builder.teacher import Teacher, TeacherRequest, TeacherResult
from retrieval.base import Retriever
from retrieval.corpus import Corpus, read_corpus
from retrieval.fusion import merge_candidates
from retrieval.runs import sort_hits
from twolar_jax import dir_lock
from twolar_jax.durable_io import AppendOnlyJsonl, read_jsonl, repair_tail, write_json_atomic
from twolar_jax.errors import FormatError, OptionError

log = logging.getLogger("data_pipeline.build")

QUERIES, QUERIES_META, CANDIDATES = "queries.jsonl", "queries_meta.json", "candidates.jsonl"
TRAIN, TEACHER_LOG, MANIFEST = "train.jsonl", "teacher_log.jsonl", "manifest.json"
DEFAULT_MIX = {"crop": 0.5, "doct5query": 0.5}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# --------------------------------------------------------------------------------------------- stage 1
def query_stage(out: Path, corpus: Corpus, *, sources: Mapping[str, QuerySource], mix: Mapping[str, float],
                num_queries: int, seed: int) -> tuple[list, dict]:
    """The query set: read back when queries.jsonl exists, else generated, mixed and written atomically."""
    queries_path, meta_path = out / QUERIES, out / QUERIES_META
    if queries_path.is_file():
        queries = read_queries_file(queries_path)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        log.info("resuming: %d queries from %s", len(queries), queries_path)
    else:
        queries, stats = mix_queries(sources, mix, num_queries, corpus=corpus, seed=seed)
        meta = {"mix": dict(mix), "num_queries": num_queries, "seed": seed, **stats}
        write_json_atomic(meta_path, meta)
        write_queries(queries_path, queries)
    if not queries:
        raise OptionError("the query stage produced no queries (build.query_sources / build.query_mix)")
    return queries, meta


# --------------------------------------------------------------------------------------------- stage 2
def _candidates_line(q, per: dict, corpus: Corpus, *, depth: int, k: int, quotas) -> dict:
    """One candidates.jsonl line. The retrievers' floats order their hits here, once, by the project's one
    rule (sort_hits: score desc, ties by docid); later stages only read the order written."""
    per = {name: sort_hits(hits)[:k] for name, hits in per.items()}
    info = {name: {"hits": len(h), "missing": max(0, k - len(h)),
                   "unknown_docids": sum(1 for d, _ in h if d not in corpus)} for name, h in per.items()}
    merged = merge_candidates(per, depth=depth, quotas=quotas, valid=corpus)
    return {"qid": q.qid, "query": q.text, "query_type": q.query_type,
            "candidates": [{"docid": d, "source": s} for d, s in merged], "retrieval": info}


def read_candidates(path: Path) -> dict[str, dict]:
    """{qid: line} of candidates.jsonl (a qid's first line wins): what the teacher stage is built from."""
    done: dict[str, dict] = {}
    for _, obj in read_jsonl(path):
        done.setdefault(obj["qid"], obj)
    return done


def retrieval_batches(queries: list, batch_size: int) -> Iterator[list]:
    """Batches cut from the whole query list, never from what is left: a resumed build hands each retriever
    the batches an uninterrupted one does. A dense or SPLADE encoder's floats move in their last bits with
    what else is in the (padded) batch, and those floats order near-tied candidates, i.e. the teacher's
    prompts."""
    if batch_size < 1:
        raise OptionError(f"retrieval_batch_size={batch_size} must be >= 1")
    for lo in range(0, len(queries), batch_size):
        yield list(queries[lo:lo + batch_size])


def candidate_stage(*, queries, corpus: Corpus, retrievers: Mapping[str, Retriever], path: Path, work_dir: Path,
                    depth: int, k: int, quotas, batch_size: int, state: ManifestState, progress: bool) -> None:
    """Candidates for every query not yet in candidates.jsonl. A batch already on disk is skipped; a
    half-written one (a kill mid-batch) is retrieved whole again and only its missing lines are appended."""
    from twolar_jax.progress import progress_bar

    repair_tail(path)
    done = read_candidates(path)
    for obj in done.values():
        state.add_candidates(obj)
    pending = sum(1 for q in queries if q.qid not in done)
    if not pending:
        return
    if not retrievers:
        raise OptionError("no retrievers configured (build.retrievers)")
    for name, retriever in retrievers.items():
        log.info("preparing retriever %s", name)
        retriever.prepare(corpus, work_dir)
    with AppendOnlyJsonl(path) as sink, progress_bar(total=pending, desc="retrieve", unit="query",
                                            disable=not progress, dynamic_ncols=True) as bar:
        for batch in retrieval_batches(queries, batch_size):
            missing = [q for q in batch if q.qid not in done]
            if not missing:
                continue
            texts = {q.qid: q.text for q in batch}
            results = {name: r.retrieve(texts, k) for name, r in retrievers.items()}
            for q in missing:
                per = {name: results[name].get(q.qid, []) for name in retrievers}
                obj = _candidates_line(q, per, corpus, depth=depth, k=k, quotas=quotas)
                sink.append(obj)
                done[q.qid] = obj
                state.add_candidates(obj)
            bar.update(len(missing))


# --------------------------------------------------------------------------------------------- stage 3
def scan_labelled(train_path: Path, log_path: Path, state: ManifestState) -> set[str]:
    """qids already in train.jsonl (after cutting a torn last line), counted into the manifest state."""
    repair_tail(train_path)
    repair_tail(log_path)
    labelled: set[str] = set()
    for lineno, obj in read_jsonl(train_path):
        qid = str(obj.get("qid"))
        if qid in labelled:
            raise FormatError(train_path, lineno, "qid", f"qid {qid!r} labelled twice")
        labelled.add(qid)
        state.add_record(obj.get("query_type", ""), [c.get("source", "") for c in obj.get("candidates", [])])
    for _, obj in read_jsonl(log_path):
        state.add_teacher_log(obj)
    return labelled


class LabelWriter:
    """Turns each teacher result into one train.jsonl line (and its teacher_log line), exactly once."""

    def __init__(self, out: Path, cands: dict, corpus: Corpus, labelled: set[str], state: ManifestState,
                 run: dict, flush_manifest, manifest_every_s: float):
        self.cands, self.corpus, self.labelled, self.state, self.run = cands, corpus, labelled, state, run
        self.train, self.tlog = AppendOnlyJsonl(out / TRAIN), AppendOnlyJsonl(out / TEACHER_LOG)
        self.flush_manifest, self.every, self.last_write = flush_manifest, manifest_every_s, time.monotonic()

    def __call__(self, res: TeacherResult) -> None:
        obj = self.cands[res.qid]
        if res.qid in self.labelled:  # cannot happen with one writer; never write a second line
            log.error("query %s labelled twice in one run; second result dropped", res.qid)
            return
        if sorted(res.order) != list(range(len(obj["candidates"]))):
            raise RuntimeError(f"teacher returned a non-permutation for {res.qid}: {res.order}")
        ordered = [obj["candidates"][i] for i in res.order]
        record = DistillRecord(
            qid=res.qid, query=obj["query"], query_type=obj["query_type"],
            candidates=tuple(Candidate(c["docid"], self.corpus[c["docid"]].contents, c["source"]) for c in ordered),
            teacher_scores=tuple(res.scores) if res.scores is not None else None)
        log_line = {"qid": res.qid, **res.stats.to_dict()}
        self.tlog.append(log_line)
        self.train.append(record_to_json(record))
        self.labelled.add(res.qid)
        self.state.add_teacher_log(log_line)
        self.state.add_record(obj["query_type"], [c["source"] for c in ordered])
        self.run["labelled"] += 1
        if time.monotonic() - self.last_write >= self.every:
            self.flush_manifest()
            self.last_write = time.monotonic()

    def close(self) -> None:
        self.train.close()
        self.tlog.close()


def teacher_requests(todo: list[dict], corpus: Corpus) -> Iterator[TeacherRequest]:
    """The teacher's inputs, built only from candidates.jsonl lines (their final order) and the corpus."""
    for obj in todo:
        yield TeacherRequest(obj["qid"], obj["query"], tuple(corpus[c["docid"]].contents for c in obj["candidates"]))


def _run_status(result) -> str:
    if result.aborted:
        return "aborted"
    return "complete" if result.failed == 0 else "incomplete"


def _maybe_tfds(output_dir: Path, tfds_dir: Optional[str]) -> str:
    """Optionally prepare the SeqIO side's TFDS dataset from train.jsonl (imports TensorFlow: only when asked)."""
    if not tfds_dir:
        return "not requested"
    from data_pipeline.seqio_input.tfds_builder import build_tfds

    builder = build_tfds(train_path=output_dir / TRAIN, data_dir=tfds_dir)
    return f"{builder.name} {builder.version} in {tfds_dir}"


def call_ledger(teacher: Teacher, out: Path, teacher_info: Mapping[str, Any]) -> Optional[CallLedger]:
    """The ledger over the teacher's call cache (opened here, its torn tail cut), or None without a cache."""
    open_cache = getattr(teacher, "open_cache", None)
    cache = open_cache(out) if callable(open_cache) else None
    if cache is None or getattr(cache, "path", None) is None:
        return None
    return CallLedger(cache.path, prompt_price_per_1k=teacher_info.get("prompt_price_per_1k", 0.0),
                      completion_price_per_1k=teacher_info.get("completion_price_per_1k", 0.0))


def start_run(out: Path, pending: int, ledger: Optional[CallLedger]) -> tuple[list[dict], dict]:
    """The manifest's runs with this one appended; a run left `running` died by kill -9 and is settled."""
    runs = load_runs(out / MANIFEST)
    for previous in runs:
        if previous.get("status") == "running":  # its process died without a clean exit (kill -9)
            previous["status"] = "killed"
    run: dict[str, Any] = {"started": _now(), "status": "running", "labelled": 0, "failed": 0,
                           "pending_at_start": pending, "teacher_calls": {}}
    if ledger is not None:
        ledger.start(run)
    runs.append(run)
    if ledger is not None:
        ledger.settle(runs)
    return runs, run


def _labelled_qids(path: Path) -> set[str]:
    """qids in train.jsonl, read only (a torn last line is skipped, not cut): what the dry run leaves out."""
    return {str(obj["qid"]) for obj in pricing.tolerant_jsonl(path) if "qid" in obj}


def dry_run_stage(out: Path, *, teacher: Teacher, queries, cands: dict, corpus: Corpus,
                  prices: pricing.Prices) -> pricing.Estimate:
    """Price the teacher stage a real build would run now (the same pending queries, the same call cache),
    writing nothing and calling nothing."""
    labelled = _labelled_qids(out / TRAIN)
    todo = [cands[q.qid] for q in queries if q.qid not in labelled and cands[q.qid]["candidates"]]
    cache = Path(getattr(teacher, "cache_path", None) or out / "llm_cache.jsonl")
    return pricing.estimate(teacher, teacher_requests(todo, corpus), prices, pricing.read_cached_answers(cache))


def _run_estimate(teacher: Teacher, todo: list[dict], corpus: Corpus, prices: pricing.Prices,
                  ledger: Optional[CallLedger]) -> Optional[dict]:
    """This run's estimate (as the dry run computes it, over the opened call cache), or None without a ledger."""
    if ledger is None or not hasattr(teacher, "planned_windows"):
        return None
    est = pricing.estimate(teacher, teacher_requests(todo, corpus), prices, getattr(teacher, "cache", None))
    log.info("teacher estimate: %s", est.line().removeprefix("dry_run "))
    return est.to_dict()


def teacher_stage(out: Path, *, teacher: Teacher, queries, cands: dict, corpus: Corpus, state: ManifestState,
                  build_info: dict, query_meta: dict, manifest_every_s: float, tfds_dir: Optional[str],
                  prices: pricing.Prices = pricing.Prices()) -> None:
    """Label every query not yet in train.jsonl; the manifest records this run's counts and status, and its
    estimated and spent tokens (logged against each other at every manifest write)."""
    labelled = scan_labelled(out / TRAIN, out / TEACHER_LOG, state)
    todo = [cands[q.qid] for q in queries if q.qid not in labelled and cands[q.qid]["candidates"]]
    teacher_info = teacher.describe()
    ledger = call_ledger(teacher, out, teacher_info)
    runs, run = start_run(out, len(todo), ledger)
    estimate = _run_estimate(teacher, todo, corpus, prices, ledger)
    if estimate is not None:
        run["estimate"] = estimate

    def flush_manifest() -> None:
        run["teacher_calls"] = teacher.call_stats()
        if ledger is not None:
            ledger.advance(run)
            pricing.settle_spent(runs)
            if estimate is not None:
                log.info(pricing.progress_line(run))
        write_manifest(out / MANIFEST, state=state, build=build_info, teacher=teacher_info, queries=query_meta,
                       runs=runs, labelled_qids=labelled)

    writer = LabelWriter(out, cands, corpus, labelled, state, run, flush_manifest, manifest_every_s)
    status = "interrupted"
    try:
        flush_manifest()
        result = teacher.rank_all(teacher_requests(todo, corpus), writer, work_dir=out, total=len(todo))
        run.update(failed=result.failed, failed_qids=result.failed_qids[:100])
        if result.aborted:
            run["aborted"] = result.aborted
        status = _run_status(result)
    finally:
        run.update(status=status, finished=_now())
        run["tfds"] = _maybe_tfds(out, tfds_dir) if status == "complete" else "not built"
        writer.close()
        close = getattr(teacher, "close", None)
        if close:
            close()
        flush_manifest()


# ------------------------------------------------------------------------------------------------ entry
@dir_lock.holding("output_dir", option="build.output_dir")  # one build per OUTPUT_DIR
def build(
    *,
    output_dir: str,
    corpus_path: str,
    teacher: Teacher,
    retrievers: Mapping[str, Retriever],
    query_sources: Optional[Mapping[str, QuerySource]] = None,
    query_mix: Optional[Mapping[str, float]] = None,
    num_queries: int = 20000,
    seed: int = 0,
    depth: int = 30,
    retrieve_k: Optional[int] = None,
    quotas: Optional[Mapping[str, int]] = None,
    retrieval_batch_size: int = 256,
    work_dir: Optional[str] = None,
    max_corpus_passages: Optional[int] = None,
    manifest_every_s: float = 30.0,
    tfds_dir: Optional[str] = None,
    progress: bool = True,
    write_gin_config: bool = False,
    dry_run: bool = False,
    price_per_million_input: Optional[float] = None,
    price_per_million_output: Optional[float] = None,
) -> dict:
    """Run (or resume) a build into output_dir; returns the final manifest.

    retrievers: {name: Retriever}, the merge's interleave order; `name` is each candidate's `source`.
    query_sources/query_mix: {name: source} and {name: weight}; default mix 50/50 "crop"/"doct5query".
    retrieve_k: hits asked of each retriever (default `depth`); quotas: {name: n} per retriever.
    work_dir: where indexes and embeddings are cached (default <output_dir>/work).
    write_gin_config: write gin's operative config (secrets redacted) to output_dir/config.gin first.
    dry_run: run the local stages (queries, candidates) and price the teacher stage without a call; returns
    {"dry_run": the estimate, "line": its one output line} (pricing.py). price_per_million_*: USD per
    million tokens for the estimate and the spent counts (default: the teacher's per-1K prices x 1000).
    """
    prices = pricing.resolve_prices(teacher, price_per_million_input, price_per_million_output)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if write_gin_config:
        from twolar_jax.gin_utils import write_operative_config

        write_operative_config(out)
    work = Path(work_dir) if work_dir else out / "work"
    k = int(retrieve_k or depth)
    corpus = read_corpus(corpus_path, max_documents=max_corpus_passages)
    log.info("corpus %s: %d documents (%d without text skipped)", corpus_path, len(corpus),
             corpus.stats.skipped_empty)
    queries, query_meta = query_stage(out, corpus, sources=dict(query_sources or {}),
                                      mix=dict(query_mix or DEFAULT_MIX), num_queries=num_queries, seed=seed)
    state = ManifestState(depth=depth, retrievers=list(retrievers))
    candidate_stage(queries=queries, corpus=corpus, retrievers=retrievers, path=out / CANDIDATES, work_dir=work,
                    depth=depth, k=k, quotas=quotas, batch_size=retrieval_batch_size, state=state, progress=progress)
    cands = read_candidates(out / CANDIDATES)  # the teacher's inputs: what is on disk, in its final order
    if dry_run:
        est = dry_run_stage(out, teacher=teacher, queries=queries, cands=cands, corpus=corpus, prices=prices)
        return {"dry_run": est.to_dict(), "line": est.line()}
    build_info = {"output_dir": str(out), "corpus_path": str(corpus_path), "corpus": corpus.stats.to_dict(),
                  "depth": depth, "retrieve_k": k, "quotas": dict(quotas) if quotas else "even interleave",
                  "retrievers": list(retrievers), "seed": seed}
    teacher_stage(out, teacher=teacher, queries=queries, cands=cands, corpus=corpus, state=state,
                  build_info=build_info, query_meta=query_meta, manifest_every_s=manifest_every_s, tfds_dir=tfds_dir,
                  prices=prices)
    return json.loads((out / MANIFEST).read_text())
