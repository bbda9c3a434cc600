"""Query sources: sentence cropping, original query files, docT5query mechanics, dedupe and the mix."""
import json

import pytest

from data_pipeline.set_builder.queries import (CroppedSentences, DocT5Query, OriginalQueries, mix_queries,
                                               normalize_query, read_queries_file, split_counts, split_sentences,
                                               write_queries)
from retrieval.corpus import Corpus
from retrieval.corpus import Document as Passage
from retrieval.corpus import read_corpus as load_corpus


def _corpus(texts: dict[str, str]) -> Corpus:
    return Corpus({d: Passage(d, "", t) for d, t in texts.items()})


def test_split_sentences_handles_abbreviations_initials_and_decimals():
    text = ('The cat sat. It was e.g. big, cf. Fig. 3 and more. J. Smith said "Yes." Then 3.5 mg was given! '
            "Why? 12 mice died (n = 4). Smith et al. Reported it. lower case does not start one.")
    assert split_sentences(text) == [
        "The cat sat.", "It was e.g. big, cf. Fig. 3 and more.", 'J. Smith said "Yes."',
        "Then 3.5 mg was given!", "Why?", "12 mice died (n = 4).",
        "Smith et al. Reported it. lower case does not start one."]
    assert split_sentences("  ") == []
    assert split_sentences("no end punctuation") == ["no end punctuation"]


def test_crop_is_deterministic_length_bounded_and_deduped():
    corpus = _corpus({
        "a": "Short one. This sentence has exactly six words. Another sentence that is long enough here.",
        "b": "Tiny. Too short.",  # no sentence within bounds: skipped
        "c": "This sentence has exactly six words. Nothing else qualifies.",
        "d": "A quite different sentence of decent length.",
    })
    src = CroppedSentences(min_words=5, max_words=8)
    q1, s1 = src.generate(corpus, None, seed=3, seen=set())
    q2, _ = src.generate(corpus, None, seed=3, seen=set())
    assert q1 == q2  # same seed, same queries
    for q in q1:
        assert 5 <= len(q.text.split()) <= 8 and q.text in corpus[q.source_docid].text
        assert q.qid == f"crop-{q.source_docid}" and q.query_type == "crop"
    assert s1.skipped_length == 1 and "b" not in {q.source_docid for q in q1}
    assert len({normalize_query(q.text) for q in q1}) == len(q1)
    assert s1.generated + s1.duplicates + s1.skipped_length == 4
    # `seen` dedupes across sources: pre-seeding with every cropped text leaves nothing new.
    again, s3 = src.generate(corpus, None, seed=3, seen={normalize_query(q.text) for q in q1})
    assert again == [] and s3.duplicates == len(q1)
    # n caps the count.
    assert len(src.generate(corpus, 1, seed=3, seen=set())[0]) == 1
    with pytest.raises(ValueError):
        CroppedSentences(min_words=9, max_words=2)


def test_original_queries_skip_empty_and_name_bad_lines(tmp_path):
    tsv = tmp_path / "q.tsv"
    tsv.write_text("1\tWhat is BM25?\n2\t   \n3\twhat is  bm25 ?\n4\tSecond query\n")
    src = OriginalQueries(path=str(tsv))
    got, stats = src.generate(_corpus({"x": "t"}), None, seed=0, seen=set())
    assert [(q.qid, q.text) for q in got] == [("1", "What is BM25?"), ("4", "Second query")]
    assert stats.skipped_empty == 1 and stats.duplicates == 1  # "what is bm25 ?" normalises to the first
    jl = tmp_path / "q.jsonl"
    jl.write_text(json.dumps({"_id": "a", "text": "x y"}) + "\n" + json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(ValueError, match=r"q\.jsonl:2: _id: missing field"):
        OriginalQueries(path=str(jl)).read()
    jl.write_text('{"_id": "a", "text": "x y"}\n{broken\n')
    with pytest.raises(ValueError, match=r"q\.jsonl:2: line: invalid JSON"):
        OriginalQueries(path=str(jl)).read()


def test_split_counts_and_mix(tmp_path):
    assert split_counts(10, {"crop": 0.5, "doct5query": 0.5}) == {"crop": 5, "doct5query": 5}
    assert split_counts(7, {"a": 1, "b": 1, "c": 1}) == {"a": 3, "b": 2, "c": 2}
    assert sum(split_counts(20000, {"a": 0.3, "b": 0.7}).values()) == 20000
    with pytest.raises(ValueError):
        split_counts(5, {"a": 0})
    corpus = _corpus({f"d{i}": f"Sentence number {i} is here now. Another {i} sentence follows it here." for i in range(20)})
    tsv = tmp_path / "q.tsv"
    tsv.write_text("".join(f"o{i}\toriginal query {i}\n" for i in range(10)))
    sources = {"crop": CroppedSentences(min_words=3), "original": OriginalQueries(path=str(tsv))}
    queries, stats = mix_queries(sources, {"crop": 0.5, "original": 0.5}, 8, corpus=corpus, seed=1)
    types = [q.query_type for q in queries]
    assert types.count("crop") == 4 and types.count("original") == 4
    assert stats["requested"] == {"crop": 4, "original": 4} and stats["total"] == 8
    queries2, _ = mix_queries(sources, {"crop": 0.5, "original": 0.5}, 8, corpus=corpus, seed=1)
    assert queries == queries2
    # A source that runs short is reported, not silently padded.
    _, stats = mix_queries(sources, {"crop": 0.1, "original": 0.9}, 30, corpus=corpus, seed=1)
    assert stats["shortfall"] == {"original": 27 - 10}
    with pytest.raises(ValueError, match="unknown sources"):
        mix_queries(sources, {"nope": 1.0}, 3, corpus=corpus)
    path = tmp_path / "queries.jsonl"
    write_queries(path, queries)
    assert read_queries_file(path) == queries


def test_corpus_skips_lines_without_text_and_names_bad_json(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join([
        json.dumps({"_id": "1", "title": "T", "text": "body one"}),
        json.dumps({"_id": "2", "title": "only title", "text": ""}),
        json.dumps({"_id": "3", "text": "   "}),
        json.dumps({"_id": "4", "text": "body  four\n"}),
    ]) + "\n")
    corpus = load_corpus(path)
    assert list(corpus) == ["1", "2", "4"] and corpus["1"].contents == "T body one" and corpus["4"].text == "body four"
    assert corpus["2"].contents == "only title"  # a title is text too (training and eval read the same)
    assert corpus.stats.skipped_empty == 1
    path.write_text(json.dumps({"_id": "1", "text": "ok"}) + "\n" + json.dumps({"_id": "1", "text": "dup"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: _id: duplicate document id '1' \(first on line 1\)"):
        load_corpus(path)
    path.write_text(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:1: _id: missing field"):
        load_corpus(path)
    path.write_text(json.dumps({"_id": "1", "text": "ok"}) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"corpus\.jsonl:2: line: invalid JSON"):
        load_corpus(path)
    tsv = tmp_path / "collection.tsv"
    tsv.write_text("p1\tfirst passage\np2\t\np3\tTitle\tthird passage\n")
    corpus = load_corpus(tsv)
    assert list(corpus) == ["p1", "p3"] and corpus["p3"].title == "Title" and corpus.stats.skipped_empty == 1


@pytest.fixture(scope="module")
def tiny_doc2query(tmp_path_factory):
    import jax

    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    config = preset("tiny")
    path = tmp_path_factory.mktemp("d2q") / "doc2query"
    save_hf_checkpoint(path, config, init_params(config, jax.random.PRNGKey(0)))
    return str(path)


def test_doct5query_counts_dedupe_and_seed_determinism(tiny_doc2query):
    corpus = _corpus({f"d{i}": f"Passage {i} about proteins and cells number {i}." for i in range(5)})
    src = DocT5Query(checkpoint_path=tiny_doc2query, samples_per_doc=2, batch_size=4, max_input_length=24,
                     max_decode_length=6, top_k=20, min_words=1)
    q1, s1 = src.generate(corpus, 6, seed=0, seen=set())
    q2, _ = src.generate(corpus, 6, seed=0, seen=set())
    q3, _ = src.generate(corpus, 6, seed=1, seen=set())
    assert q1 == q2  # same seed: the same sampled queries
    assert [q.text for q in q1] != [q.text for q in q3]  # another seed samples other tokens
    assert 0 < len(q1) <= 6 and len({q.qid for q in q1}) == len(q1)
    assert all(q.query_type == "doct5query" and q.qid.startswith(f"d2q-{q.source_docid}-") for q in q1)
    assert len({normalize_query(q.text) for q in q1}) == len(q1)
    assert s1.generated == len(q1)
    again, s4 = src.generate(corpus, 6, seed=0, seen={normalize_query(q.text) for q in q1})
    assert not {q.text for q in again} & {q.text for q in q1}
    assert s4.duplicates >= len(q1)
