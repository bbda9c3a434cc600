"""Numbers users can trust: trec_eval's tie rule through the whole job, resume keyed on what was scored, and
results that say how many queries and how deep."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from eval import trec
from eval.run import FirstStage, RerankerConfig, evaluate
from retrieval import readers, runs
from twolar_jax.hf_conversion import save_hf_checkpoint
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker
from tests.eval_helpers import dl19_slice
from tests.trec_eval_reference import pytrec_eval_per_query

CONFIG = preset("tiny")
MEASURES = ["nDCG@10", "nDCG@3", "RR@10", "R@5", "P@3", "AP"]


def _tied_beir(root, n_queries=12, n_docs=16, seed=0):
    """A BEIR dir whose judged queries each have graded labels, and a first-stage run full of tied scores."""
    rng = np.random.default_rng(seed)
    d = root / "beir" / "ties"
    (d / "qrels").mkdir(parents=True)
    docs = [{"_id": f"d{i:02d}", "title": "", "text": f"doc {i} " + "w" * int(rng.integers(1, 4))} for i in range(n_docs)]
    (d / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": f"doc {i} w ww"}) + "\n"
                                             for i in range(n_queries)))
    qrels = {f"q{i}": {f"d{j:02d}": int(rng.integers(0, 3)) for j in rng.permutation(n_docs)[:6]} for i in range(n_queries)}
    (d / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{doc}\t{r}\n" for q, judged in qrels.items() for doc, r in judged.items()))
    first = {q: {f"d{j:02d}": float(rng.integers(0, 3)) for j in rng.permutation(n_docs)[:10]} for q in qrels}
    run_path = runs.write_trec_run(root / "first.trec", first, tag="bm25")
    return qrels, first, run_path


class TiedScorer:
    """Only three distinct scores (the number of w's in the text): ties everywhere."""

    def score_pairs(self, queries, docs):
        return np.array([d.count("w") for d in docs], np.float32)


def test_tied_runs_give_trec_eval_numbers_through_the_job_and_eval_trec(tmp_path, capsys):
    qrels, first, run_path = _tied_beir(tmp_path / "data")
    kw = dict(datasets=["beir/ties"], data_dir=str(tmp_path / "data"),
              first_stage=FirstStage(depth=10, runs={"beir/ties": str(run_path)}), measures=MEASURES, top_k=8)
    for mode, out in (("bm25", tmp_path / "bm25"), ("rerank", tmp_path / "rr")):
        res = evaluate(output_dir=str(out), mode=mode, reranker=TiedScorer() if mode == "rerank" else None, **kw)
        run = readers.read_run(out / "beir_ties" / "run.trec")  # the raw scores, ties and all
        if mode == "bm25":
            assert run == first  # the retriever's own scores
        theirs = pytrec_eval_per_query(qrels, run, MEASURES)
        ours = json.loads((out / "beir_ties" / "metrics.json").read_text())["per_query"]
        for q in qrels:
            for m in MEASURES:
                assert ours[q][m] == pytest.approx(theirs[q][m], abs=1e-12), (mode, q, m)
        for m in MEASURES:
            assert res["beir/ties"][m] == pytest.approx(np.mean([theirs[q][m] for q in qrels]), abs=1e-12)
        qrels_path = tmp_path / "qrels.txt"
        qrels_path.write_text("".join(f"{q} 0 {d} {r}\n" for q, j in qrels.items() for d, r in j.items()))
        capsys.readouterr()
        assert trec.main(["--qrels", str(qrels_path), "--run", str(out / "beir_ties" / "run.trec"),
                          "--measures", *MEASURES]) == 0
        assert json.loads(capsys.readouterr().out) == pytest.approx(res["beir/ties"], abs=1e-12)
        # The written file lists hits in trec_eval's order: ties by docid descending.
        lines = (out / "beir_ties" / "run.trec").read_text().splitlines()
        for q in qrels:
            assert [line.split()[2] for line in lines if line.split()[0] == q] == \
                [d for d, _ in runs.sort_hits(run[q].items())]


def _scores_of(run_path, cands, k):
    run = readers.read_run(run_path)
    return np.array([[run[str(c["hits"][0]["qid"])][h["docid"]] for h in c["hits"][:k]] for c in cands], np.float32)


def _assert_scores(run_path, cands, params, k):
    """The run's scores are the model's (to float32 rounding: a separate call batches pairs differently)."""
    reranker = Reranker.from_params(CONFIG, params, batch_size=8, max_length=96)
    want = np.stack([reranker.score_pairs([c["query"]] * k, [h["content"] for h in c["hits"][:k]]) for c in cands])
    np.testing.assert_allclose(_scores_of(run_path, cands, k), want, atol=1e-6, rtol=0)


def _dl19_job(tmp_path, checkpoint, *, top_k):
    """evaluate()'s keywords for the DL19 slice under tmp_path, and the run file it writes."""
    kw = dict(output_dir=str(tmp_path / "out"), datasets=["trec_dl/dl19"], data_dir=str(tmp_path / "data"),
              reranker=RerankerConfig(checkpoint=str(checkpoint), batch_size=8, max_length=96), top_k=top_k)
    return kw, tmp_path / "out" / "trec_dl_dl19" / "run.trec"


def test_new_weights_at_the_same_path_are_scored_afresh(data_dir, tmp_path, caplog):
    cands = dl19_slice(data_dir, tmp_path / "data")
    path = tmp_path / "model"
    kw, run_path = _dl19_job(tmp_path, path, top_k=4)
    params_a, params_b = init_params(CONFIG, 1), init_params(CONFIG, 2)
    save_hf_checkpoint(path, CONFIG, params_a)
    evaluate(**kw)
    _assert_scores(run_path, cands, params_a, 4)
    save_hf_checkpoint(path, CONFIG, params_b)
    with caplog.at_level("WARNING", logger="eval"):
        evaluate(**kw)
    _assert_scores(run_path, cands, params_b, 4)
    assert [r.getMessage().split(": ", 1)[1] for r in caplog.records if "not resuming" in r.getMessage()] == \
        ["not resuming, scoring afresh: checkpoint.files changed"]


def _save_model_dir(model_dir, params, step):
    from twolar_jax import checkpointing, optimizers
    from twolar_jax.train_state import TrainState

    opt, _ = optimizers.make_optimizer(learning_rate=1e-3)
    manager = checkpointing.make_manager(model_dir, async_save=False, max_to_keep=None)
    state = TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt.init(params))
    checkpointing.save(manager, state, force=True)
    manager.wait_until_finished()
    manager.close()
    checkpointing.write_model_config(model_dir, CONFIG)


def test_training_model_dir_is_keyed_by_the_step_loaded(data_dir, tmp_path, caplog):
    from eval.score_log import checkpoint_identity

    cands = dl19_slice(data_dir, tmp_path / "data")
    model_dir = tmp_path / "model_dir"
    kw, run_path = _dl19_job(tmp_path, model_dir, top_k=3)
    params_a, params_b = init_params(CONFIG, 1), init_params(CONFIG, 2)
    _save_model_dir(model_dir, params_a, 5)
    evaluate(**kw)
    assert json.loads((tmp_path / "out" / "trec_dl_dl19" / "scores.meta.json").read_text())["checkpoint"]["step"] == 5
    _save_model_dir(model_dir, params_b, 10)  # training went on: the latest step is loaded and scored afresh
    assert checkpoint_identity(str(model_dir))["step"] == 10
    with caplog.at_level("WARNING", logger="eval"):
        evaluate(**kw)
    _assert_scores(run_path, cands, params_b, 3)
    assert any("checkpoint.files, checkpoint.step changed" in r.getMessage() for r in caplog.records)


def test_results_say_how_many_queries_and_how_deep(data_dir, tmp_path):
    class Zero:
        def score_pairs(self, queries, docs):
            return np.zeros(len(docs), np.float32)

    res = evaluate(output_dir=str(tmp_path), datasets=["trec_dl/dl19"], data_dir=str(data_dir), reranker=Zero(),
                   top_k=20, max_queries=5)
    assert list(res["trec_dl/dl19"]) == ["nDCG@10", "nDCG@1", "nDCG@5", "RR@10", "R@20"]
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[0] == "| dataset | nDCG@10 | nDCG@1 | nDCG@5 | RR@10 | R@20 | queries |"
    assert table[2].endswith(" | 5 of 43 |")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["queries"] == {"trec_dl/dl19": {"queries": "5 of 43", "num_queries": 5, "total_queries": 43}}
    assert (results["depth"], results["measures"][-1]) == (20, "R@20")
    metrics = json.loads((tmp_path / "trec_dl_dl19" / "metrics.json").read_text())
    assert (metrics["queries"], metrics["reranked_depth"], metrics["first_stage_depth"]) == ("5 of 43", 20, 20)
    assert "R@20" in metrics["mean"] and len(metrics["per_query"]) == 5
    # first_stage.trec holds the retriever's own scores (the candidate JSON's BM25 scores), 20 deep.
    first = readers.read_run(tmp_path / "trec_dl_dl19" / "first_stage.trec")
    requests = readers.read_candidates_json(data_dir / "trec_dl" / "dl19_bm25_top100.json")
    for r in requests:
        if r.qid in first:
            assert first[r.qid] == {c.docid: c.score for c in r.candidates[:20]}
    assert len(first) == 5
    # The whole set: no "of".
    evaluate(output_dir=str(tmp_path / "all"), datasets=["trec_dl/dl19"], data_dir=str(data_dir), mode="bm25")
    assert (tmp_path / "all" / "results.md").read_text().splitlines()[2].endswith(" | 43 |")


def test_demo_table_names_the_depth_reranked():
    from twolar_jax.demo import SYSTEMS, results_markdown

    metrics = {s: {"nDCG@10": 0.5, "nDCG@1": 0.4, "RR@10": 0.6, "R@20": 0.7} for s in SYSTEMS}
    table = results_markdown(metrics, 40, 20, 300)
    assert table.splitlines()[0] == "| system | nDCG@10 | nDCG@1 | RR@10 | R@20 |"
    assert "R@100" not in table and "nan" not in table
    assert "40 of 300 held-out queries" in table and "top 20" in table


@pytest.mark.bm25
def test_beir_first_stage_file_holds_bm25_scores(tmp_path):
    """BEIR's first_stage.trec is pyserini BM25's own run (scores included), whatever reranks it."""
    from retrieval.bm25 import bm25_run

    _tied_beir(tmp_path / "data")
    cache = tmp_path / "cache"
    evaluate(output_dir=str(tmp_path / "out"), datasets=["beir/ties"], data_dir=str(tmp_path / "data"),
             reranker=TiedScorer(), top_k=5, first_stage=FirstStage(depth=8, cache_dir=str(cache)))
    ds = readers.load_beir(tmp_path / "data" / "beir" / "ties")
    want = bm25_run(ds.corpus, ds.queries, k=8, cache_dir=cache)
    assert readers.read_run(tmp_path / "out" / "beir_ties" / "first_stage.trec") == \
        {q: dict(runs.sort_hits(d.items())[:8]) for q, d in want.items() if d}
    assert min(len(d) for d in want.values()) == 8
    assert max(len(d) for d in readers.read_run(tmp_path / "out" / "beir_ties" / "run.trec").values()) == 5


def test_results_table_counts_and_beir_average():
    from eval.metrics import results_table, to_markdown

    results = {"trec_dl/dl19": {"R@5": 0.5}, "beir/a": {"R@5": 0.25}, "beir/b": {"R@5": 0.75}}
    counts = {"trec_dl/dl19": (5, 43), "beir/a": (10, 10), "beir/b": (3, 300)}
    rows = results_table(results, ["R@5"], beir_datasets=["beir/a", "beir/b"], counts=counts)
    assert [r["queries"] for r in rows] == ["5 of 43", "10", "3 of 300", "13 of 310"]
    assert to_markdown(rows, ["R@5"]).splitlines()[-1] == "| BEIR average (2) | 0.5000 | 13 of 310 |"
