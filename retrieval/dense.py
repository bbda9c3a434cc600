"""Dense bi-encoder retrieval (DRAGON+ style, or any sentence-transformers style encoder) over faiss."""
from __future__ import annotations

import collections
import itertools
import json
import shutil
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

    batches_per_part = 256  # batches in one cached part of the corpus's embeddings (the unit of resume)

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

    def _encode(self, tok_model, texts: Sequence[str], max_length: int, progress=None) -> np.ndarray:
        """Pooled vectors in the order of `texts`. Batches are cut from the texts sorted by length (as
        sentence-transformers does), so a batch pads to its own longest text, not to a random one's."""
        import torch

        tok, model = tok_model
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = np.zeros((len(texts), model.config.hidden_size), np.float32)
        for lo in range(0, len(texts), self.batch_size):
            rows = order[lo:lo + self.batch_size]
            enc = tok([texts[i] for i in rows], padding=True, truncation=True, max_length=max_length,
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
            out[rows] = pooled.cpu().numpy()
            if progress is not None:
                progress.update(len(rows))
        return out

    def _cache_dir(self, corpus: Corpus, work_dir: Path) -> Path:
        if self.index_dir:
            return Path(self.index_dir)
        return (Path(work_dir) / f"dense-{corpus.fingerprint()}-{path_tag(self.context_encoder_path)}"
                f"-{self.pooling}{'-norm' if self.normalize else ''}")

    def _encode_parts(self, corpus: Corpus, parts: Path) -> list[Path]:
        """Encode the corpus in chunks of `batches_per_part` batches, each saved atomically as parts/NNNNNN.npy:
        a crash or Ctrl-C on an 8.8M-passage corpus loses at most one chunk, and the re-run encodes only what
        is missing. Parts of another corpus size, chunk size or max_length are discarded, never mixed in."""
        from tqdm import tqdm

        chunk = self.batch_size * self.batches_per_part
        meta = {"docs": len(corpus), "chunk": chunk, "max_length": self.max_length}
        if parts.is_dir() and not ((parts / "meta.json").is_file()
                                   and json.loads((parts / "meta.json").read_text()) == meta):
            shutil.rmtree(parts)
        parts.mkdir(parents=True, exist_ok=True)
        write_text_atomic(parts / "meta.json", json.dumps(meta))
        names = [parts / f"{i:06d}.npy" for i in range(-(-len(corpus) // chunk))]
        done = sum(chunk if name.is_file() else 0 for name in names)
        encoder, docs = None, corpus.documents()
        with tqdm(total=len(corpus), initial=min(done, len(corpus)), desc=f"{self.name}: encode corpus",
                  unit="passage") as bar:
            for name in names:
                if name.is_file():
                    collections.deque(itertools.islice(docs, chunk), maxlen=0)  # skip this chunk's passages
                    continue
                encoder = encoder or self._encoder(self.context_encoder_path)
                texts = [d.contents for d in itertools.islice(docs, chunk)]
                with atomic_writer(name, "wb") as f:
                    np.save(f, self._encode(encoder, texts, self.max_length, progress=bar))
        return names

    def _embeddings(self, corpus: Corpus, cache: Path) -> np.ndarray:
        """The corpus's vectors (memory-mapped from the cache), encoded first where not cached."""
        emb_path, ids_path = cache / "embeddings.npy", cache / "ids.json"
        if not (emb_path.is_file() and ids_path.is_file()):
            names = self._encode_parts(corpus, cache / "parts")
            shapes = [np.load(name, mmap_mode="r").shape for name in names]
            hidden = shapes[0][1] if shapes else self._encoder(self.context_encoder_path)[1].config.hidden_size
            with atomic_writer(emb_path, "wb") as f:  # streamed part by part: one chunk in memory at a time
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                          "shape": (sum(s[0] for s in shapes), hidden)}
                np.lib.format.write_array_header_2_0(f, header)
                for name in names:
                    f.write(np.ascontiguousarray(np.load(name), np.float32).tobytes())
            write_text_atomic(ids_path, json.dumps(list(corpus)))
            shutil.rmtree(cache / "parts")
        self._ids = json.loads(ids_path.read_text())
        return np.load(emb_path, mmap_mode="r")

    def prepare(self, corpus: Corpus, work_dir: Path) -> None:
        import faiss

        emb = self._embeddings(corpus, self._cache_dir(corpus, work_dir))
        self._index = faiss.IndexFlatIP(emb.shape[1])
        for lo in range(0, emb.shape[0], 1 << 16):  # faiss copies; the mapped file is read a slice at a time
            self._index.add(np.ascontiguousarray(emb[lo:lo + (1 << 16)]))
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
