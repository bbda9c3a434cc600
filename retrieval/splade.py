"""SPLADE: learned sparse retrieval with a local BERT masked-LM checkpoint and a Lucene impact index."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from retrieval.base import path_tag
from retrieval.corpus import Corpus
from retrieval.runs import Hits


class SpladeEncoder:
    """SPLADE term weights from a BERT masked-LM: w_t = max over tokens of log(1 + relu(logit_t))."""

    def __init__(self, checkpoint_path: str, *, max_length: int = 256, batch_size: int = 32, device: str = "cpu"):
        import torch
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint_path)
        self.model = AutoModelForMaskedLM.from_pretrained(checkpoint_path).to(device).eval()
        by_id = {i: t for t, i in self.tokenizer.get_vocab().items()}
        # Every output row is a term; an id the tokenizer cannot name still gets a unique term.
        self.vocab = [by_id.get(i, f"[id{i}]").replace(" ", "_") for i in range(self.model.config.vocab_size)]
        self.max_length, self.batch_size, self.device = max_length, batch_size, device

    def encode_dense(self, texts: Sequence[str]) -> np.ndarray:
        """float32 [N, vocab] weights (mostly zero for a trained model)."""
        torch = self.torch
        out = []
        for lo in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[lo:lo + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            with torch.no_grad():
                logits = self.model(**enc).logits.float()
            weights = torch.log1p(torch.relu(logits)) * enc["attention_mask"].unsqueeze(-1)
            out.append(weights.max(dim=1).values.cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, len(self.vocab)), np.float32)

    def encode(self, texts: Sequence[str], *, quantization: float) -> list[dict[str, int]]:
        """{term: round(w * quantization)} with zero weights dropped (Anserini stores integer impacts)."""
        dense = self.encode_dense(texts)
        out = []
        for row in dense:
            q = np.rint(row * quantization).astype(np.int64)
            nz = np.nonzero(q > 0)[0]
            out.append({self.vocab[i]: int(q[i]) for i in nz})
        return out


class SpladeRetriever:
    """Learned sparse retrieval: documents encoded by a local SPLADE checkpoint into a Lucene impact
    index (retrieval/lucene.py, `impact=True`), queries encoded the same way and searched by dot product."""

    def __init__(self, *, checkpoint_path: str, name: str = "splade", max_length: int = 256,
                 query_max_length: int = 64, batch_size: int = 32, quantization: float = 100.0,
                 index_dir: Optional[str] = None, device: str = "cpu"):
        self.name, self.checkpoint_path = name, checkpoint_path
        self.max_length, self.query_max_length = max_length, query_max_length
        self.batch_size, self.quantization, self.index_dir, self.device = batch_size, quantization, index_dir, device
        self.empty_docs = 0
        self._encoder: SpladeEncoder | None = None
        self._searcher = None

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        from tqdm import tqdm

        from retrieval import lucene

        self._encoder = SpladeEncoder(self.checkpoint_path, max_length=self.max_length,
                                      batch_size=self.batch_size, device=self.device)
        index_dir = (Path(self.index_dir) if self.index_dir else
                     Path(work_dir) / f"splade-{corpus.fingerprint()}-{path_tag(self.checkpoint_path)}")
        if not lucene.index_is_complete(index_dir):
            def docs():
                passages = list(corpus.documents())
                step = self.batch_size * 8
                for lo in tqdm(range(0, len(passages), step), desc="splade: encode corpus", unit="block"):
                    chunk = passages[lo:lo + step]
                    for p, vec in zip(chunk, self._encoder.encode([p.contents for p in chunk],
                                                                  quantization=self.quantization)):
                        if vec:
                            yield {"id": p.docid, "vector": vec}
                        else:
                            self.empty_docs += 1
            lucene.build_index(docs(), index_dir, impact=True)
        self._searcher = lucene.ImpactSearcher(index_dir)

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._searcher is None or self._encoder is None:
            raise RuntimeError("SpladeRetriever.prepare() was not called")
        qids = list(queries)
        enc = self._encoder
        saved, enc.max_length = enc.max_length, self.query_max_length
        try:
            vectors = enc.encode([queries[q] for q in qids], quantization=self.quantization)
        finally:
            enc.max_length = saved
        return {q: self._searcher.search(v, k) if v else [] for q, v in zip(qids, vectors)}
