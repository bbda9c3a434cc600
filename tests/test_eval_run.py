"""The evaluation job end to end: rerank path (fake scorer and a real tiny Reranker), resume, gin entry."""
import dataclasses
import json
import math

import numpy as np
import pytest

from eval import rerank as rerank_mod
from retrieval import readers, runs
from tests.eval_helpers import dl19_slice
from twolar_jax.errors import FormatError
from eval.run import FirstStage, RerankerConfig, console_main, evaluate


def test_import_gives_our_package(repo_root):
    import eval.run

    assert eval.run.__file__.startswith(str(repo_root / "eval"))
    assert callable(__builtins__["eval"] if isinstance(__builtins__, dict) else __builtins__.eval)


class OracleScorer:
    """Scores a pair by its qrels label (+ a small per-doc offset), counting the pairs it sees."""

    def __init__(self, qrels, requests, fail_after_calls=None):
        self.label = {(r.query, c.text): qrels.get(r.qid, {}).get(c.docid, 0) for r in requests for c in r.candidates}
        self.calls = 0
        self.pairs = 0
        self.fail_after_calls = fail_after_calls

    def score_pairs(self, queries, docs):
        if self.fail_after_calls is not None and self.calls >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.pairs += len(docs)
        return np.array([self.label[(q, d)] for q, d in zip(queries, docs)], np.float32)


@pytest.fixture(scope="module")
def dl19(data_dir):
    return (readers.read_candidates_json(data_dir / "trec_dl" / "dl19_bm25_top100.json"),
            readers.read_qrels(data_dir / "trec_dl" / "qrels.dl19-passage.txt"))


def test_rerank_dl19_with_oracle(dl19, data_dir, tmp_path):
    requests, qrels = dl19
    scorer = OracleScorer(qrels, requests)
    res = evaluate(output_dir=str(tmp_path), datasets=["trec_dl/dl19"], data_dir=str(data_dir), reranker=scorer,
                   top_k=100, pairs_per_call=1000)
    assert scorer.pairs == 4300 and scorer.calls == 5  # 10 queries x 100 pairs per call
    run = readers.read_run(tmp_path / "trec_dl_dl19" / "run.trec")
    for r in requests:
        got = [d for d, _ in runs.sort_hits(run[r.qid].items())]
        # Oracle order: label desc, then docid desc (trec_eval's tie rule), over the 100 BM25 candidates.
        want = sorted(sorted((c.docid for c in r.candidates), reverse=True), key=lambda d: -qrels[r.qid].get(d, 0))
        assert got == want
        assert [line.split()[2] for line in (tmp_path / "trec_dl_dl19" / "run.trec").read_text().splitlines()
                if line.startswith(r.qid + " ")] == want  # the file is written in that order too
    # nDCG@10 of the oracle order, computed by hand (gain = label, ideal over all judged docs).
    def dcg(gains):
        return sum(g / math.log2(i + 2) for i, g in enumerate(gains[:10]))

    hand = np.mean([dcg([qrels[r.qid].get(c.docid, 0) for c in sorted(r.candidates, key=lambda c: -qrels[r.qid].get(
        c.docid, 0))]) / dcg(sorted(qrels[r.qid].values(), reverse=True)) for r in requests])
    assert res["trec_dl/dl19"]["nDCG@10"] == pytest.approx(hand, abs=1e-12)
    assert res["trec_dl/dl19"]["nDCG@10"] > 0.5058
    assert res["trec_dl/dl19"]["R@100"] == pytest.approx(0.4531, abs=1e-4)  # reranking top-100 keeps recall
    metrics = json.loads((tmp_path / "trec_dl_dl19" / "metrics.json").read_text())
    assert len(metrics["per_query"]) == 43 and metrics["mode"] == "rerank"
    table = (tmp_path / "results.md").read_text()
    assert table.splitlines()[2].startswith(f"| trec_dl/dl19 | {res['trec_dl/dl19']['nDCG@10']:.4f} |")


def test_rerank_resumes_after_crash(dl19, tmp_path):
    requests, qrels = dl19
    requests = requests[:6]
    scores_path = tmp_path / "scores.jsonl"
    crashing = OracleScorer(qrels, requests, fail_after_calls=2)
    with pytest.raises(KeyboardInterrupt):
        rerank_mod.rerank(crashing, requests, top_k=50, pairs_per_call=100, scores_path=scores_path)
    assert len(scores_path.read_text().splitlines()) == 4  # 2 calls x 2 queries of 50 pairs
    with scores_path.open("a") as f:
        f.write('{"qid": "torn')  # a write cut short by the crash
    resumed = OracleScorer(qrels, requests)
    run = rerank_mod.rerank(resumed, requests, top_k=50, pairs_per_call=100, scores_path=scores_path)
    assert resumed.pairs == 2 * 50  # only the 2 queries not logged yet
    fresh = rerank_mod.rerank(OracleScorer(qrels, requests), requests, top_k=50, pairs_per_call=100)
    assert run == fresh and list(run) == [r.qid for r in requests]
    assert len(scores_path.read_text().splitlines()) == 6


def test_rerank_rejects_bad_scorer_output(dl19):
    requests, _ = dl19

    class Short:
        def score_pairs(self, q, d):
            return np.zeros(len(d) - 1, np.float32)

    with pytest.raises(ValueError, match="returned 99 scores for 100 pairs"):
        rerank_mod.rerank(Short(), requests[:1])


def _toy_beir(root, name, n_docs=30):
    d = root / "beir" / name
    (d / "qrels").mkdir(parents=True)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    docs = [{"_id": f"{name}{i}", "title": words[i % 6], "text": f"{words[(i + 1) % 6]} doc {i}"} for i in range(n_docs)]
    (d / "corpus.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / "queries.jsonl").write_text('{"_id": "1", "text": "alpha beta"}\n{"_id": "2", "text": "gamma"}\n')
    (d / "qrels" / "test.tsv").write_text(f"query-id\tcorpus-id\tscore\n1\t{name}0\t1\n2\t{name}2\t1\n")
    return d


def test_beir_with_run_file_first_stage(tmp_path):
    """An existing run file as first stage (no Java needed); beir/* finds every dataset; BEIR average row."""
    data = tmp_path / "data"
    _toy_beir(data, "aa")
    _toy_beir(data, "bb")
    run_a = runs.write_trec_run(tmp_path / "a.trec", {"1": {"aa5": 2.0, "aa0": 1.0}, "2": {"aa2": 3.0, "aa1": 1.0}})
    run_b = runs.write_trec_run(tmp_path / "b.trec", {"1": {"bb0": 2.0}, "2": {"bb1": 3.0, "bb2": 1.0}})
    res = evaluate(output_dir=str(tmp_path / "out"), datasets=["beir/*"], data_dir=str(data), mode="bm25",
                   first_stage=FirstStage(runs={"beir/aa": str(run_a), "beir/bb": str(run_b)}), measures=["RR@10"])
    assert res == {"beir/aa": {"RR@10": 0.75}, "beir/bb": {"RR@10": 0.75}}
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert rows[-1] == {"dataset": "BEIR average (2)", "RR@10": 0.75}

    class TitleMatch:  # reranks by word overlap, to check texts are title + text
        def score_pairs(self, queries, docs):
            return np.array([len(set(q.split()) & set(d.split())) for q, d in zip(queries, docs)], np.float32)

    res = evaluate(output_dir=str(tmp_path / "out2"), datasets=["beir/aa"], data_dir=str(data), reranker=TitleMatch(),
                   first_stage=FirstStage(runs={"beir/aa": str(run_a)}), measures=["RR@10"])
    per_query = json.loads((tmp_path / "out2" / "beir_aa" / "metrics.json").read_text())["per_query"]
    assert per_query["1"]["RR@10"] == 1.0  # aa0 ("alpha beta ...") now beats aa5 ("zeta alpha ...")
    assert per_query["2"]["RR@10"] == 1.0  # aa1 and aa2 tie on "gamma": trec_eval's docid descending puts aa2 first
    bad = tmp_path / "bad.trec"
    bad.write_text("1 Q0 nope 1 1.0 t\n")
    with pytest.raises(ValueError, match="document 'nope' \\(query '1'\\) is not in the corpus"):
        evaluate(output_dir=str(tmp_path / "out3"), datasets=["beir/aa"], data_dir=str(data),
                 reranker=TitleMatch(), first_stage=FirstStage(runs={"beir/aa": str(bad)}))
    bad.write_text("1 Q0 aa1 1 1.0 t\n3 Q0 aa1 1 1.0 t\n")
    with pytest.raises(FormatError, match=f"{bad}:2: qid: unknown query '3'"):
        evaluate(output_dir=str(tmp_path / "out3"), datasets=["beir/aa"], data_dir=str(data), mode="bm25",
                 first_stage=FirstStage(runs={"beir/aa": str(bad)}))


@pytest.mark.bm25
def test_beir_bm25_first_stage_and_remove_query(tmp_path):
    data = tmp_path / "data"
    d = _toy_beir(data, "cc")
    # A document whose id equals query "2" and matches it best: --remove-query must drop it.
    with (d / "corpus.jsonl").open("a") as f:
        f.write(json.dumps({"_id": "2", "title": "gamma gamma", "text": "gamma"}) + "\n")
    stage = FirstStage(cache_dir=str(tmp_path / "cache"))
    kw = dict(datasets=["beir/cc"], data_dir=str(data), mode="bm25", top_k=10)
    evaluate(output_dir=str(tmp_path / "o1"), first_stage=stage, **kw)
    run = readers.read_run(tmp_path / "o1" / "beir_cc" / "run.trec")
    assert "2" not in run["2"] and len(run["2"]) == 9
    assert len(list((tmp_path / "cache").iterdir())) == 1  # one cached index
    evaluate(output_dir=str(tmp_path / "o2"), first_stage=dataclasses.replace(stage, remove_query=False), **kw)
    assert runs.sort_hits(readers.read_run(tmp_path / "o2" / "beir_cc" / "run.trec")["2"].items())[0][0] == "2"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # reused


def test_gin_entry_bm25_mode(tmp_path, repo_root, capsys):
    out = tmp_path / "gin_out"
    assert console_main(["--gin_file=eval/trec_dl20.gin", "--gin.evaluate.mode='bm25'",
                         f"--gin.evaluate.output_dir='{out}'", "--no_compile_cache"]) == 0
    assert (out / "results.md").read_text().splitlines()[2].startswith("| trec_dl/dl20 | 0.4796 |")
    assert "evaluate.mode = 'bm25'" in (out / "config.gin").read_text()
    import gin

    gin.clear_config()
    # A user error is one line on stderr and exit code 2 (the console entry's contract).
    assert console_main(["--gin_file=eval/trec_dl19.gin", f"--gin.evaluate.output_dir='{out}'",
                         "--no_compile_cache"]) == 2
    assert "needs RerankerConfig.checkpoint" in capsys.readouterr().err
    gin.clear_config()
    from twolar_jax import gin_utils

    for gin_file in ("trec_dl19", "trec_dl20", "beir_scifact", "beir"):
        gin_utils.parse_gin_flags([f"eval/{gin_file}.gin"])
        assert gin.query_parameter("evaluate.top_k") == 100  # from the base file every job includes
        gin.clear_config()


def test_unknown_mode_and_dataset(tmp_path):
    with pytest.raises(ValueError, match="evaluate.mode='dense': expected one of"):
        evaluate(output_dir=str(tmp_path), mode="dense")
    with pytest.raises(ValueError, match="unknown dataset 'msmarco'"):
        evaluate(output_dir=str(tmp_path), datasets=["msmarco"], mode="bm25")


@pytest.mark.slow
def test_real_tiny_reranker_from_hf_dir(tmp_path, data_dir):
    """A random tiny T5 saved as an HF dir, loaded by path through Reranker, on a DL19 slice."""
    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params
    from twolar_jax.reranker import Reranker

    config = preset("tiny")
    params = init_params(config, 3)
    ckpt = save_hf_checkpoint(tmp_path / "hf", config, params)
    data = tmp_path / "data"
    cands = dl19_slice(data_dir, data, n=3, hits=8)
    kw = dict(datasets=["trec_dl/dl19"], data_dir=str(data),
              reranker=RerankerConfig(checkpoint=str(ckpt), batch_size=8, max_length=256), top_k=5)
    res = evaluate(output_dir=str(tmp_path / "a"), **kw)
    evaluate(output_dir=str(tmp_path / "b"), **kw)
    run_a = (tmp_path / "a" / "trec_dl_dl19" / "run.trec").read_text()
    assert run_a == (tmp_path / "b" / "trec_dl_dl19" / "run.trec").read_text()  # deterministic
    assert 0.0 <= res["trec_dl/dl19"]["nDCG@10"] <= 1.0
    # The written scores are the Reranker's fp32 scores for the top-5 BM25 candidates (scored here per query,
    # there in one batch plan with other queries' pairs: the same to fp32 rounding).
    reranker = Reranker.from_params(config, params, batch_size=8, max_length=256)
    run = readers.read_run(tmp_path / "a" / "trec_dl_dl19" / "run.trec")
    for c in cands:
        qid, hits = c["hits"][0]["qid"], c["hits"][:5]
        want = reranker.score_pairs([c["query"]] * 5, [h["content"] for h in hits])
        got = np.array([run[str(qid)][h["docid"]] for h in hits], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_resume_only_for_same_checkpoint_and_settings(dl19, data_dir, tmp_path, monkeypatch):
    import eval.run

    requests, qrels = dl19
    made = []

    def fake_loader(checkpoint, **kw):
        made.append(OracleScorer(qrels, requests))
        return made[-1]

    monkeypatch.setattr(eval.run, "load_reranker", fake_loader)
    kw = dict(output_dir=str(tmp_path), datasets=["trec_dl/dl19"], data_dir=str(data_dir), max_queries=3)
    model = RerankerConfig(checkpoint=str(tmp_path))
    first = evaluate(**kw, reranker=model)
    assert made[-1].pairs == 300
    assert evaluate(**kw, reranker=model) == first and made[-1].pairs == 0  # everything came from scores.jsonl
    evaluate(**kw, reranker=dataclasses.replace(model, score_head="softmax"))
    assert made[-1].pairs == 300  # another score head: the old log is not reused
    assert len(json.loads((tmp_path / "trec_dl_dl19" / "metrics.json").read_text())["per_query"]) == 3


@pytest.mark.slow
def test_sharded_scoring_eval_job_through_a_mesh_gin_file(tmp_path, data_dir):
    """The eval job shards the Reranker with a mesh gin file (fsdp over the 8 simulated devices) and
    writes the same run as the replicated default."""
    import gin

    from twolar_jax import gin_utils
    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    ckpt = save_hf_checkpoint(tmp_path / "hf", preset("tiny"), init_params(preset("tiny"), 5))
    configured = __import__("eval.run", fromlist=["register_configurables"]).register_configurables()
    runs_written = []
    for name, extra in (("replicated", []), ("fsdp", ["mesh/fsdp.gin"])):
        gin.clear_config()
        out = tmp_path / name
        gin_utils.parse_gin_flags(["eval/trec_dl19.gin", *extra], [
            f"RerankerConfig.checkpoint = '{ckpt}'", f"evaluate.output_dir = '{out}'", f"evaluate.data_dir = '{data_dir}'",
            "evaluate.max_queries = 2", "evaluate.top_k = 8", "RerankerConfig.max_length = 128",
            "RerankerConfig.batch_size = 8"])
        assert tuple(gin_utils.query("RerankerConfig.mesh_shape")) == ((-1, 1, 1) if name == "replicated" else (1, -1, 1))
        configured()
        runs_written.append(readers.read_run(out / "trec_dl_dl19" / "run.trec"))
    gin.clear_config()
    for qid, docs in runs_written[0].items():
        assert list(docs) == list(runs_written[1][qid])
        np.testing.assert_allclose(list(docs.values()), list(runs_written[1][qid].values()), rtol=0, atol=1e-5)


def test_eval_run_import_and_gin_setup_load_no_trainer_or_optimizer():
    """`import eval.run` and registering and parsing an eval job's gin files (a mesh file too) leave optax,
    orbax, TensorFlow and the trainer out of the process: an eval job needs none of them."""
    import subprocess
    import sys

    code = ("import sys, eval.run\n"
            "eval.run.register_configurables()\n"
            "from twolar_jax import gin_utils\n"
            "gin_utils.parse_gin_flags(['eval/trec_dl19.gin', 'mesh/fsdp.gin'], [\"evaluate.mode = 'bm25'\"])\n"
            "heavy = ('optax', 'orbax.checkpoint', 'tensorflow', 'twolar_jax.trainer', 'twolar_jax.train_loop',\n"
            "         'twolar_jax.optimizers')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
