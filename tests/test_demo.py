"""The embedded default end to end (`python -m twolar_jax.demo --quick`), as a user runs it: from the
installed wheel, in an empty directory, on one CPU device."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from console_cases import TEST_ONLY_ENV, visible_lines
from twolar_jax.demo import LISTWISE_SYSTEMS, STAGES, SYSTEMS, ScorerAsPairScorer

NATIVE_CHATTER = re.compile(r"^[IWEF]\d{4} |absl|cuInit|CUDA|cuda|libtpu|TPU|SLF4J|oneDNN|InitGoogle|Source Location|^INFO: |org\.apache")


class _CountingScorer:
    def __init__(self):
        self.calls = []

    def score(self, query, passages):
        self.calls.append((query, len(passages)))
        return np.array([len(p) + len(query) for p in passages], np.float32)


def test_scorer_adapter_groups_consecutive_queries():
    scorer = _CountingScorer()
    out = ScorerAsPairScorer(scorer).score_pairs(["a", "a", "bb", "a"], ["x", "yy", "z", ""])
    np.testing.assert_array_equal(out, [2, 3, 3, 1])
    assert scorer.calls == [("a", 2), ("bb", 1), ("a", 1)]


def test_demo_train_stage_stopped_by_a_signal_is_not_done(tmp_path, capsys):
    """A Ctrl-C or SIGTERM during the demo's training stops the demo there (the trainer saved the step it
    reached): the stage is not marked done, so the next run resumes it rather than evaluating a half-trained
    student."""
    from twolar_jax.demo import DemoPaths, stage_train
    from twolar_jax.train import TrainResult

    stopped = TrainResult(step=7, model_dir=str(tmp_path), train_metrics={}, eval_metrics=None, batches_consumed=7,
                          stopped_by="SIGINT")
    with pytest.raises(SystemExit) as exited:
        stage_train(DemoPaths(tmp_path), {"train": lambda: stopped})
    assert exited.value.code == 130
    assert "train: stopped at step 7 by SIGINT" in capsys.readouterr().err
    done = TrainResult(step=9, model_dir=str(tmp_path), train_metrics={"loss": 0.5}, eval_metrics=None,
                       batches_consumed=9)
    assert stage_train(DemoPaths(tmp_path), {"train": lambda: done}) == {"step": 9, "train_metrics": {"loss": 0.5}}


@pytest.mark.slow
@pytest.mark.bm25
def test_demo_quick_end_to_end_and_resume(tmp_path, installed_wheel):
    out = tmp_path / "demo"
    # As a user runs it: one CPU device (not the 8 simulated ones conftest gives this process), and no
    # JAX_PLATFORMS or TF log level: JAX looks for every backend (libtpu is installed), TF for CUDA.
    env = {k: v for k, v in installed_wheel["env"].items() if k not in TEST_ONLY_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "twolar_jax.demo", "--quick", "--output_dir", str(out)]
    first = subprocess.run(cmd, env=env, cwd=installed_wheel["cwd"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    chatter = [line for line in visible_lines(first.stderr) if NATIVE_CHATTER.search(line)]
    assert chatter == [], chatter  # no line from libtpu, CUDA, absl, TensorFlow or the JVM's SLF4J
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == set(SYSTEMS)
    for system in SYSTEMS:
        assert 0.0 <= results["table"][system]["nDCG@10"] <= 1.0
        assert (out / "eval" / system / "beir_scifact" / "run.trec").stat().st_size > 0
    # BM25 over the shipped SciFact, first 40 judged queries: the eval package's number, reproduced.
    bm25 = json.loads((out / "eval" / "bm25" / "beir_scifact" / "metrics.json").read_text())
    assert bm25["num_queries"] == 40
    assert results["table"]["bm25"]["nDCG@10"] == pytest.approx(bm25["mean"]["nDCG@10"])
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["loss_last"] < results["loss_first"]
    train_lines = (out / "build" / "train.jsonl").read_text().splitlines()
    assert len(train_lines) == 60
    assert "nDCG@10" in first.stdout and "student after distillation" in first.stdout
    # A re-run skips every finished stage and prints the same table.
    second = subprocess.run(cmd, env=env, cwd=installed_wheel["cwd"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("build", "train", "eval"):
        assert f"[demo] {stage}: already done" in second.stdout
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]


def test_default_student_runs_the_original_stages_listwise_only_on_request(tmp_path):
    """--student pointwise (the default) runs exactly the four stages it always ran; the listwise stages only
    run for listwise/both. The held-out split the FiD student trains on is deterministic (resumable)."""
    from twolar_jax.demo import parse_args, split_distillation_set, student_stages

    assert parse_args(["--quick"])[0].student == "pointwise"
    assert [s for s in STAGES if s in student_stages("pointwise")] == ["build", "train", "eval", "report"]
    assert [s for s in STAGES if s in student_stages("listwise")] == ["build", "train_listwise", "eval_listwise",
                                                                       "report"]
    assert student_stages("both") == set(STAGES)
    source = tmp_path / "train.jsonl"
    source.write_text("".join(f'{{"qid": "{i}"}}\n' for i in range(20)))
    files = split_distillation_set(source, tmp_path / "split", 0.1)
    assert len(files["train"].read_text().splitlines()) == 18
    assert files["validation"].read_text().splitlines() == ['{"qid": "18"}', '{"qid": "19"}']


@pytest.mark.slow
@pytest.mark.bm25
def test_demo_quick_listwise_student_end_to_end(tmp_path, installed_wheel):
    """`--quick --student listwise`: the tiny FiD student trained on the demo's build, ranked with FIRST's
    method; its before/after rows have finite nDCG@10, the plot carries its validation nDCG@10, a re-run
    skips every finished stage."""
    out = tmp_path / "demo"
    env = {k: v for k, v in installed_wheel["env"].items() if k not in TEST_ONLY_ENV}
    cmd = [sys.executable, "-m", "twolar_jax.demo", "--quick", "--student", "listwise", "--output_dir", str(out)]
    first = subprocess.run(cmd, env=env, cwd=installed_wheel["cwd"], capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    chatter = [line for line in visible_lines(first.stderr) if NATIVE_CHATTER.search(line)]
    assert chatter == [], chatter
    results = json.loads((out / "results.json").read_text())
    assert set(results["table"]) == set(LISTWISE_SYSTEMS)  # the pointwise stages did not run
    for system in LISTWISE_SYSTEMS:
        assert np.isfinite(results["table"][system]["nDCG@10"])
        assert 0.0 <= results["table"][system]["nDCG@10"] <= 1.0
        assert (out / "eval" / system / "beir_scifact" / "run.trec").stat().st_size > 0
    curve = results["listwise_validation_ndcg@10"]
    assert [step for step, _ in curve] == [0, 10, 20, 30] and all(np.isfinite(v) for _, v in curve)
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "student_listwise" / "data" / "validation.jsonl").read_text().splitlines()) == 6
    assert "listwise FiD student after distillation" in first.stdout
    second = subprocess.run(cmd, env=env, cwd=installed_wheel["cwd"], capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    for stage in ("build", "train_listwise", "eval_listwise"):
        assert f"[demo] {stage}: already done" in second.stdout
    assert json.loads((out / "results.json").read_text())["table"] == results["table"]
