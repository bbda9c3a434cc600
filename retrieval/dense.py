"""Dense bi-encoder retrieval (DRAGON+ style, or any sentence-transformers style encoder) over faiss."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from retrieval.base import path_tag
from retrieval.corpus import Corpus
from retrieval.runs import Hits, sort_hits
from twolar_jax.durable_io import atomic_writer, write_text_atomic
from twolar_jax.errors import OptionError


class DenseRetriever:
    """Dense bi-encoder: query and context BERT encoders, pooled vectors, inner product in an exact faiss
    index. Corpus embeddings are cached as .npy under work_dir.

    The defaults are DRAGON+'s (separate query and context encoders, [CLS] pooling, no normalisation);
    `pooling="mean"` with `normalize=True` and one path for both encoders is a sentence-transformers
    style retriever (e.g. all-MiniLM-L6-v2, which the demo uses offline)."""

    def __init__(self, *, query_encoder_path: str, context_encoder_path: str, name: str = "dense",
                 max_length: int = 256, query_max_length: int = 64, batch_size: int = 32,
                 index_dir: Optional[str] = None, device: str = "cpu", pooling: str = "cls",
                 normalize: bool = False):
        if pooling not in ("cls", "mean"):
            raise OptionError(f"DenseRetriever.pooling={pooling!r}: expected 'cls' or 'mean'")
        self.pooling, self.normalize = pooling, normalize
        self.name = name
        self.query_encoder_path, self.context_encoder_path = query_encoder_path, context_encoder_path
        self.max_length, self.query_max_length = max_length, query_max_length
        self.batch_size, self.index_dir, self.device = batch_size, index_dir, device
        self._index = None
        self._ids: list[str] = []

    def _encoder(self, path: str):
        from transformers import AutoModel, AutoTokenizer

        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).to(self.device).eval()

    def _encode(self, tok_model, texts: Sequence[str], max_length: int, desc: str | None = None) -> np.ndarray:
        import torch
        from tqdm import tqdm

        tok, model = tok_model
        out = []
        starts = range(0, len(texts), self.batch_size)
        for lo in tqdm(starts, desc=desc, unit="batch", disable=desc is None):
            enc = tok(list(texts[lo:lo + self.batch_size]), padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(self.device)
            with torch.no_grad():
                hidden_states = model(**enc).last_hidden_state.float()
            if self.pooling == "mean":
                weights = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp(min=1.0)
            else:
                pooled = hidden_states[:, 0, :]
            if self.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out.append(pooled.cpu().numpy())
        hidden = model.config.hidden_size
        return np.ascontiguousarray(np.concatenate(out) if out else np.zeros((0, hidden), np.float32), np.float32)

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        import faiss

        cache = (Path(self.index_dir) if self.index_dir else
                 Path(work_dir) / f"dense-{corpus.fingerprint()}-{path_tag(self.context_encoder_path)}"
                 f"-{self.pooling}{'-norm' if self.normalize else ''}")
        emb_path, ids_path = cache / "embeddings.npy", cache / "ids.json"
        if emb_path.is_file() and ids_path.is_file():
            emb = np.load(emb_path)
            self._ids = json.loads(ids_path.read_text())
        else:
            # Chunks of whole batches (the same batches as one call), so no list of every passage is held.
            encoder, docs, chunk, parts = self._encoder(self.context_encoder_path), corpus.documents(), [], []
            while chunk := [d.contents for d in itertools.islice(docs, self.batch_size * 256)]:
                parts.append(self._encode(encoder, chunk, self.max_length, desc=f"{self.name}: encode corpus"))
            emb = np.concatenate(parts) if parts else self._encode(encoder, [], self.max_length)
            self._ids = list(corpus)
            with atomic_writer(emb_path, "wb") as f:
                np.save(f, emb)
            write_text_atomic(ids_path, json.dumps(self._ids))
        self._index = faiss.IndexFlatIP(emb.shape[1])
        self._index.add(emb)
        self._query_encoder = self._encoder(self.query_encoder_path)

    def retrieve(self, queries: Mapping[str, str], k: int) -> dict[str, Hits]:
        if self._index is None:
            raise RuntimeError("DragonRetriever.prepare() was not called")
        qids = list(queries)
        if not qids:
            return {}
        q = self._encode(self._query_encoder, [queries[x] for x in qids], self.query_max_length)
        scores, idx = self._index.search(q, min(int(k), len(self._ids)))
        return {qid: sort_hits((self._ids[i], s) for i, s in zip(row_i, row_s) if i >= 0)
                for qid, row_i, row_s in zip(qids, idx, scores)}
