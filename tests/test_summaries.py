"""Training summaries: the JSONL lines and TensorBoard scalars one SummaryWriter writes, read back."""
from __future__ import annotations

import logging

import pytest

from twolar_jax import summaries


@pytest.mark.parametrize("split, name, tag", [("train", "ndcg@10", "train/ndcg_10"), ("validation", "loss", "validation/loss"),
                                              ("train", "p(x) y", "train/p_x__y"), ("/train", "a.b-c", "train/a.b-c")])
def test_tensorboard_tag_is_what_tensorboardx_would_write(split, name, tag):
    from tensorboardX.summary import _clean_tag

    assert summaries.tensorboard_tag(split, name) == tag == _clean_tag(f"{split}/{name}")


def test_summary_writer_scalars_read_back_from_jsonl_and_event_file(tmp_path, caplog):
    import tensorflow as tf

    caplog.set_level(logging.INFO)
    writer = summaries.SummaryWriter(tmp_path, "train")
    writer.scalars(1, {"loss": 0.75, "ndcg@10": 0.5})
    writer.scalars(2, {"loss": 0.5, "ndcg@10": float("inf")})
    writer.scalars(2, {"loss": 9.0, "ndcg@10": 9.0})  # a step already written is not written again
    writer.close()

    assert summaries.read_metrics(tmp_path) == [{"step": 1, "loss": 0.75, "ndcg@10": 0.5},
                                                {"step": 2, "loss": 0.5, "ndcg@10": pytest.approx(float("nan"), nan_ok=True)}]
    (events,) = (tmp_path / "tb" / "train").glob("events.out.tfevents.*")
    scalars = [(v.tag, e.step, v.simple_value) for e in tf.compat.v1.train.summary_iterator(str(events))
               for v in e.summary.value]
    assert [s for s in scalars if s[0] == "train/loss"] == [("train/loss", 1, 0.75), ("train/loss", 2, 0.5)]
    assert [s[:2] for s in scalars if s[0] != "train/loss"] == [("train/ndcg_10", 1), ("train/ndcg_10", 2)]
    assert not [r for r in caplog.records if "illegal" in r.getMessage()], "tensorboardX had to rename a tag"
