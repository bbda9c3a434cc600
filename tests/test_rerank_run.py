"""python -m eval.rerank_run / `twolar rerank`: any run format in, TREC or rank_llm out, resumable, metrics as
eval.trec prints them, one-line errors; on the shipped DL19 and SciFact data with a tiny random checkpoint."""
import json

import numpy as np
import pytest

from eval import rerank_run, trec
from eval.metrics import default_measures
from retrieval import readers
from retrieval.corpus import read_corpus
from retrieval.runs import sort_hits
from twolar_jax import cli
from twolar_jax.hf_conversion import save_hf_checkpoint
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker

CONFIG = preset("tiny")
OPTS = ["--batch_size", "16", "--max_length", "96", "--log_level", "WARNING"]
ATOL = 1e-6  # a separate Reranker call batches the pairs differently: equal to float32 rounding


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_hf_checkpoint(tmp_path_factory.mktemp("rr_ckpt") / "hf", CONFIG, init_params(CONFIG, 4))


@pytest.fixture(scope="module")
def reference(ckpt):
    return Reranker.from_pretrained(ckpt, batch_size=16, max_length=96)


@pytest.fixture(scope="module")
def dl19(data_dir, tmp_path_factory):
    """The shipped DL19 candidates, 6 queries: as candidate JSON, and as TREC run + TSV corpus + TSV topics."""
    tmp = tmp_path_factory.mktemp("dl19")
    entries = json.loads((data_dir / "trec_dl" / "dl19_bm25_top100.json").read_text())[:6]
    (tmp / "cands.json").write_text(json.dumps(entries))
    keep = {str(e["hits"][0]["qid"]) for e in entries}
    run_lines = (data_dir / "trec_dl" / "run.bm25.dl19.top100.trec").read_text().splitlines()
    (tmp / "bm25.trec").write_text("".join(line + "\n" for line in run_lines if line.split()[0] in keep))
    docs = {h["docid"]: h["content"] for e in entries for h in e["hits"]}
    (tmp / "collection.tsv").write_text("".join(f"{d}\t{t}\n" for d, t in docs.items()))
    (tmp / "topics.tsv").write_text("".join(f"{e['hits'][0]['qid']}\t{e['query']}\n" for e in entries))
    return tmp, entries


def _eval_trec_json(capsys, *args):
    capsys.readouterr()
    assert trec.main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_rerank_run_dl19_candidate_json_with_qrels(ckpt, reference, dl19, data_dir, tmp_path, capsys):
    folder, entries = dl19
    qrels = str(data_dir / "trec_dl" / "qrels.dl19-passage.txt")
    out = tmp_path / "run.trec"
    assert rerank_run.main(["--checkpoint", str(ckpt), "--run", str(folder / "cands.json"), "--output", str(out),
                            "--top_k", "4", "--qrels", qrels, *OPTS]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(default_measures(4))  # recall named by the depth reranked: R@4
    assert printed == _eval_trec_json(capsys, "--qrels", qrels, "--run", str(out), "--measures", *default_measures(4))
    run = readers.read_run(out)
    for e in entries:
        hits = e["hits"][:4]
        want = reference.score_pairs([e["query"]] * 4, [h["content"] for h in hits])
        got = np.array([run[str(hits[0]["qid"])][h["docid"]] for h in hits], np.float32)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    # The same candidates as a TREC run with TSV corpus and topics give the same run (queries come in
    # another order, so other batches: equal to float32 rounding).
    out2 = tmp_path / "from_trec.trec"
    assert rerank_run.main(["--checkpoint", str(ckpt), "--run", str(folder / "bm25.trec"), "--corpus",
                            str(folder / "collection.tsv"), "--queries", str(folder / "topics.tsv"), "--output",
                            str(out2), "--top_k", "4", *OPTS]) == 0
    run2 = readers.read_run(out2)
    assert run2.keys() == run.keys()
    for q in run:
        assert run2[q].keys() == run[q].keys()
        np.testing.assert_allclose([run2[q][d] for d in run[q]], list(run[q].values()), atol=ATOL, rtol=0)


def test_rerank_run_scifact_trec_run_to_rank_llm(ckpt, reference, data_dir, tmp_path, capsys):
    """BEIR corpus.jsonl + queries.jsonl + a TREC run with tied first-stage scores -> rank_llm JSONL."""
    beir = data_dir / "beir" / "scifact"
    qrels = readers.read_qrels(beir / "qrels" / "test.tsv")
    corpus = read_corpus(beir / "corpus.jsonl")
    queries = readers.read_queries(beir / "queries.jsonl")
    others = list(corpus)[:3]
    lines = []
    for qid in sorted(qrels)[:4]:
        docs = list(qrels[qid])[:2] + [d for d in others if d not in qrels[qid]][:2]
        lines += [f"{qid} Q0 {d} {i + 1} {1.0 if i else 2.0} bm25\n" for i, d in enumerate(docs)]
    (tmp_path / "first.trec").write_text("".join(lines))
    out = tmp_path / "reranked.jsonl"
    assert rerank_run.main(["--checkpoint", str(ckpt), "--run", str(tmp_path / "first.trec"), "--corpus",
                            str(beir / "corpus.jsonl"), "--queries", str(beir / "queries.jsonl"), "--output", str(out),
                            "--qrels", str(beir / "qrels" / "test.tsv"), "--output_format", "rank_llm",
                            "--top_k", "3", *OPTS]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == _eval_trec_json(capsys, "--qrels", str(beir / "qrels" / "test.tsv"), "--rank_llm_jsonl",
                                      str(out), "--measures", *default_measures(3))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["query"]["qid"] for r in rows] == sorted(qrels)[:4]
    first = readers.read_run(tmp_path / "first.trec")
    for row in rows:
        qid = row["query"]["qid"]
        assert row["query"]["text"] == queries[qid] and list(row["query"]) == ["text", "qid"]
        top3 = [d for d, _ in sort_hits(first[qid].items())[:3]]  # trec_eval order: the tie by docid descending
        want = reference.score_pairs([queries[qid]] * 3, [corpus.contents(d) for d in top3])
        scores = {c["docid"]: c["score"] for c in row["candidates"]}
        assert set(scores) == set(top3)
        np.testing.assert_allclose(np.array([scores[d] for d in top3], np.float32), want, atol=ATOL, rtol=0)
        assert [c["docid"] for c in row["candidates"]] == [d for d, _ in sort_hits(scores.items())]
        assert all(c["doc"]["contents"] == corpus.contents(c["docid"]) for c in row["candidates"])
    assert {r.qid for r in readers.read_rank_llm_jsonl(out)} == set(sorted(qrels)[:4])


class Counting:
    """Wraps a scorer and counts the pairs it is asked for."""

    def __init__(self, inner):
        self.inner, self.pairs = inner, 0

    def score_pairs(self, queries, docs):
        self.pairs += len(docs)
        return self.inner.score_pairs(queries, docs)


def test_rerank_run_resumes_and_rescores_new_weights(dl19, tmp_path, monkeypatch, capsys):
    import eval.run

    folder, _ = dl19
    path = save_hf_checkpoint(tmp_path / "model", CONFIG, init_params(CONFIG, 1))
    made = []
    real_loader = eval.run.load_reranker

    def counting_loader(checkpoint, **kw):
        made.append(Counting(real_loader(checkpoint, **kw)))
        return made[-1]

    monkeypatch.setattr(eval.run, "load_reranker", counting_loader)
    out = tmp_path / "run.trec"
    args = ["--checkpoint", str(path), "--run", str(folder / "cands.json"), "--output", str(out), "--top_k", "3", *OPTS]
    assert rerank_run.main(args) == 0
    assert made[-1].pairs == 18
    first = out.read_text()
    log_path = tmp_path / "run.trec.scores.jsonl"
    assert len(log_path.read_text().splitlines()) == 6
    assert rerank_run.main(args) == 0 and made[-1].pairs == 0 and out.read_text() == first  # all from the log
    log_path.write_text("".join(log_path.read_text().splitlines(keepends=True)[:2]))  # an interrupted job
    assert rerank_run.main(args) == 0 and made[-1].pairs == 12  # the 12 rescored pairs batch differently:
    (tmp_path / "first.trec").write_text(first)                 # the same run to float32 rounding
    resumed, fresh = readers.read_run(out), readers.read_run(tmp_path / "first.trec")
    assert {q: sorted(d) for q, d in resumed.items()} == {q: sorted(d) for q, d in fresh.items()}
    for qid, docs in fresh.items():
        np.testing.assert_allclose([resumed[qid][d] for d in docs], list(docs.values()), atol=ATOL, rtol=0)
    # New weights at the same path: the log is not reused, and the numbers are the new model's.
    save_hf_checkpoint(path, CONFIG, init_params(CONFIG, 2))
    capsys.readouterr()
    assert rerank_run.main(args) == 0 and made[-1].pairs == 18
    assert "not resuming, scoring afresh: checkpoint.files changed" in capsys.readouterr().err
    assert out.read_text() != first
    new = Reranker.from_pretrained(path, batch_size=16, max_length=96)
    run = readers.read_run(out)
    entries = json.loads((folder / "cands.json").read_text())
    e = entries[0]
    want = new.score_pairs([e["query"]] * 3, [h["content"] for h in e["hits"][:3]])
    np.testing.assert_allclose(np.array([run[str(e["hits"][0]["qid"])][h["docid"]] for h in e["hits"][:3]],
                                        np.float32), want, atol=ATOL, rtol=0)
    meta = json.loads((tmp_path / "run.trec.scores.meta.json").read_text())
    assert set(meta) == {"checkpoint", "score_head", "dtype", "max_length", "truncation", "candidates"}
    # Another depth means other candidates: a fresh log too.
    assert rerank_run.main(args[:-len(OPTS)][:-2] + ["--top_k", "2", *OPTS]) == 0 and made[-1].pairs == 12
    assert "not resuming, scoring afresh: candidates changed" in capsys.readouterr().err


def test_rerank_run_errors_are_one_line_with_exit_code_2(ckpt, dl19, data_dir, tmp_path, capsys):
    folder, _ = dl19
    base = ["--checkpoint", str(ckpt), "--output", str(tmp_path / "o.trec"), *OPTS]
    bad_corpus = tmp_path / "corpus.jsonl"
    bad_corpus.write_text('{"_id": "a", "text": "x"}\n{"_id": "b", "text": 3}\n')
    cases = [
        (["--run", str(folder / "bm25.trec"), "--corpus", str(bad_corpus), "--queries", str(folder / "topics.tsv")],
         f"{bad_corpus}:2: text: expected a string, got int"),
        (["--run", str(folder / "bm25.trec")], "is a TREC run: give --corpus and --queries"),
        (["--run", str(folder / "bm25.trec"), "--corpus", str(folder / "collection.tsv"), "--queries",
          str(data_dir / "trec_dl" / "topics.dl20.tsv")], f"{folder / 'bm25.trec'}:1: qid: unknown query"),
        (["--run", str(tmp_path / "missing.trec")], "missing.trec: not found (--run)"),
        (["--run", str(folder / "cands.json"), "--checkpoint", str(tmp_path / "nope")],
         f"{tmp_path / 'nope'}: no such checkpoint directory"),
        (["--run", str(folder / "cands.json"), "--qrels", str(data_dir / "trec_dl" / "qrels.dl20-passage.txt")],
         "are not in"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert rerank_run.main(base + extra) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("python -m eval.rerank_run: error: ")]
        assert len(lines) == 1 and message in lines[0], (message, err)
    assert not (tmp_path / "o.trec").exists()


def test_rerank_run_through_twolar_cli(ckpt, dl19, tmp_path, capsys):
    folder, _ = dl19
    out = tmp_path / "cli.trec"
    assert cli.main(["rerank", "--checkpoint", str(ckpt), "--run", str(folder / "cands.json"), "--output", str(out),
                     "--top_k", "2", *OPTS]) == 0
    assert len(out.read_text().splitlines()) == 12
    assert "rerank" in cli.COMMANDS
