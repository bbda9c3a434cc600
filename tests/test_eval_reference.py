"""Re-run the first stages of eval/reference_scores.yaml and compare (the 2CR check, in CI)."""
import pytest

from eval import reference

REF = reference.load_reference()


@pytest.mark.parametrize("name", ["trec_dl/dl19", "trec_dl/dl20"])
def test_trec_dl_bm25_order(name, data_dir, tmp_path):
    got = reference.reproduce(name, data_dir=str(data_dir), output_dir=str(tmp_path))
    assert reference.compare(name, REF[name], got) == []
    assert round(got["nDCG@10"], 4) == {"trec_dl/dl19": 0.5058, "trec_dl/dl20": 0.4796}[name]
    # The job wrote the run file it scored.
    assert (tmp_path / name.replace("/", "_") / "run.trec").is_file()


@pytest.mark.bm25
def test_scifact_pyserini_bm25_flat(data_dir, tmp_path):
    """Index the shipped 5,183 SciFact abstracts with Lucene, BM25 top-100, --remove-query, nDCG@10."""
    got = reference.reproduce("beir/scifact", data_dir=str(data_dir), cache_dir=str(tmp_path / "cache"),
                              output_dir=str(tmp_path / "out"))
    assert reference.compare("beir/scifact", REF["beir/scifact"], got) == []
    assert abs(got["nDCG@10"] - 0.679) <= 0.01


def test_compare_reports_a_moved_score():
    entry = REF["trec_dl/dl19"]
    moved = dict(entry["scores"], **{"nDCG@10": entry["scores"]["nDCG@10"] + 0.001})
    problems = reference.compare("trec_dl/dl19", entry, moved)
    assert any("recorded 0.5058" in p for p in problems) and any("published" in p for p in problems)
