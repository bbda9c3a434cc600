"""Build the TWOLAR distillation set: queries -> first-stage candidates -> teacher order -> JSONL.

    python -m data_pipeline.build --gin_file=data/scifact_offline.gin --gin.OUTPUT_DIR="'/tmp/distill'"
    twolar-build --gin_file=data/msmarco_openai.gin --gin.OUTPUT_DIR="'runs/distill'"

Three stages, each durable so that kill -9 at any moment loses nothing and a re-run repeats nothing:
  1. queries.jsonl     written once, atomically (with queries_meta.json): the mixed, deduped query set.
  2. candidates.jsonl  append-only, one line per query: merged candidates with their `source`.
  3. train.jsonl       append-only, one line per labelled query (the distillation JSONL of
                       data_pipeline/formats.py), preceded by its teacher_log.jsonl line; the teacher's
                       call cache (llm_cache.jsonl) makes re-asking a finished window free.
manifest.json is rewritten atomically every `manifest_every_s` seconds and at the end.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from data_pipeline.cache import AppendOnlyJsonl, read_jsonl, repair_tail, write_json_atomic
from data_pipeline.corpus import load_corpus
from data_pipeline.formats import Candidate, DistillRecord, record_to_json
from data_pipeline.manifest import ManifestState, load_runs, write_manifest
from data_pipeline.queries import (CroppedSentences, DocT5Query, OriginalQueries, QuerySource, mix_queries,
                                   read_queries, write_queries)
from data_pipeline.retrievers import Retriever, merge_candidates
from data_pipeline.teacher import Teacher, TeacherRequest, TeacherResult

log = logging.getLogger("data_pipeline.build")

QUERIES, QUERIES_META, CANDIDATES = "queries.jsonl", "queries_meta.json", "candidates.jsonl"
TRAIN, TEACHER_LOG, MANIFEST = "train.jsonl", "teacher_log.jsonl", "manifest.json"
DEFAULT_MIX = {"crop": 0.5, "doct5query": 0.5}


def _chunks(items: list, size: int) -> Iterator[list]:
    for lo in range(0, len(items), size):
        yield items[lo:lo + size]


def _retrieval_stage(*, queries, corpus, retrievers: Mapping[str, Retriever], path: Path, work_dir: Path,
                     depth: int, k: int, quotas, batch_size: int, state: ManifestState, progress: bool) -> dict:
    """Candidates for every query not yet in candidates.jsonl; returns {qid: line} for all queries."""
    from tqdm import tqdm

    repair_tail(path)
    done: dict[str, dict] = {}
    for _, obj in read_jsonl(path):
        if obj["qid"] not in done:
            done[obj["qid"]] = obj
            state.add_candidates(obj)
    pending = [q for q in queries if q.qid not in done]
    if not pending:
        return done
    if not retrievers:
        raise ValueError("no retrievers configured (build.retrievers)")
    for name, retriever in retrievers.items():
        log.info("preparing retriever %s", name)
        retriever.prepare(corpus, work_dir)
    with AppendOnlyJsonl(path) as out, tqdm(total=len(pending), desc="retrieve", unit="query",
                                           disable=not progress, dynamic_ncols=True) as pbar:
        for chunk in _chunks(pending, batch_size):
            texts = {q.qid: q.text for q in chunk}
            results = {name: r.retrieve(texts, k) for name, r in retrievers.items()}
            for q in chunk:
                per = {name: list(results[name].get(q.qid, []))[:k] for name in retrievers}
                info = {name: {"hits": len(h), "missing": max(0, k - len(h)),
                               "unknown_docids": sum(1 for d, _ in h if d not in corpus)}
                        for name, h in per.items()}
                merged = merge_candidates(per, depth=depth, quotas=quotas, valid=corpus)
                obj = {"qid": q.qid, "query": q.text, "query_type": q.query_type,
                       "candidates": [{"docid": d, "source": s} for d, s in merged], "retrieval": info}
                out.append(obj)
                done[q.qid] = obj
                state.add_candidates(obj)
            pbar.update(len(chunk))
    return done


def _scan_labelled(train_path: Path, log_path: Path, state: ManifestState) -> set[str]:
    """qids already in train.jsonl (after cutting a torn last line), counted into the manifest state."""
    repair_tail(train_path)
    repair_tail(log_path)
    labelled: set[str] = set()
    for lineno, obj in read_jsonl(train_path):
        qid = str(obj.get("qid"))
        if qid in labelled:
            raise ValueError(f"{train_path}:{lineno}: qid {qid!r} labelled twice")
        labelled.add(qid)
        state.add_record(obj.get("query_type", ""), [c.get("source", "") for c in obj.get("candidates", [])])
    for _, obj in read_jsonl(log_path):
        state.add_teacher_log(obj)
    return labelled


def _write_gin_config(path: Path) -> None:
    """gin's operative config, atomically, with any `api_key` binding redacted (the key never reaches a file)."""
    import re

    import gin

    text = re.sub(r"^(\s*\S*api_key\s*=\s*).*$", r"\1None  # redacted: use $OPENAI_API_KEY",
                  gin.operative_config_str(), flags=re.M)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _maybe_tfds(output_dir: Path, tfds_dir: str | None) -> str:
    """Optionally prepare the SeqIO side's TFDS dataset (data_pipeline/tfds_builder.py) from train.jsonl."""
    if not tfds_dir:
        return "not requested"
    from data_pipeline.tfds_builder import build_tfds  # imports TensorFlow: only when asked

    builder = build_tfds(train_path=output_dir / TRAIN, data_dir=tfds_dir)
    return f"{builder.name} {builder.version} in {tfds_dir}"


def build(
    *,
    output_dir: str,
    corpus_path: str,
    teacher: Teacher,
    retrievers: Mapping[str, Retriever],
    query_sources: Mapping[str, QuerySource] | None = None,
    query_mix: Mapping[str, float] | None = None,
    num_queries: int = 20000,
    seed: int = 0,
    depth: int = 30,
    retrieve_k: int | None = None,
    quotas: Mapping[str, int] | None = None,
    retrieval_batch_size: int = 256,
    work_dir: str | None = None,
    max_corpus_passages: int | None = None,
    manifest_every_s: float = 30.0,
    tfds_dir: str | None = None,
    progress: bool = True,
    write_gin_config: bool = False,
) -> dict:
    """Run (or resume) a build into output_dir; returns the final manifest.

    retrievers: {name: Retriever}, the merge's interleave order; `name` is each candidate's `source`.
    query_sources/query_mix: {name: source} and {name: weight}; default mix 50/50 "crop"/"doct5query".
    retrieve_k: hits asked of each retriever (default `depth`); quotas: {name: n} per retriever.
    work_dir: where indexes and embeddings are cached (default <output_dir>/work).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    k = int(retrieve_k or depth)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if write_gin_config:
        _write_gin_config(out / "config.gin")

    corpus = load_corpus(corpus_path, max_passages=max_corpus_passages)
    log.info("corpus %s: %d passages (%d lines without text skipped)", corpus_path, len(corpus),
             corpus.stats.skipped_no_text)

    # 1. queries
    queries_path, meta_path = out / QUERIES, out / QUERIES_META
    if queries_path.is_file():
        queries = read_queries(queries_path)
        query_meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        log.info("resuming: %d queries from %s", len(queries), queries_path)
    else:
        sources = dict(query_sources or {})
        mix = dict(query_mix or DEFAULT_MIX)
        queries, qstats = mix_queries(sources, mix, num_queries, corpus=corpus, seed=seed)
        query_meta = {"mix": mix, "num_queries": num_queries, "seed": seed, **qstats}
        write_json_atomic(meta_path, query_meta)
        write_queries(queries_path, queries)
    if not queries:
        raise ValueError("the query stage produced no queries")

    # 2. candidates
    state = ManifestState(depth=depth, retrievers=list(retrievers))
    cands = _retrieval_stage(queries=queries, corpus=corpus, retrievers=retrievers, path=out / CANDIDATES,
                             work_dir=work, depth=depth, k=k, quotas=quotas, batch_size=retrieval_batch_size,
                             state=state, progress=progress)

    # 3. teacher
    labelled = _scan_labelled(out / TRAIN, out / TEACHER_LOG, state)
    todo = [cands[q.qid] for q in queries if q.qid not in labelled and cands[q.qid]["candidates"]]
    build_info = {"output_dir": str(out), "corpus_path": str(corpus_path), "corpus": corpus.stats.to_dict(),
                  "depth": depth, "retrieve_k": k, "quotas": dict(quotas) if quotas else "even interleave",
                  "retrievers": list(retrievers), "seed": seed}
    runs = load_runs(out / MANIFEST)
    for previous in runs:
        if previous.get("status") == "running":  # its process died without a clean exit (kill -9)
            previous["status"] = "killed"
    run: dict[str, Any] = {"started": started, "status": "running", "labelled": 0, "failed": 0,
                           "pending_at_start": len(todo), "teacher_calls": {}}
    runs.append(run)
    teacher_info = teacher.describe()

    def flush_manifest() -> None:
        run["teacher_calls"] = teacher.call_stats()
        write_manifest(out / MANIFEST, state=state, build=build_info, teacher=teacher_info, queries=query_meta,
                       runs=runs, labelled_qids=labelled)

    last_write = [time.monotonic()]
    train = AppendOnlyJsonl(out / TRAIN)
    tlog = AppendOnlyJsonl(out / TEACHER_LOG)

    def requests() -> Iterator[TeacherRequest]:
        for obj in todo:
            yield TeacherRequest(obj["qid"], obj["query"],
                                 tuple(corpus[c["docid"]].contents for c in obj["candidates"]))

    def on_result(res: TeacherResult) -> None:
        obj = cands[res.qid]
        if res.qid in labelled:  # cannot happen with one writer; never write a second line
            log.error("query %s labelled twice in one run; second result dropped", res.qid)
            return
        ordered = [obj["candidates"][i] for i in res.order]
        if sorted(res.order) != list(range(len(obj["candidates"]))):
            raise RuntimeError(f"teacher returned a non-permutation for {res.qid}: {res.order}")
        record = DistillRecord(
            qid=res.qid, query=obj["query"], query_type=obj["query_type"],
            candidates=tuple(Candidate(c["docid"], corpus[c["docid"]].contents, c["source"]) for c in ordered),
            teacher_scores=tuple(res.scores) if res.scores is not None else None)
        log_line = {"qid": res.qid, **res.stats.to_dict()}
        tlog.append(log_line)
        train.append(record_to_json(record))
        labelled.add(res.qid)
        state.add_teacher_log(log_line)
        state.add_record(obj["query_type"], [c["source"] for c in ordered])
        run["labelled"] += 1
        if time.monotonic() - last_write[0] >= manifest_every_s:
            flush_manifest()
            last_write[0] = time.monotonic()

    status = "interrupted"
    try:
        flush_manifest()
        result = teacher.rank_all(requests(), on_result, work_dir=out, total=len(todo))
        run["failed"] = result.failed
        run["failed_qids"] = result.failed_qids[:100]
        if result.aborted:
            run["aborted"] = result.aborted
            status = "aborted"
        else:
            status = "complete" if result.failed == 0 else "incomplete"
    finally:
        run["status"] = status
        run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        run["tfds"] = _maybe_tfds(out, tfds_dir) if status == "complete" else "not built"
        train.close()
        tlog.close()
        close = getattr(teacher, "close", None)
        if close:
            close()
        flush_manifest()
    return json.loads((out / MANIFEST).read_text())


_CONFIGURED_BUILD: Any = None


def _register_gin() -> Any:
    """Make the entry function and the pluggable parts configurable (only here, as t5x does); once per
    process, since gin refuses a second registration of the same name."""
    global _CONFIGURED_BUILD
    if _CONFIGURED_BUILD is not None:
        return _CONFIGURED_BUILD
    import gin

    from data_pipeline import llm_client, offline_teacher, retrievers, teacher

    for obj in (CroppedSentences, DocT5Query, OriginalQueries):
        gin.external_configurable(obj, module="queries")
    for obj in (retrievers.BM25Retriever, retrievers.SpladeRetriever, retrievers.DragonRetriever,
                retrievers.MonoT5Retriever, retrievers.RunFileRetriever):
        gin.external_configurable(obj, module="retrievers")
    gin.external_configurable(llm_client.ChatClient, module="llm_client")
    gin.external_configurable(teacher.ListwiseLLMTeacher, module="teacher")
    for obj in (offline_teacher.OfflineTeacher, offline_teacher.SentenceTransformerScorer,
                offline_teacher.RerankerScorer):
        gin.external_configurable(obj, module="offline_teacher")
    _CONFIGURED_BUILD = gin.configurable("build", module=None)(build)
    return _CONFIGURED_BUILD


def _absolute_gin_files(argv: list[str], search_dirs: list[Path]) -> list[str]:
    """`--gin_file=data/x.gin` -> an absolute path when the file sits under gin/ (or a search dir).

    Why: gin's package-resource reader turns "data/x.gin" into find_spec("data"), and the repo's
    data/ folder is a namespace package with no origin, which crashes gin (TypeError) before its
    search paths are tried.
    """
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--gin_file" and i + 1 < len(argv):
            arg, i = f"--gin_file={argv[i + 1]}", i + 1
        if arg.startswith("--gin_file="):
            value = arg.split("=", 1)[1]
            if not os.path.isabs(value) and not os.path.isfile(value):
                for base in search_dirs:
                    if (base / value).is_file():
                        value = str((base / value).resolve())
                        break
            arg = f"--gin_file={value}"
        out.append(arg)
        i += 1
    return out


def _interrupt(signum: int, frame: Any) -> None:
    """SIGTERM behaves like Ctrl-C: finished lines are already on disk, the manifest is rewritten."""
    raise KeyboardInterrupt(f"signal {signum}")


def console_main(argv: list[str] | None = None) -> int:
    """`twolar-build` / `python -m data_pipeline.build`: exit 0 when every query is labelled, 1 when
    some are left (re-run to retry them), 2 when the teacher aborted (bad key, unknown model)."""
    from twolar_jax import gin_utils

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    configured = _register_gin()
    code = [0]

    def main(rest: list[str]) -> None:
        if rest:
            raise SystemExit(f"unknown arguments: {rest}")
        manifest = configured(write_gin_config=True)
        status = manifest["runs"][-1]["status"]
        labels = manifest["labelled"]
        log.info("build %s: %d queries labelled (%s); manifest at %s", status, labels["queries"],
                 labels["by_query_type"], Path(manifest["build"]["output_dir"]) / MANIFEST)
        code[0] = {"complete": 0, "incomplete": 1, "aborted": 2}.get(status, 1)

    argv = list(sys.argv[1:] if argv is None else argv)
    _, _, search_paths, _ = gin_utils.split_gin_args(argv)
    argv = _absolute_gin_files(argv, [Path(p) for p in search_paths] + [gin_utils.GIN_DIR])
    try:
        gin_utils.run(main, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return code[0]


if __name__ == "__main__":
    sys.exit(console_main())
