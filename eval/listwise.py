"""Listwise students (LiT5 `generate`, FIRST `first`) as eval's scorer: the same rerank job, score log, resume,
run files and metrics as the pointwise student, for a model that ranks windows instead of scoring pairs.

A listwise model gives an order, not a score per pair; each candidate's score is `1 / rank` of its final
place (strictly decreasing in the rank, so trec_eval and every run reader recover the order exactly).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from twolar_jax import entry
from twolar_jax.errors import OptionError, check_choice

METHODS = ("first", "generate")


@dataclasses.dataclass(frozen=True)
class ListwiseOptions:
    """How a listwise student ranks (`RerankerConfig.listwise` / `--listwise`; None: the pointwise Reranker)."""

    method: Optional[str] = None
    window: int = 20
    stride: int = 10
    passage_length: int = 150

    def check(self, prefix: str = "RerankerConfig.") -> None:
        if self.method is None:
            return
        check_choice(f"{prefix}listwise", self.method, METHODS)
        for name in ("window", "stride", "passage_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"{prefix}{name}={value!r}: expected an integer >= 1")
        if not self.stride <= self.window <= 100:
            raise OptionError(f"{prefix}window={self.window}, {prefix}stride={self.stride}: need 1 <= stride <= window "
                              "<= 100")

    def key(self) -> dict[str, Any]:
        """The score-log key's share: a listwise log never resumes a pointwise one, nor another method's."""
        return {"listwise": dataclasses.asdict(self)} if self.method else {}


class ListwiseScorer:
    """A ListwiseReranker behind eval's scorer protocol: `score_requests(groups)` yields, per group of
    requests, each candidate's 1/rank in request order. Requests of one group are ranked together, so the
    windows of all of them at the same position share the device (twolar_jax.listwise_reranker)."""

    def __init__(self, reranker: Any):
        self.reranker = reranker

    def score_requests(self, groups: Sequence[Sequence[Any]]) -> Iterator[np.ndarray]:
        for group in groups:
            items = [(r.query, [c.text for c in r.candidates], [str(i) for i in range(len(r.candidates))])
                     for r in group]
            ranked = self.reranker.rank_many(items)
            out: list[float] = []
            for r, docs in zip(group, ranked):
                by_index = {int(d.doc_id): d.score for d in docs}
                out.extend(by_index[i] for i in range(len(r.candidates)))
            yield np.asarray(out, np.float64)

    def score_pairs(self, queries: Sequence[str], docs: Sequence[str]) -> np.ndarray:
        raise OptionError("a listwise student ranks each query's candidates together; it has no pair scores")


def add_listwise_flags(parser: Any) -> None:
    """--listwise first|generate --window N --stride N --passage_length N: a listwise student (in gin:
    RerankerConfig.listwise, .window, .stride, .passage_length, which these flags bind)."""
    parser.add_argument("--listwise", choices=METHODS, default=None,
                        help="rank with a listwise FiD student: FIRST's first identifier, or LiT5's generation")
    parser.add_argument("--window", type=entry.positive_int, default=None, help="passages per window (20)")
    parser.add_argument("--stride", type=entry.positive_int, default=None, help="how far windows move (10)")
    parser.add_argument("--passage_length", type=entry.positive_int, default=None, help="tokens per passage (150)")


def load_listwise(checkpoint: str, options: ListwiseOptions, *, dtype: str, batch_size: int,
                  mesh_shape: Sequence[int], step: Optional[int] = None) -> ListwiseScorer:
    """The checkpoint (HF T5 dir: LiT5-Distill, a FIRST T5; or our MODEL_DIR) as a listwise scorer."""
    from twolar_jax.listwise_reranker import ListwiseReranker

    extra = {"step": step} if step is not None else {}
    reranker = ListwiseReranker.from_pretrained(
        checkpoint, method=options.method, window=options.window, stride=options.stride,
        passage_length=options.passage_length, dtype=dtype, batch_size=batch_size, mesh_shape=tuple(mesh_shape),
        **extra)
    return ListwiseScorer(reranker)
