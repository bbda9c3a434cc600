"""Listwise students through the eval side: `python -m eval.rerank_run --listwise first|generate --window
--stride` (and `twolar-eval --listwise`, RerankerConfig.listwise in gin) rank with a FiD T5 over sliding windows;
the run's scores strictly decrease with the final rank, equal the ListwiseReranker's order, and resume."""
from __future__ import annotations

import json

import pytest

from eval import rerank_run
from eval.listwise import ListwiseOptions
from retrieval import readers
from tests.eval_helpers import dl19_slice
from twolar_jax.errors import OptionError
from twolar_jax.hf_conversion import save_hf_checkpoint
from twolar_jax.listwise_reranker import ListwiseReranker
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params

CONFIG = preset("tiny")
OPTS = ["--batch_size", "8", "--log_level", "WARNING", "--top_k", "12", "--passage_length", "48"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(tmp_path_factory.mktemp("lw_ckpt") / "hf", CONFIG, init_params(CONFIG, 6))


@pytest.fixture(scope="module")
def cands(data_dir, tmp_path_factory):
    entries = json.loads((data_dir / "trec_dl" / "dl19_bm25_top100.json").read_text())[:3]
    path = tmp_path_factory.mktemp("lw_cands") / "cands.json"
    path.write_text(json.dumps(entries))
    return path, entries


@pytest.mark.parametrize("method", ["first", "generate"])
def test_listwise_eval_rerank_run_ranks_like_the_listwise_reranker(ckpt, cands, tmp_path, method):
    path, entries = cands
    out = tmp_path / "run.trec"
    args = ["--checkpoint", str(ckpt), "--run", str(path), "--output", str(out), "--listwise", method,
            "--window", "6", "--stride", "3", *OPTS]
    assert rerank_run.main(args) == 0
    run = readers.read_run(out)
    reference = ListwiseReranker.from_pretrained(ckpt, method=method, window=6, stride=3, passage_length=48,
                                                 batch_size=8)
    for entry in entries:
        qid = str(entry["hits"][0]["qid"])
        hits = entry["hits"][:12]
        want = reference.rank(entry["query"], [h["content"] for h in hits], [h["docid"] for h in hits])
        got = sorted(run[qid].items(), key=lambda kv: -kv[1])
        assert [d for d, _ in got] == [d.doc_id for d in want]
        scores = [s for _, s in got]
        assert all(a > b for a, b in zip(scores, scores[1:]))  # strictly decreasing with the rank
    log = out.parent / "run.trec.scores.jsonl"
    assert log.exists() and len(log.read_text().splitlines()) == 3
    first = out.read_text()
    assert rerank_run.main(args) == 0 and out.read_text() == first  # resumed from the log: the same run


def test_listwise_eval_rank_llm_output_and_bad_options(ckpt, cands, tmp_path, capsys):
    path, _ = cands
    out = tmp_path / "run.jsonl"
    assert rerank_run.main(["--checkpoint", str(ckpt), "--run", str(path), "--output", str(out), "--listwise",
                            "first", "--window", "100", "--output_format", "rank_llm", *OPTS]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 3 and all(len(obj["candidates"]) == 12 for obj in lines)
    capsys.readouterr()
    assert rerank_run.main(["--checkpoint", str(ckpt), "--run", str(path), "--output", str(tmp_path / "x.trec"),
                            "--listwise", "first", "--window", "5", "--stride", "9", *OPTS]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--window=5, --stride=9" in err
    with pytest.raises(OptionError, match="RerankerConfig.listwise='fist'"):
        ListwiseOptions("fist").check()


def test_listwise_eval_job_flags_bind_the_reranker_config(ckpt, data_dir, tmp_path, capsys):
    """`twolar-eval --listwise first --window 6 --stride 3` on 2 DL19 queries: the flags bind
    RerankerConfig.listwise/window/stride, the run is the ListwiseReranker's order, metrics are written."""
    from eval import run as eval_run

    data = tmp_path / "data"
    cands = dl19_slice(data_dir, data, n=2, hits=8)
    out = tmp_path / "out"
    code = eval_run.console_main([
        "--gin_file=eval/trec_dl19.gin", f"--gin.evaluate.data_dir='{data}'", f"--gin.evaluate.output_dir='{out}'",
        f"--gin.RerankerConfig.checkpoint='{ckpt}'", "--gin.evaluate.top_k=8", "--gin.RerankerConfig.batch_size=8",
        "--listwise", "first", "--window", "6", "--stride", "3", "--passage_length", "48", "--log_level", "WARNING"])
    assert code == 0, capsys.readouterr().err
    assert "RerankerConfig.listwise = 'first'" in (out / "config.gin").read_text()
    run = readers.read_run(out / "trec_dl_dl19" / "run.trec")
    reference = ListwiseReranker.from_pretrained(ckpt, method="first", window=6, stride=3, passage_length=48)
    for c in cands:
        want = reference.rank(c["query"], [h["content"] for h in c["hits"]], [h["docid"] for h in c["hits"]])
        got = sorted(run[str(c["hits"][0]["qid"])].items(), key=lambda kv: -kv[1])
        assert [d for d, _ in got] == [d.doc_id for d in want]
    metrics = json.loads((out / "trec_dl_dl19" / "metrics.json").read_text())
    assert metrics["mode"] == "rerank" and 0.0 <= metrics["mean"]["nDCG@10"] <= 1.0
