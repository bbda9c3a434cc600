"""A few DL19 queries as a dataset of their own: the eval tests run the real job on a slice of the shipped data."""
from __future__ import annotations

import json
from pathlib import Path


def dl19_slice(data_dir: Path, root: Path, n: int = 3, hits: int = 6) -> list[dict]:
    """root/trec_dl with the first `n` DL19 queries' top `hits` BM25 candidates and their qrels; returns the
    candidate entries written."""
    (root / "trec_dl").mkdir(parents=True)
    cands = json.loads((data_dir / "trec_dl" / "dl19_bm25_top100.json").read_text())[:n]
    for c in cands:
        c["hits"] = c["hits"][:hits]
    (root / "trec_dl" / "dl19_bm25_top100.json").write_text(json.dumps(cands))
    keep = {str(c["hits"][0]["qid"]) for c in cands}
    lines = (data_dir / "trec_dl" / "qrels.dl19-passage.txt").read_text().splitlines()
    (root / "trec_dl" / "qrels.dl19-passage.txt").write_text("".join(l + "\n" for l in lines if l.split()[0] in keep))
    return cands
