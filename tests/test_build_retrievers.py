"""First-stage retrievers and the merge. Neural retrievers run from tiny random checkpoints written here;
each is checked against a brute-force computation of what it should return."""
import json

import numpy as np
import pytest

from retrieval.corpus import Corpus, Document as Passage
from retrieval.bm25 import BM25Retriever
from retrieval.dense import DenseRetriever
from retrieval.fusion import merge_candidates
from retrieval.monot5 import MonoT5Retriever
from retrieval.run_file import RunFileRetriever
from retrieval.splade import SpladeEncoder, SpladeRetriever

WORDS = ("cat dog fish bird tree rock water fire earth wind sun moon star cell gene protein virus drug "
         "heart brain blood bone skin lung").split()


def _corpus(n: int = 24) -> Corpus:
    rng = np.random.default_rng(0)
    return Corpus({f"d{i}": Passage(f"d{i}", "", " ".join(rng.choice(WORDS, size=8))) for i in range(n)})


# ---------------------------------------------------------------------------------------------- merge


def test_merge_even_interleave_dedupes_and_keeps_first_source():
    hits = {"bm25": [("a", 9), ("b", 8), ("c", 7)], "splade": [("b", 5), ("d", 4)], "dragon": [("e", 1), ("a", 0.5)]}
    assert merge_candidates(hits, depth=30) == [("a", "bm25"), ("b", "splade"), ("e", "dragon"), ("c", "bm25"),
                                                 ("d", "splade")]
    assert merge_candidates(hits, depth=3) == [("a", "bm25"), ("b", "splade"), ("e", "dragon")]


def test_merge_quotas_then_fill_when_short():
    hits = {"x": [(f"x{i}", 1.0) for i in range(10)], "y": [("y0", 1.0), ("x0", 0.5)], "z": []}
    # quotas 2/3/3: y has only one new doc, z none -> the quota pass gives 3, the fill pass tops up from x.
    merged = merge_candidates(hits, depth=6, quotas={"x": 2, "y": 3, "z": 3})
    assert merged == [("x0", "x"), ("y0", "y"), ("x1", "x"), ("x2", "x"), ("x3", "x"), ("x4", "x")]
    assert merge_candidates(hits, depth=2, quotas={"y": 2}) == [("y0", "y"), ("x0", "y")]  # y reached x0 first
    with pytest.raises(ValueError, match="unknown retrievers"):
        merge_candidates(hits, quotas={"nope": 1})


def test_merge_skips_docids_missing_from_the_corpus():
    corpus = Corpus({"a": Passage("a", "", "t"), "c": Passage("c", "", "t")})
    assert merge_candidates({"r": [("a", 1), ("ghost", 0.9), ("c", 0.8)]}, valid=corpus) == [("a", "r"), ("c", "r")]


def test_run_file_retriever(tmp_path):
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 d2 1 3.0 t\nq1 Q0 d1 2 5.0 t\nq1 Q0 d3 3 1.0 t\nq2 Q0 d1 1 1 t\n")
    r = RunFileRetriever(path=str(run))
    r.prepare(_corpus(), tmp_path)
    assert r.retrieve({"q1": "x", "q3": "y"}, 2) == {"q1": [("d1", 5.0), ("d2", 3.0)], "q3": []}
    run.write_text("q1 Q0 d2 1 3.0 t\nq1 Q0 d1 2 high t\n")
    with pytest.raises(ValueError, match=r"run\.trec:2: score: 'high' is not a number"):
        RunFileRetriever(path=str(run)).prepare(_corpus(), tmp_path)


# ---------------------------------------------------------------------------------------------- BM25


@pytest.mark.bm25
def test_bm25_retriever_finds_the_matching_passage(tmp_path):
    corpus = Corpus({
        "d0": Passage("d0", "Cats", "Cats purr and sleep a lot."),
        "d1": Passage("d1", "", "Protein folding in cells is studied with cryo electron microscopy."),
        "d2": Passage("d2", "", "Dogs bark at the mail carrier."),
    })
    r = BM25Retriever()
    r.prepare(corpus, tmp_path)
    got = r.retrieve({"q": "protein folding microscopy", "e": "zebra"}, 2)
    assert got["q"][0][0] == "d1" and len(got["q"]) == 1 and got["e"] == []  # fewer than k is legal


# ---------------------------------------------------------------------------------------------- tiny BERTs


def _write_bert(path, *, masked_lm: bool, seed: int):
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

    path.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(str(path))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    model = (BertForMaskedLM if masked_lm else BertModel)(config)
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.bm25
def test_splade_impact_index_equals_bruteforce_dot_products(tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    ckpt = _write_bert(tmp_path / "splade", masked_lm=True, seed=0)
    corpus = _corpus()
    enc = SpladeEncoder(ckpt, max_length=32)
    # The encoder is SPLADE's formula: max over tokens of log(1 + relu(logits)), padding masked.
    texts = [corpus["d0"].contents, "cat"]
    tok, mlm = AutoTokenizer.from_pretrained(ckpt), AutoModelForMaskedLM.from_pretrained(ckpt).eval()
    for text, row in zip(texts, enc.encode_dense(texts)):
        with torch.no_grad():
            logits = mlm(**tok([text], return_tensors="pt")).logits[0]
        np.testing.assert_allclose(row, torch.log1p(torch.relu(logits)).max(0).values.numpy(), rtol=1e-5, atol=1e-6)

    r = SpladeRetriever(checkpoint_path=ckpt, max_length=32, quantization=10.0)
    r.prepare(corpus, tmp_path / "work")
    queries = {"q1": "cat dog water", "q2": "protein gene virus brain"}
    got = r.retrieve(queries, 5)
    doc_vecs = dict(zip(list(corpus), enc.encode([p.contents for p in corpus.documents()], quantization=10.0)))
    for qid, text in queries.items():
        qv = enc.encode([text], quantization=10.0)[0]
        brute = sorted(((d, float(sum(w * v.get(t, 0) for t, w in qv.items()))) for d, v in doc_vecs.items()),
                       key=lambda p: (-p[1], p[0]))[:5]
        # Integer impacts: the exact dot products (Lucene sums them in float32).
        assert [s for _, s in got[qid]] == pytest.approx([s for _, s in brute], abs=1e-3)
        assert brute[0][1] > 0
        assert {d for d, _ in got[qid]} <= set(list(corpus))


def test_dense_faiss_equals_bruteforce_cls_inner_products(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    q_ckpt = _write_bert(tmp_path / "dragon-q", masked_lm=False, seed=1)
    c_ckpt = _write_bert(tmp_path / "dragon-c", masked_lm=False, seed=2)
    corpus = _corpus()
    r = DenseRetriever(query_encoder_path=q_ckpt, context_encoder_path=c_ckpt, max_length=32, batch_size=5)
    r.prepare(corpus, tmp_path / "work")
    queries = {"a": "cat fish", "b": "heart lung blood"}
    got = r.retrieve(queries, 4)

    def cls(path, texts):
        tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
        with torch.no_grad():
            return np.stack([model(**tok([t], return_tensors="pt")).last_hidden_state[0, 0].numpy() for t in texts])

    docs = cls(c_ckpt, [p.contents for p in corpus.documents()])
    for qid, text in queries.items():
        scores = docs @ cls(q_ckpt, [text])[0]
        top = np.argsort(-scores, kind="stable")[:4]
        assert [d for d, _ in got[qid]] == [list(corpus)[i] for i in top]
        np.testing.assert_allclose([s for _, s in got[qid]], scores[top], rtol=1e-4, atol=1e-5)
    # Embeddings are cached: a second retriever loads them instead of encoding again.
    cache_dirs = list((tmp_path / "work").glob("dense-*"))
    assert len(cache_dirs) == 1 and json.loads((cache_dirs[0] / "ids.json").read_text()) == list(corpus)
    r2 = DenseRetriever(query_encoder_path=q_ckpt, context_encoder_path="/nonexistent/ctx", max_length=32)
    r2.context_encoder_path = c_ckpt  # same cache key; the encoder is never loaded
    r2.prepare(corpus, tmp_path / "work")
    assert r2.retrieve(queries, 4) == got


def test_dense_encoding_resumes_after_a_crash_and_equals_one_uninterrupted_run(tmp_path, monkeypatch):
    """Parts of the corpus's embeddings are saved as they finish: a crash in the third part keeps the first
    two, the re-run encodes only the rest, and the vectors equal a run that never crashed (length-sorted
    batches included: each row is its own text's vector)."""
    ckpt = _write_bert(tmp_path / "enc", masked_lm=False, seed=3)
    corpus = Corpus({f"d{i}": Passage(f"d{i}", "", " ".join(WORDS[: 1 + (7 * i) % 20])) for i in range(23)})
    monkeypatch.setattr(DenseRetriever, "batches_per_part", 2)

    def retriever(work):
        return DenseRetriever(query_encoder_path=ckpt, context_encoder_path=ckpt, max_length=32, batch_size=3,
                              index_dir=str(tmp_path / work))

    whole = retriever("whole")
    whole.prepare(corpus, tmp_path)
    expected = np.load(tmp_path / "whole" / "embeddings.npy")
    assert expected.shape == (23, 32) and not (tmp_path / "whole" / "parts").exists()
    one_by_one = np.concatenate([whole._encode(whole._query_encoder, [p.contents], 32) for p in corpus.documents()])
    np.testing.assert_allclose(expected, one_by_one, rtol=1e-5, atol=1e-6)

    calls, real = [], DenseRetriever._encode

    def crash_in_third_part(self, tok_model, texts, max_length, progress=None):
        calls.append(len(texts))
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(self, tok_model, texts, max_length, progress)

    monkeypatch.setattr(DenseRetriever, "_encode", crash_in_third_part)
    with pytest.raises(RuntimeError, match="simulated crash"):
        retriever("resumed").prepare(corpus, tmp_path)
    parts = tmp_path / "resumed" / "parts"
    assert sorted(p.name for p in parts.glob("*.npy")) == ["000000.npy", "000001.npy"]
    assert not (tmp_path / "resumed" / "embeddings.npy").exists()
    calls.clear()
    resumed = retriever("resumed")
    resumed.prepare(corpus, tmp_path)
    assert calls == [6, 5]  # only the missing parts: the third (6 passages) and the last (5)
    monkeypatch.setattr(DenseRetriever, "_encode", real)
    np.testing.assert_allclose(np.load(tmp_path / "resumed" / "embeddings.npy"), expected, rtol=1e-6, atol=1e-7)
    assert not parts.exists() and resumed.retrieve({"a": "cat fish"}, 4) == whole.retrieve({"a": "cat fish"}, 4)

    # Parts left by another chunk size are discarded, not mixed in.
    (tmp_path / "other" / "parts").mkdir(parents=True)
    np.save(tmp_path / "other" / "parts" / "000000.npy", np.ones((6, 32), np.float32))
    retriever("other").prepare(corpus, tmp_path)
    np.testing.assert_allclose(np.load(tmp_path / "other" / "embeddings.npy"), expected, rtol=1e-6, atol=1e-7)


def test_dense_mean_pooling_matches_sentence_transformers(tmp_path):
    """pooling='mean' + normalize with the bundled all-MiniLM-L6-v2 equals sentence-transformers' cosine."""
    from sentence_transformers import SentenceTransformer

    from data_pipeline.set_builder.offline_teacher import bundled_minilm_path

    path = bundled_minilm_path()
    corpus = _corpus()
    r = DenseRetriever(query_encoder_path=path, context_encoder_path=path, pooling="mean", normalize=True,
                        max_length=64, batch_size=4)
    r.prepare(corpus, tmp_path / "work")
    got = r.retrieve({"a": "cat fish"}, 3)["a"]
    st = SentenceTransformer(path, device="cpu")
    st.max_seq_length = 64
    docs = st.encode([p.contents for p in corpus.documents()], normalize_embeddings=True)
    scores = docs @ st.encode(["cat fish"], normalize_embeddings=True)[0]
    top = np.argsort(-scores, kind="stable")[:3]
    assert [d for d, _ in got] == [list(corpus)[i] for i in top]
    np.testing.assert_allclose([s for _, s in got], scores[top], atol=1e-4)
    with pytest.raises(ValueError, match="pooling='max'"):
        DenseRetriever(query_encoder_path=path, context_encoder_path=path, pooling="max")


# ---------------------------------------------------------------------------------------------- monoT5


@pytest.mark.bm25
def test_monot5_reranks_bm25_topk_with_softmax_head(tmp_path):
    import jax

    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params
    from twolar_jax.reranker import Reranker

    config = preset("tiny")
    ckpt = save_hf_checkpoint(tmp_path / "monot5", config, init_params(config, jax.random.PRNGKey(0)))
    corpus = _corpus(12)
    bm25 = BM25Retriever()
    r = MonoT5Retriever(checkpoint_path=str(ckpt), first_stage=bm25, depth=6, batch_size=8, max_length=64)
    r.prepare(corpus, tmp_path / "work")
    query = "cat dog fish bird"
    got = r.retrieve({"q": query}, 4)["q"]
    first = [d for d, _ in bm25.retrieve({"q": query}, 6)["q"]]
    scores = Reranker.from_pretrained(str(ckpt), score_head="softmax", batch_size=8, max_length=64).score_pairs(
        [query] * len(first), [corpus[d].contents for d in first])
    expect = sorted(zip(first, scores.tolist()), key=lambda p: (-p[1], first.index(p[0])))[:4]
    assert [d for d, _ in got] == [d for d, _ in expect]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expect], rtol=1e-5)
    assert all(0.0 <= s <= 1.0 for _, s in got)  # the monoT5 head is a probability
