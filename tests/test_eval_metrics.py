"""eval.metrics / retrieval.runs / eval.trec: exact hand-computed values, -c semantics, trec_eval ties, run files."""
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from eval import metrics, trec
from retrieval import readers, runs
from tests.trec_eval_reference import pytrec_eval_per_query

# q1: graded; q2: perfect; q3: judged but absent from the run (counts 0 under -c); q4: a tie.
QRELS = {"q1": {"a": 2, "b": 1, "c": 0}, "q2": {"d": 1}, "q3": {"e": 1}, "q4": {"x": 0, "y": 1}}
RUN = {"q1": {"c": 3.0, "a": 2.0, "b": 1.0}, "q2": {"d": 1.0}, "q4": {"x": 1.0, "y": 1.0}, "q9": {"z": 1.0}}


def _hand() -> dict:
    lg = math.log2
    q1_ndcg10 = (0 + 2 / lg(3) + 1 / lg(4)) / (2 + 1 / lg(3))
    q1_ndcg5 = q1_ndcg10
    # q4 with trec_eval's tie-break (docid descending): y (rel 1) then x (rel 0).
    q4_ndcg = 1.0
    n = 4  # all judged queries count; q9 is unjudged and ignored
    return {
        "nDCG@10": (q1_ndcg10 + 1 + 0 + q4_ndcg) / n,
        "nDCG@5": (q1_ndcg5 + 1 + 0 + q4_ndcg) / n,
        "nDCG@1": (0 + 1 + 0 + 1) / n,
        "RR@10": (1 / 2 + 1 + 0 + 1) / n,
        "R@100": (1 + 1 + 0 + 1) / n,
    }


def test_hand_computed_with_missing_query():
    mean, per_query = metrics.evaluate_run(QRELS, RUN)
    hand = _hand()
    for name, value in hand.items():
        assert mean[name] == pytest.approx(value, abs=1e-12), name
    assert set(per_query) == set(QRELS)
    assert per_query["q3"] == {m: 0.0 for m in metrics.DEFAULT_MEASURES}
    assert per_query["q2"]["nDCG@10"] == 1.0


def test_trec_eval_ties_match_pytrec_eval_on_a_tied_run():
    """Every measure, ties included, equals what trec_eval's own code computes (pytrec_eval provider)."""
    rng = np.random.default_rng(0)
    qrels = {f"q{i}": {f"d{j}": int(rng.integers(0, 3)) for j in range(12)} for i in range(20)}
    run = {q: {f"d{j}": float(rng.integers(0, 3)) for j in rng.permutation(15)[:10]} for q in qrels}  # many ties
    ours_mean, ours = metrics.evaluate_run(qrels, run)
    theirs = pytrec_eval_per_query(qrels, run, metrics.DEFAULT_MEASURES)
    for q in qrels:
        for m in metrics.DEFAULT_MEASURES:
            assert ours[q][m] == pytest.approx(theirs[q][m], abs=1e-12), (q, m)
    # ... and the docid-ascending rule really gives other numbers on this run.
    other, _ = metrics.evaluate_run(qrels, run, ties="docid_ascending")
    assert other["nDCG@10"] != pytest.approx(ours_mean["nDCG@10"], abs=1e-6)


def test_tie_break_modes():
    _, pq = metrics.evaluate_run(QRELS, RUN, ["RR@10", "nDCG@10"])
    assert pq["q4"]["RR@10"] == 1.0  # trec_eval: y before x (docid descending)
    assert pq["q4"]["nDCG@10"] == 1.0
    _, pq = metrics.evaluate_run(QRELS, RUN, ["RR@10", "nDCG@10"], ties="docid_ascending")
    assert pq["q4"]["RR@10"] == 0.5  # x before y
    assert pq["q4"]["nDCG@10"] == pytest.approx(1 / math.log2(3))
    with pytest.raises(ValueError, match="ties='raw'"):
        metrics.evaluate_run(QRELS, RUN, ties="raw")
    with pytest.raises(ValueError, match="unknown measure 'nDCG@x'"):
        metrics.evaluate_run(QRELS, RUN, ["nDCG@x"])


def test_ranked_and_run_file_round_trip(tmp_path):
    run = {"q1": {"b": 0.5, "a": 0.5, "c": 0.75}, "q0": {"z": np.float32(1 / 3)}, "q2": {"h": 1e308, "g": 1e307}}
    assert runs.sort_hits(run["q1"].items()) == [("c", 0.75), ("b", 0.5), ("a", 0.5)]  # trec_eval: docid desc
    path = runs.write_trec_run(tmp_path / "r.trec", run, tag="mine")
    lines = path.read_text().splitlines()
    assert lines == ["q0 Q0 z 1 0.3333333432674408 mine", "q1 Q0 c 1 0.75 mine", "q1 Q0 b 2 0.5 mine",
                     "q1 Q0 a 3 0.5 mine", "q2 Q0 h 1 1e+308 mine", "q2 Q0 g 2 1e+307 mine"]
    back = readers.read_run(path)
    assert back["q0"]["z"] == float(np.float32(1 / 3))  # exact: float64 text round trip
    assert back["q2"] == {"h": 1e308, "g": 1e307}  # float64 kept: no inf, no invented tie
    assert runs.rank_scores(back) == runs.rank_scores(run)
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="one non-empty word"):
        runs.write_trec_run(tmp_path / "x.trec", run, tag="two words")


def test_tables():
    results = {"trec_dl/dl19": {"nDCG@10": 0.5}, "beir/a": {"nDCG@10": 0.25}, "beir/b": {"nDCG@10": 0.75}}
    rows = metrics.results_table(results, ["nDCG@10"], beir_datasets=["beir/a", "beir/b"])
    assert rows[-1] == {"dataset": "BEIR average (2)", "nDCG@10": 0.5}
    md = metrics.to_markdown(rows, ["nDCG@10"])
    assert md.splitlines()[2] == "| trec_dl/dl19 | 0.5000 |"
    assert md.splitlines()[-1] == "| BEIR average (2) | 0.5000 |"


def _write_toy(tmp_path):
    qrels_path = tmp_path / "qrels.txt"
    qrels_path.write_text("".join(f"{q} 0 {d} {r}\n" for q, docs in QRELS.items() for d, r in docs.items()))
    run = {q: v for q, v in RUN.items() if q != "q9"}
    run_path = runs.write_trec_run(tmp_path / "run.trec", run)
    return qrels_path, run_path


def test_trec_cli(tmp_path, capsys):
    qrels_path, run_path = _write_toy(tmp_path)
    assert trec.main(["--qrels", str(qrels_path), "--run", str(run_path), "--per_query", str(tmp_path / "pq.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out) == list(metrics.DEFAULT_MEASURES)
    for k, v in _hand().items():
        assert out[k] == pytest.approx(v, abs=1e-12)
    assert json.loads((tmp_path / "pq.json").read_text())["q3"]["nDCG@10"] == 0.0
    # A run naming a query the qrels do not know is an error naming file and line...
    bad = tmp_path / "bad.trec"
    bad.write_text(run_path.read_text() + "q9 Q0 z 1 1.0 t\n")
    assert trec.main(["--qrels", str(qrels_path), "--run", str(bad)]) == 2
    n = len(bad.read_text().splitlines())
    assert f"{bad}:{n}: qid: unknown query 'q9'" in capsys.readouterr().err
    # ...unless asked to ignore it.
    assert trec.main(["--qrels", str(qrels_path), "--run", str(bad), "--allow_unjudged", "--measures", "nDCG@10"]) == 0
    assert json.loads(capsys.readouterr().out)["nDCG@10"] == pytest.approx(_hand()["nDCG@10"])


def test_trec_module_entry(data_dir):
    out = subprocess.run([sys.executable, "-m", "eval.trec", "--qrels", str(data_dir / "trec_dl" / "qrels.dl19-passage.txt"),
                          "--run", str(data_dir / "trec_dl" / "run.bm25.dl19.top100.trec"), "--measures", "nDCG@10"],
                         capture_output=True, text=True, check=True).stdout
    assert round(json.loads(out)["nDCG@10"], 4) == 0.5058


@pytest.mark.bm25
def test_matches_java_trec_eval_dash_c(tmp_path):
    """The reference implementation (Anserini's trec_eval, as pyserini runs it) agrees, -c included."""
    from retrieval import lucene

    qrels_path, run_path = _write_toy(tmp_path)
    out = lucene.trec_eval(["-c", "-q", "-m", "ndcg_cut.10", "-m", "recall.100", str(qrels_path), str(run_path)])
    java = {(line.split()[1], line.split()[0]): float(line.split()[2]) for line in out.splitlines() if line.strip()}
    mean, per_query = metrics.evaluate_run(QRELS, {q: v for q, v in RUN.items() if q != "q9"})
    assert java[("all", "ndcg_cut_10")] == pytest.approx(mean["nDCG@10"], abs=1e-4)
    assert java[("all", "recall_100")] == pytest.approx(mean["R@100"], abs=1e-4)
    assert java[("q1", "ndcg_cut_10")] == pytest.approx(per_query["q1"]["nDCG@10"], abs=1e-4)
    # Without -c, trec_eval averages over answered queries only: different, so -c really matters here.
    out = lucene.trec_eval(["-m", "ndcg_cut.10", str(qrels_path), str(run_path)])
    assert float(out.split()[2]) != pytest.approx(mean["nDCG@10"], abs=1e-4)


def test_trec_cli_rank_llm_jsonl(tmp_path, capsys):
    qrels_path, _ = _write_toy(tmp_path)
    path = tmp_path / "rl.jsonl"
    # q1 reranked to a, b, c (ideal); q2 answered; q3 and q4 missing -> 0 under -c.
    rows = [{"query": {"qid": "q1", "text": "t"}, "candidates": [{"docid": d, "score": 0, "doc": {"text": d}}
                                                                  for d in ("a", "b", "c")]},
            {"query": {"qid": "q2", "text": "t"}, "candidates": [{"docid": "d", "score": 0, "doc": {"text": "d"}}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trec.main(["--qrels", str(qrels_path), "--rank_llm_jsonl", str(path), "--measures", "nDCG@10", "RR@10"]) == 0
    assert json.loads(capsys.readouterr().out) == {"nDCG@10": 0.5, "RR@10": 0.5}
    rows[1]["query"]["qid"] = "q7"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert trec.main(["--qrels", str(qrels_path), "--rank_llm_jsonl", str(path)]) == 2
    assert "unknown queries ['q7']" in capsys.readouterr().err
