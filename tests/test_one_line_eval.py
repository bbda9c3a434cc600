"""Hostile inputs to `twolar-eval`, `python -m eval.rerank_run`, `python -m eval.trec` and
`python -m eval.reference`, each run as a user runs it (a subprocess, no JAX_PLATFORMS): exit code 2 and
exactly one stderr line that names the option, binding, path or file line at fault, checked before any
scoring, with nothing created."""
import json
import pathlib

import pytest

from console_cases import REPO, Case, assert_one_line, case_names, python_m, run_all

LONG = "n" * 300
DL = REPO / "data" / "trec_dl"


def _files(tmp: pathlib.Path) -> dict[str, pathlib.Path]:
    """Two DL19 queries as a TREC run + TSV corpus + topics, a qrels file, and a few broken variants."""
    entries = json.loads((DL / "dl19_bm25_top100.json").read_text())[:2]
    qids = [str(e["hits"][0]["qid"]) for e in entries]
    run = tmp / "bm25.trec"
    run.write_text("".join(f"{h['qid']} Q0 {h['docid']} {h['rank']} {h['score']} bm25\n"
                           for e in entries for h in e["hits"][:5]))
    corpus = tmp / "collection.tsv"
    corpus.write_text("".join(f"{h['docid']}\t{h['content']}\n" for e in entries for h in e["hits"][:5]))
    topics = tmp / "topics.tsv"
    topics.write_text("".join(f"{q}\t{e['query']}\n" for q, e in zip(qids, entries)))
    one_topic = tmp / "one_topic.tsv"
    one_topic.write_text(f"{qids[0]}\t{entries[0]['query']}\n")
    bad_run = tmp / "bad.trec"
    bad_run.write_text(run.read_text().splitlines()[0] + "\n" + f"{qids[0]} Q0 d9 x 1.0 bm25\n")
    stranger = tmp / "stranger.trec"
    stranger.write_text(run.read_text() + "999999 Q0 d1 1 1.0 bm25\n")
    afile = tmp / "afile"
    afile.write_text("not a folder")
    outdir = tmp / "existing_dir"
    outdir.mkdir()
    return {"run": run, "corpus": corpus, "topics": topics, "one_topic": one_topic, "bad_run": bad_run,
            "stranger": stranger, "afile": afile, "outdir": outdir, "qrels": DL / "qrels.dl19-passage.txt"}


def _cases(tmp: pathlib.Path, ckpt: str) -> list[Case]:
    f = _files(tmp)
    out = tmp / "out"
    rr = lambda *a, run=f["run"], topics=f["topics"]: python_m(  # noqa: E731
        "eval.rerank_run", "--checkpoint", ckpt, "--run", str(run), "--corpus", str(f["corpus"]), "--queries",
        str(topics), *a)
    trec = lambda *a: python_m("eval.trec", "--qrels", str(f["qrels"]), *a)  # noqa: E731
    ev = lambda *a: python_m("eval.run", "--gin_file=eval/trec_dl19.gin", *a)  # noqa: E731
    ref = lambda *a: python_m("eval.reference", *a)  # noqa: E731
    return [
        # rerank_run: every output problem is found before the checkpoint is loaded or a pair scored
        Case("rerank_output_is_a_directory", rr("--output", str(f["outdir"])), ("--output", "is a directory")),
        Case("rerank_output_under_a_file", rr("--output", f"{f['afile']}/run.trec"),
             ("--output", "is a file, not a directory")),
        Case("rerank_output_name_too_long", rr("--output", str(tmp / LONG)), ("--output", "too long")),
        Case("rerank_zero_pairs_per_call", rr("--output", str(out / "a.trec"), "--pairs_per_call", "0"),
             ("--pairs_per_call", "must be >= 1"), (str(out),)),
        Case("rerank_top_k_not_a_number", rr("--output", str(out / "a.trec"), "--top_k", "ten"), ("--top_k", "ten")),
        Case("rerank_qid_not_in_queries", rr("--output", str(out / "a.trec"), topics=f["one_topic"]),
             ("qid", "not in the queries file", "one_topic.tsv"), (str(out),)),
        Case("rerank_missing_run", rr("--output", str(out / "a.trec"), run=tmp / "none.trec"), ("none.trec", "--run"),
             (str(out),)),
        Case("rerank_missing_checkpoint", python_m("eval.rerank_run", "--checkpoint", str(tmp / "no_ckpt"), "--run",
                                                   str(f["run"]), "--corpus", str(f["corpus"]), "--queries",
                                                   str(f["topics"]), "--output", str(out / "a.trec")),
             ("no_ckpt",), (str(out),)),
        Case("rerank_missing_required", python_m("eval.rerank_run", "--run", str(f["run"])), ("--checkpoint",)),
        # eval.trec
        Case("trec_missing_qrels", python_m("eval.trec", "--qrels", str(tmp / "q.txt"), "--run", str(f["run"])),
             ("q.txt",)),
        Case("trec_query_not_in_qrels", trec("--run", str(f["stranger"])), ("999999", "the qrels")),
        Case("trec_malformed_run", trec("--run", str(f["bad_run"])), (f"{f['bad_run']}:2:",)),
        Case("trec_bad_measure", trec("--run", str(f["run"]), "--measures", "nDCG@ten"), ("nDCG@ten",)),
        Case("trec_per_query_under_a_file", trec("--run", str(f["run"]), "--per_query", f"{f['afile']}/pq.json"),
             ("--per_query", "not a directory")),
        Case("trec_no_run", trec(), ("--run", "--rank_llm_jsonl")),
        # twolar-eval
        Case("eval_missing_gin_file", python_m("eval.run", "--gin_file=eval/trec_dl21.gin"), ("trec_dl21.gin",)),
        Case("eval_output_under_a_file", ev("--gin.evaluate.mode='bm25'", f"--gin.evaluate.output_dir='{f['afile']}/e'"),
             ("evaluate.output_dir", "not a directory")),
        Case("eval_unknown_mode", ev("--gin.evaluate.mode='bm26'", f"--gin.evaluate.output_dir='{out}'"),
             ("evaluate.mode", "bm26"), (str(out),)),
        Case("eval_zero_top_k", ev("--gin.evaluate.mode='bm25'", "--gin.evaluate.top_k=0",
                                   f"--gin.evaluate.output_dir='{out}'"), ("evaluate.top_k",), (str(out),)),
        Case("eval_rerank_without_checkpoint", ev(f"--gin.evaluate.output_dir='{out}'"), ("RerankerConfig.checkpoint",),
             (str(out),)),
        Case("eval_missing_data_dir", ev("--gin.evaluate.mode='bm25'", f"--gin.evaluate.output_dir='{out}'",
                                         f"--gin.evaluate.data_dir='{tmp / 'no_data'}'"),
             ("evaluate.data_dir", "no_data"), (str(out),)),
        Case("eval_unknown_flag", ev("--outptu_dir=x"), ("--outptu_dir",)),
        # eval.reference
        Case("reference_unknown_dataset", ref("--datasets", "beir/nope"), ("--datasets", "beir/nope")),
        Case("reference_missing_data_dir", ref("--data_dir", str(tmp / "no_data")), ("--data_dir", "not found")),
        Case("reference_cache_under_a_file", ref("--cache_dir", f"{f['afile']}/c"), ("--cache_dir", "not a directory")),
        Case("reference_bad_log_level", ref("--log_level", "LOUD"), ("--log_level", "LOUD")),
        Case("reference_unknown_flag", ref("--dataset", "x"), ("--dataset",)),
    ]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    tmp = tmp_path_factory.mktemp("one_line_eval")
    config = preset("tiny")
    ckpt = str(save_hf_checkpoint(tmp / "ckpt", config, init_params(config, 4)))
    cases = {c.name: c for c in _cases(tmp, ckpt)}
    return cases, run_all(list(cases.values()), cwd=str(tmp))


@pytest.mark.parametrize("name", case_names(_cases, "ckpt"))
def test_one_line_eval_rerank_trec_reference(name, outcomes):
    cases, results = outcomes
    assert_one_line(cases[name], results[name])


def test_one_line_eval_table_covers_each_command_five_times():
    names = case_names(_cases, "ckpt")
    for prefix in ("rerank_", "trec_", "eval_", "reference_"):
        assert sum(n.startswith(prefix) for n in names) >= 5, prefix
