"""End-to-end builds on shipped SciFact data with the offline teacher: bad input is counted, not fatal;
the gin entry point runs; the output is valid distillation JSONL."""
import json

import gin
import numpy as np
import pytest

from data_pipeline.set_builder import build as build_module
from data_pipeline.set_builder import cli as build_cli
from data_pipeline.set_builder.configurables import register_build
from data_pipeline.set_builder.build import build
from data_pipeline.distill_format import read_distill_jsonl
from data_pipeline.set_builder.offline_teacher import OfflineTeacher, SentenceTransformerScorer
from data_pipeline.set_builder.queries import CroppedSentences, OriginalQueries
from retrieval.bm25 import BM25Retriever
from retrieval.run_file import RunFileRetriever

pytestmark = pytest.mark.bm25


@pytest.fixture(scope="module")
def scorer():
    return SentenceTransformerScorer()


def _small_scifact(data_dir, tmp_path, n=150):
    lines = (data_dir / "beir" / "scifact" / "corpus.jsonl").read_text().splitlines()[:n]
    lines.insert(3, json.dumps({"_id": "empty-1", "title": "a title only", "text": ""}))
    lines.insert(7, json.dumps({"_id": "empty-2", "text": "   "}))
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [json.loads(x)["_id"] for x in lines]


def test_build_offline_counts_bad_input_and_labels_the_rest(data_dir, tmp_path, scorer):
    corpus_path, ids = _small_scifact(data_dir, tmp_path)
    queries = tmp_path / "queries.tsv"
    queries.write_text("o1\tDiffusion tensor imaging of white matter in newborns\no2\t \n"
                       "o3\tzzqxv vvkjw\no4\tmicrostructural development of the brain\n")
    run = tmp_path / "run.trec"  # a retriever that is short of k for every query
    run.write_text("".join(f"o1 Q0 {ids[i]} {i + 1} {10 - i} dense\n" for i in range(3)))
    out = tmp_path / "out"
    k = 10
    manifest = build(
        output_dir=str(out), corpus_path=str(corpus_path), teacher=OfflineTeacher(scorer=scorer, progress=False),
        retrievers={"bm25": BM25Retriever(), "dense": RunFileRetriever(path=str(run))},
        query_sources={"crop": CroppedSentences(min_words=5), "original": OriginalQueries(path=str(queries))},
        query_mix={"crop": 0.5, "original": 0.5}, num_queries=8, depth=k, progress=False,
        work_dir=str(tmp_path / "work"))

    assert manifest["build"]["corpus"]["skipped_empty"] == 1  # the title-only doc is kept (its title is text)
    assert manifest["queries"]["by_source"]["original"]["skipped_empty"] == 1
    assert manifest["queries"]["shortfall"] == {"original": 1}  # 4 asked, 3 non-empty in the file
    n_queries = manifest["candidates"]["queries"]
    assert n_queries == 7
    dense = manifest["candidates"]["by_retriever"]["dense"]
    assert dense == {"hits": 3, "queries_short_of_k": n_queries, "missing_hits": k * n_queries - 3,
                     "unknown_docids": 0}
    assert manifest["candidates"]["no_candidates"] == 1  # "zzqxv vvkjw" matches nothing anywhere
    assert manifest["labelled"]["queries"] == n_queries - 1
    assert manifest["labelled"]["by_query_type"] == {"crop": 4, "original": 2}
    assert manifest["runs"][-1]["status"] == "complete"
    assert manifest["teacher"]["kind"] == "offline"

    records = {r.qid: r for r in read_distill_jsonl(out / "train.jsonl")}
    assert set(records) == set(manifest_qids(out)) - {"o3"}
    o1 = records["o1"]
    assert {c.source for c in o1.candidates} == {"bm25", "dense"} and len(o1.candidates) == k
    assert len({c.docid for c in o1.candidates}) == k
    # Teacher order and scores are the scorer's own, best first.
    scores = scorer.score(o1.query, [c.text for c in o1.candidates])
    np.testing.assert_allclose(o1.teacher_scores, scores, rtol=1e-4, atol=1e-5)
    assert list(o1.teacher_scores) == sorted(o1.teacher_scores, reverse=True)
    for r in records.values():
        if r.query_type == "crop":  # a cropped sentence's own passage is among the candidates
            assert any(r.query in c.text for c in r.candidates)


def manifest_qids(out):
    return [json.loads(x)["qid"] for x in (out / "queries.jsonl").read_text().splitlines()]


def test_console_main_runs_the_scifact_offline_gin(tmp_path, monkeypatch, repo_root, scorer):
    monkeypatch.chdir(tmp_path)  # the shipped gin and data resolve from any directory
    gin.clear_config()
    out = tmp_path / "scifact"
    code = build_cli.console_main([
        "--gin_file=runs/build_scifact_offline.gin", f"--gin.OUTPUT_DIR='{out}'", "--gin.build.num_queries=6",
        "--gin.build.max_corpus_passages=400", "--gin.build.depth=8", "--gin.build.progress=False",
        f"--gin.build.work_dir='{tmp_path / 'work'}'"])
    gin.clear_config()
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labelled"]["queries"] == 6 and manifest["build"]["retrievers"] == ["bm25"]
    assert sum(manifest["labelled"]["by_query_type"].values()) == 6
    assert "build.num_queries = 6" in (out / "config.gin").read_text()
    assert len(list(read_distill_jsonl(out / "train.jsonl"))) == 6


def test_msmarco_openai_gin_parses_with_its_required_macros(tmp_path):
    from twolar_jax import gin_utils

    configured = register_build()
    gin.clear_config()
    try:
        gin_utils.parse_gin_flags(
            ["runs/build_msmarco_openai.gin"],
            [f"OUTPUT_DIR = '{tmp_path}'", "MSMARCO_COLLECTION = 'c.tsv'", "DOC2QUERY_CKPT = 'd'",
             "SPLADE_CKPT = 's'", "DRAGON_QUERY_ENCODER = 'q'", "DRAGON_CONTEXT_ENCODER = 'c'", "MONOT5_CKPT = 'm'"])
        assert gin.query_parameter("teacher.ListwiseLLMTeacher.window_size") == 20
        assert gin.query_parameter("teacher.ListwiseLLMTeacher.step") == 10
        assert gin.query_parameter("build.query_mix") == {"crop": 0.5, "doct5query": 0.5}
        assert gin.query_parameter("build.num_queries") == 20000
        assert configured is register_build()  # registration is idempotent
    finally:
        gin.clear_config()


@pytest.mark.slow
def test_build_hands_train_jsonl_to_the_tfds_builder(tmp_path):
    from data_pipeline.distill_format import Candidate, DistillRecord, write_distill_jsonl

    records = [DistillRecord(f"q{i}", f"query {i}", "crop",
                             [Candidate(f"d{j}", f"text {j}", "bm25") for j in range(3)]) for i in range(5)]
    write_distill_jsonl(tmp_path / "train.jsonl", records)
    status = build_module._maybe_tfds(tmp_path, str(tmp_path / "tfds"))
    assert status.startswith("twolar_distill 1.0.0")
    import tensorflow_datasets as tfds

    assert tfds.builder("twolar_distill", data_dir=str(tmp_path / "tfds")).info.splits["train"].num_examples == 5
    assert build_module._maybe_tfds(tmp_path, None) == "not requested"
