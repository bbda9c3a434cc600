"""Hostile input, crashes and secrets (issue 10) and the console scripts' help (issue 11 item 7).

Every console entry point turns a user error into one line on stderr and exit code 2 (--debug: the
traceback); options are checked where they are given; no secret reaches a file, a log or an error;
a batch with nothing to compare is an error, or skipped without moving the model.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import gin
import jax
import numpy as np
import optax
import pytest

from tests.train_helpers import QUIET, SyntheticSource, run_options, synthetic_batch, tiny_config
from twolar_jax import entry, gin_utils, secrets
from twolar_jax.errors import CheckpointError, FormatError, OptionError
from twolar_jax.ranking.features import LISTWISE_GROUP_BATCH, BatchError
from twolar_jax.ranking.pointwise import PointwiseCrossEncoder
from twolar_jax.train import train

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def clean_state():
    """Fresh gin config and the root logger's handlers back after a test that ran a console entry."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    gin.clear_config()
    yield
    gin.clear_config()
    root.handlers[:] = handlers
    root.setLevel(level)


def _error_lines(err: str, prog: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]


def _all_bytes(root: Path) -> bytes:
    return b"\n".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def _distill_line(qid: str, n: int = 3, **extra) -> str:
    return json.dumps({"qid": qid, "query": f"query {qid}", "query_type": "t",
                       "candidates": [{"docid": f"{qid}-d{j}", "text": f"passage {j} of {qid}", "source": "s"}
                                      for j in range(n)], **extra})


# -------------------------------------------------------------------------------------- 1. secrets
def test_reliab_secret_names_by_last_word():
    for name in ("api_key", "llm_client.ChatClient.api_key", "MYKEY", "OpenAIKey", "hf_token", "PASSWORD",
                 "scope/ChatClient.secret", "%MYKEY"):
        assert secrets.is_secret_name(name), name
    for name in ("pad_token_id", "max_tokens", "T5Config.eos_token_id", "sort_keys", "keyword", "train.model_dir"):
        assert not secrets.is_secret_name(name), name
    config = "MYKEY = 'plainvalue12345'\nllm_client.ChatClient.api_key = %MYKEY\nT5Config.pad_token_id = 0\n"
    out = secrets.redact_gin_config(config)
    assert "plainvalue12345" not in out and "MYKEY = None  # redacted" in out and "pad_token_id = 0" in out


def test_reliab_chat_client_registers_key_and_url_userinfo(monkeypatch):
    from data_pipeline.set_builder.llm_client import ChatClient

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ChatClient(model="m", base_url="http://127.0.0.1:9/v1", api_key="Plain0given0value")
    assert secrets.redact("x Plain0given0value y") == "x *** y"
    client = ChatClient(model="m", base_url="http://alice:Url0pass0value@127.0.0.1:9/v1")
    assert client.base_url == "http://127.0.0.1:9/v1"  # the credentials never go to openai/httpx
    assert "Url0pass0value" not in secrets.redact("alice:Url0pass0value and Url0pass0value")
    assert "alice" in secrets.redact("alice")  # the user name alone is not a secret
    assert client.describe()["base_url"] == "http://127.0.0.1:9/v1"
    with pytest.raises(OptionError, match="ChatClient.model"):
        ChatClient(model="", base_url="http://127.0.0.1:9/v1")


BUILD_GIN = """
build.output_dir = %OUTPUT_DIR
build.corpus_path = '{corpus}'
build.num_queries = {num_queries}
build.depth = 6
build.progress = False
build.manifest_every_s = 0.0
build.retrievers = {{'bm25': @retrievers.RunFileRetriever()}}
retrievers.RunFileRetriever.path = '{run}'
build.query_sources = {{'original': @queries.OriginalQueries()}}
queries.OriginalQueries.path = '{queries}'
build.query_mix = {{'original': 1.0}}
build.teacher = @teacher.ListwiseLLMTeacher()
teacher.ListwiseLLMTeacher.client = @llm_client.ChatClient()
teacher.ListwiseLLMTeacher.window_size = 4
teacher.ListwiseLLMTeacher.step = 2
teacher.ListwiseLLMTeacher.progress = False
llm_client.ChatClient.model = 'fake-llm'
llm_client.ChatClient.base_url = '{base_url}'
llm_client.ChatClient.max_retries = 1
"""


def _build_gin(tmp: Path, base_url: str, qids: list[str]) -> Path:
    """The user's inputs (in tmp/inputs: they may hold the key, being the user's own config)."""
    from test_teacher_faults import write_inputs

    tmp = tmp / "inputs"
    tmp.mkdir()
    corpus, queries, run = write_inputs(tmp, qids)
    path = tmp / "build.gin"
    path.write_text(BUILD_GIN.format(corpus=corpus, run=run, queries=queries, base_url=base_url,
                                     num_queries=len(qids)))
    return path


def _route_args(route: str, key: str, base_url: str, monkeypatch) -> tuple[list[str], str]:
    """(extra flags, ChatClient.base_url) that hand the key over by one route."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    if route == "env":
        monkeypatch.setenv("OPENAI_API_KEY", key)
        return [], base_url
    if route == "binding":
        return [f"--gin.llm_client.ChatClient.api_key='{key}'"], base_url
    if route == "macro":
        return [f"--gin.MYKEY='{key}'", "--gin.llm_client.ChatClient.api_key=%MYKEY"], base_url
    assert route == "url"
    return [], base_url.replace("http://", f"http://me:{key}@")


@pytest.mark.parametrize("route", ["env", "binding", "macro", "url"])
def test_reliab_secret_by_every_route_stays_out_of_build_outputs(route, tmp_path, monkeypatch, capfd, clean_state):
    from data_pipeline.set_builder import cli as build_cli
    from fake_chat_server import FakeChatServer

    key = f"Zq9{route}ROUTEvalue0"  # not key-shaped: only registration by value can remove it
    with FakeChatServer(expected_key=key) as srv:
        args, base_url = _route_args(route, key, srv.base_url, monkeypatch)
        gin_file = _build_gin(tmp_path, base_url, ["q1", "q2"])
        code = build_cli.console_main([f"--gin_file={gin_file}", f"--gin.OUTPUT_DIR='{tmp_path / 'out'}'",
                                       "--log_level=DEBUG", "--no_compile_cache", *args])
        assert code == 0
        assert srv.calls and all(c["auth_ok"] for c in srv.calls)  # the key did reach the server
    captured = capfd.readouterr()
    config = (tmp_path / "out" / "config.gin").read_text()
    assert "ChatClient.model = 'fake-llm'" in config
    for text in (_all_bytes(tmp_path / "out").decode("utf-8", "replace"), captured.out, captured.err):
        assert key not in text


def test_reliab_secrets_build_then_train_in_one_process(tmp_path, monkeypatch, capfd, clean_state):
    """One gin config drives the LLM build and the training (the demo's pattern): config.gin, the TensorBoard
    text, metrics, manifests, caches, logs and errors hold no key, whichever route it came by."""
    from data_pipeline.set_builder.configurables import register_build
    from fake_chat_server import FakeChatServer
    from twolar_jax import train as train_module

    env_key, macro_key, url_key = "Zq9ENVkeyVALUE1", "Zq9MACROkeyVALUE2", "Zq9URLkeyVALUE3"
    monkeypatch.setenv("OPENAI_API_KEY", env_key)
    with FakeChatServer(expected_key=macro_key) as srv:
        url = srv.base_url.replace("http://", f"http://me:{url_key}@")
        gin_file = _build_gin(tmp_path, url, [f"q{i}" for i in range(4)])
        build_fn = register_build()
        train_fn = train_module.register_configurables()["train"]
        gin_utils.parse_gin_flags(
            [str(gin_file), "experiments/tiny_smoke.gin"],
            [f"OUTPUT_DIR = '{tmp_path / 'build'}'", f"MYKEY = '{macro_key}'",
             "llm_client.ChatClient.api_key = %MYKEY", f"MODEL_DIR = '{tmp_path / 'model'}'",
             f"DISTILL_JSONL = '{tmp_path / 'build' / 'train.jsonl'}'", "TRAIN_STEPS = 2", "LoggingConfig.period = 1"])
        entry.start(argparse.Namespace(log_level="DEBUG", no_compile_cache=True))
        manifest = build_fn(write_gin_config=True)
        assert manifest["runs"][-1]["status"] == "complete" and all(c["auth_ok"] for c in srv.calls)
        result = train_fn()
    assert result.step == 2
    logging.getLogger("twolar_jax.test").warning("keys %s %s %s at %s", env_key, macro_key, url_key, url)
    code = entry.run_console("twolar-x", lambda argv: (_ for _ in ()).throw(OptionError(f"bad {macro_key} {url}")),
                             [])
    assert code == 2
    captured = capfd.readouterr()
    model_config = (tmp_path / "model" / "config.gin").read_text()
    assert "ChatClient.api_key = None  # redacted" in model_config and "train.total_steps" in model_config
    assert list((tmp_path / "model" / "tb").rglob("events.out.tfevents.*"))
    everything = _all_bytes(tmp_path / "build") + _all_bytes(tmp_path / "model")
    for key in (env_key, macro_key, url_key):
        assert key.encode() not in everything, key
        assert key not in captured.out and key not in captured.err, key
    assert "twolar-x: error: bad ***" in captured.err


# ------------------------------------------------------------------------- 2. float64, no-pair batches
def test_reliab_trec_keeps_float64_scores_end_to_end(tmp_path, capsys):
    from eval import trec

    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d9 1\nq1 0 d1 0\n")
    run = tmp_path / "run.trec"
    # In float32 both scores are inf and the tie goes to docid descending (d9 first: RR 1.0).
    run.write_text("q1 Q0 d1 1 1e308 t\nq1 Q0 d9 2 1e307 t\n")
    assert trec.main(["--qrels", str(qrels), "--run", str(run), "--measures", "RR@10"]) == 0
    assert json.loads(capsys.readouterr().out) == {"RR@10": 0.5}
    run.write_text("q1 Q0 d1 1 1e308 t\nq1 Q0 d9 2 inf t\n")
    assert trec.main(["--qrels", str(qrels), "--run", str(run), "--measures", "RR@10"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err, "python -m eval.trec") == [
        f"python -m eval.trec: error: {run}:2: score: 'inf' is not finite"]
    assert "Traceback" not in err


def test_reliab_trec_non_utf8_run_names_file_and_line(tmp_path, capsys, monkeypatch):
    from eval import trec

    qrels = tmp_path / "qrels.txt"
    qrels.write_text("q1 0 d1 1\n")
    run = tmp_path / "run.trec"
    run.write_bytes(b"q1 Q0 d1 1 2.0 t\nq1 Q0 d\xff2 2 1.0 t\n")
    assert trec.main(["--qrels", str(qrels), "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{run}:2: line: invalid UTF-8" in err
    monkeypatch.setenv("TWOLAR_DEBUG", "1")  # the traceback on request
    assert trec.main(["--qrels", str(qrels), "--run", str(run)]) == 2
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def _no_pair_batch(index: int) -> dict:
    batch = synthetic_batch(index)
    batch["passage_mask"][:] = 0
    batch["passage_mask"][:, 0] = 1  # every query has one real passage: nothing to compare
    return batch


class _NoPairAt(SyntheticSource):
    """SyntheticSource whose batches at `empty` have no query with two real passages."""

    def __init__(self, empty: set[int], **kw):
        super().__init__(**kw)
        self.empty = empty

    def __call__(self, *, shard_index, num_shards, skip_batches):
        for i, batch in enumerate(super().__call__(shard_index=shard_index, num_shards=num_shards,
                                                   skip_batches=skip_batches), start=skip_batches):
            yield _no_pair_batch(i) if i in self.empty else batch


def test_reliab_no_pair_step_leaves_adamw_params_and_state_unchanged():
    from twolar_jax.model import network
    from twolar_jax.train_state import TrainState
    from twolar_jax.train_step import make_train_step

    config = tiny_config(dropout_rate=0.0)
    opt = optax.adamw(1e-2, weight_decay=0.5)
    step = jax.jit(make_train_step(PointwiseCrossEncoder(config), opt, None, enable_dropout=False))
    state = TrainState.create(network.init_params(config, 0), opt)
    state, _ = step(state, LISTWISE_GROUP_BATCH.select(synthetic_batch(0)), jax.random.PRNGKey(0))  # moments != 0
    before = jax.device_get((state.params, state.opt_state))
    after, metrics = step(state, LISTWISE_GROUP_BATCH.select(_no_pair_batch(1)), jax.random.PRNGKey(0))
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(jax.device_get(
            (after.params, after.opt_state)))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(after.step) == 2
    assert float(metrics["skipped_no_pairs"]) == 1.0 and float(metrics["num_queries"]) == 0.0
    assert float(metrics["queries_without_pairs"]) == 8.0


def test_reliab_eval_step_gives_a_batch_without_pairs_no_weight():
    from twolar_jax.model import network
    from twolar_jax.train_step import make_eval_step

    config = tiny_config(dropout_rate=0.0)
    eval_step = jax.jit(make_eval_step(PointwiseCrossEncoder(config)))
    metrics = eval_step(network.init_params(config, 0), LISTWISE_GROUP_BATCH.select(_no_pair_batch(0)))
    assert float(metrics["num_queries"]) == 0.0  # was 1.0: a loss of 0 counted as a query in the mean


def test_reliab_no_pair_batch_is_an_error_naming_batch_and_option(tmp_path):
    with pytest.raises(BatchError, match=r"train batch 0: no query has two real passages.*"
                                         r"groups_without_pairs='skip'"):
        train(model_dir=str(tmp_path), train_batches=_NoPairAt({0}), model=tiny_config(), total_steps=3,
              num_devices=1, **run_options())


def test_reliab_skip_groups_without_pairs_counts_logs_and_keeps_the_model(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="twolar_jax.train")
    result = train(model_dir=str(tmp_path), train_batches=_NoPairAt({1}), model=tiny_config(), total_steps=3,
                   num_devices=1, groups_without_pairs="skip", **run_options(log_period=1))
    assert result.step == 3 and result.batches_without_pairs == 1
    from twolar_jax import summaries

    records = summaries.metrics_by_step(tmp_path)
    assert [records[s]["skipped_no_pairs"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert "train batch 1: no query has two real passages" in caplog.text
    with pytest.raises(OptionError, match="train.groups_without_pairs='maybe'"):
        train(model_dir=str(tmp_path / "x"), train_batches=SyntheticSource(), total_steps=1,
              groups_without_pairs="maybe")


def test_reliab_single_candidate_counted_and_logged_at_the_data_boundary(tmp_path, caplog):
    """The training data's boundary (DistillIndex) counts and logs single-candidate queries: with padding='mask'
    they teach nothing (the trainer weighs them 0), so a file full of them must not pass unnoticed."""
    from data_pipeline.distill_format import DistillIndex

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([_distill_line("a"), _distill_line("b", n=1), _distill_line("c", n=1)]) + "\n")
    with caplog.at_level(logging.WARNING, logger="data_pipeline.distill_format"):
        index = DistillIndex(path)
    assert len(index) == 3 and index.single_candidate == 2
    assert f"{path}: 2 of 3 queries have a single candidate" in caplog.text


# -------------------------------------------------------------------- 3. one line, exit 2, --debug
def test_reliab_entry_one_line_exit_2_and_debug_traceback(capsys, monkeypatch):
    monkeypatch.delenv(entry.DEBUG_ENV, raising=False)
    secrets.register_secret("Zq9entrySECRET")

    def fails(exc):
        def main(argv):
            raise exc
        return main

    cases = [FormatError("f.jsonl", 3, "qid", "missing field Zq9entrySECRET"),
             FileNotFoundError(2, "No such file or directory", "/no/such"),
             PermissionError(13, "Permission denied", "/root/x"),
             IsADirectoryError(21, "Is a directory", "/tmp"),
             RuntimeError("Required bindings for `train` not provided in config: ['model_dir']"),
             json.JSONDecodeError("Expecting value", "x", 0)]
    for exc in cases:
        assert entry.run_console("prog", fails(exc), []) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("prog: error: ") and "Zq9entrySECRET" not in err, err
    assert entry.run_console("prog", fails(FormatError("f.jsonl", 3, "qid", "bad")), ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("prog: error: f.jsonl:3: qid: bad")
    assert entry.run_console("prog", fails(ZeroDivisionError("a bug Zq9entrySECRET")), []) == 1  # a bug
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "Zq9entrySECRET" not in err
    assert entry.run_console("prog", lambda argv: len(argv), ["a", "--debug", "b"]) == 2  # --debug removed


def test_reliab_gin_errors_name_the_binding_file_and_line(tmp_path, clean_state):
    from twolar_jax import train as train_module

    train_module.register_configurables()
    with pytest.raises(gin_utils.GinConfigError, match=r"gin binding 'train.total_stepz = 3': gin: "
                                                       r"Configurable 'train' doesn't have a parameter"):
        gin_utils.parse_gin_flags([], ["train.total_stepz = 3"])
    gin.clear_config()
    bad = tmp_path / "bad.gin"
    bad.write_text("train.seed = 1\nnope.x = 2\n")
    with pytest.raises(gin_utils.GinConfigError, match=rf"{bad}:2: gin: No configurable matching 'nope'"):
        gin_utils.parse_gin_flags([str(bad)])
    gin.clear_config()
    with pytest.raises(gin_utils.GinConfigError, match="binding 'MYKEY = None  # redacted': gin: "):
        gin_utils.parse_gin_flags([], ["MYKEY = 'Zq9ginSECRET' oops"])
    gin.clear_config()
    with pytest.raises(gin_utils.GinConfigError, match="required macro DISTILL_JSONL is not set"):
        gin_utils.parse_gin_flags(["experiments/tiny_smoke.gin"], [f"MODEL_DIR = '{tmp_path}'"])
    gin.clear_config()
    with pytest.raises(gin_utils.GinConfigError, match=r"gin binding 'train.seed = \(1': gin: cannot parse"):
        gin_utils.parse_gin_flags([], ["train.seed = (1"])


def _write_distill(path: Path, n: int, bad_line: str | None = None) -> Path:
    lines = [_distill_line(f"q{i}", n=5) for i in range(n)]
    if bad_line is not None:
        lines.insert(2, bad_line)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_reliab_train_cli_malformed_jsonl_is_one_line(tmp_path, capsys, clean_state):
    from twolar_jax.train import console_main

    data = _write_distill(tmp_path / "d.jsonl", 8, bad_line='{"qid": "x", "query": "q", "query_type": "t", '
                                                            '"candidates": [{"docid": 3}]}')
    code = console_main(["--gin_file=experiments/tiny_smoke.gin", f"--gin.MODEL_DIR='{tmp_path / 'm'}'",
                         f"--gin.DISTILL_JSONL='{data}'", "--no_compile_cache"])
    err = capsys.readouterr().err
    assert code == 2
    assert _error_lines(err, "twolar-train") == [
        f"twolar-train: error: {data}:3: candidates[0].docid: expected a string, got int [in DistillFiles]"]
    assert "Traceback" not in err


def test_reliab_train_cli_bad_binding_and_missing_macro(tmp_path, capsys, clean_state):
    from twolar_jax.train import console_main

    code = console_main(["--gin_file=experiments/tiny_smoke.gin", f"--gin.MODEL_DIR='{tmp_path}'",
                         "--gin.DISTILL_JSONL='x.jsonl'", "--gin.train.total_stepz=3", "--no_compile_cache"])
    err = capsys.readouterr().err
    assert code == 2 and _error_lines(err, "twolar-train") == [
        "twolar-train: error: gin binding 'train.total_stepz = 3': gin: Configurable 'train' doesn't have a "
        "parameter named 'total_stepz'."]
    gin.clear_config()
    code = console_main(["--gin_file=experiments/tiny_smoke.gin", f"--gin.MODEL_DIR='{tmp_path}'",
                         "--no_compile_cache"])
    assert code == 2 and "required macro DISTILL_JSONL is not set" in capsys.readouterr().err


def test_reliab_train_cli_log_level_resume_skip_invalid_and_export_only(tmp_path, capsys, clean_state):
    """--log_level INFO shows the library's lines (mesh, checkpoints, resume); --skip_invalid skips and
    counts a bad line; --export_only needs only --model_dir (or --gin.MODEL_DIR) and --export_hf."""
    from twolar_jax.hf_conversion import load_hf_checkpoint
    from twolar_jax.train import console_main

    data = _write_distill(tmp_path / "d.jsonl", 8, bad_line='{"qid": "bad"')
    model_dir = tmp_path / "m"
    common = ["--gin_file=experiments/tiny_smoke.gin", f"--model_dir={model_dir}", f"--gin.DISTILL_JSONL='{data}'",
              "--gin.CheckpointConfig.period=1", "--gin.CheckpointConfig.async_save=False",
              "--gin.LoggingConfig.tensorboard=False", "--no_compile_cache", "--log_level=INFO", "--skip_invalid"]
    assert console_main([*common, "--gin.TRAIN_STEPS=1"]) == 0
    err = capsys.readouterr().err
    assert "twolar_jax.train INFO mesh" in err and "checkpoint for step 1" in err
    assert f"skipping invalid line: {data}:3: line: malformed JSON" in err
    assert "skipped 1 invalid of 9 lines" in err
    gin.clear_config()
    assert console_main([*common, "--gin.TRAIN_STEPS=2"]) == 0
    err = capsys.readouterr().err
    assert f"resumed from step 1 (checkpoint {model_dir}/checkpoints/1" in err
    gin.clear_config()
    assert console_main([*common[1:], "--gin.TRAIN_STEPS=3", "--log_level=WARNING"]) == 2  # no run gin file
    assert "twolar-train: error: train() missing 3 required keyword-only arguments" in capsys.readouterr().err
    gin.clear_config()
    assert console_main(["--export_only", f"--model_dir={model_dir}", f"--export_hf={tmp_path / 'hf'}",
                         "--no_compile_cache"]) == 0
    gin.clear_config()
    assert console_main(["--export_only", f"--gin.MODEL_DIR='{model_dir}'", f"--export_hf={tmp_path / 'hf2'}",
                         "--export_step=1", "--no_compile_cache"]) == 0
    assert load_hf_checkpoint(tmp_path / "hf")[0].d_model == load_hf_checkpoint(tmp_path / "hf2")[0].d_model
    gin.clear_config()
    assert console_main(["--export_only", f"--export_hf={tmp_path / 'hf3'}", "--no_compile_cache"]) == 2
    assert "--export_only needs --model_dir=DIR" in capsys.readouterr().err


def test_reliab_metrics_have_no_duplicates_after_a_crash(tmp_path):
    from twolar_jax import summaries

    options = dict(model=tiny_config(), total_steps=5, num_devices=1, **run_options(save_period=2, log_period=1))
    with pytest.raises(RuntimeError, match="simulated preemption"):
        train(model_dir=str(tmp_path), train_batches=SyntheticSource(fail_after=3), **options)
    steps = [r["step"] for r in summaries.read_metrics(tmp_path)]
    assert steps == [1, 2, 3]  # the checkpoint is at step 2: step 3 will run again
    train(model_dir=str(tmp_path), train_batches=SyntheticSource(), **options)
    assert [r["step"] for r in summaries.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_reliab_demo_empty_stages_and_uncreatable_output_dir(tmp_path, capsys, clean_state):
    from twolar_jax.demo import console_main

    assert console_main(["--stages=", f"--output_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err, "twolar demo") == ["twolar demo: error: --stages='': name at least one of "
                                                "('build', 'train', 'eval', 'report')"]
    assert console_main(["--stages=train,nope", f"--output_dir={tmp_path / 'o'}"]) == 2
    assert "unknown stages ['nope']" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert console_main(["--stages=report", f"--output_dir={blocker / 'sub'}"]) == 2
    err = capsys.readouterr().err
    assert _error_lines(err, "twolar demo") == [
        f"twolar demo: error: --output_dir {blocker / 'sub'}: {blocker} is a file, not a directory"]
    assert console_main(["--stages=report", f"--output_dir={tmp_path / 'o2'}"]) == 2
    assert "the report needs the eval stage" in capsys.readouterr().err
    assert console_main(["--typo_flag", f"--output_dir={tmp_path / 'o'}"]) == 2
    assert "unknown arguments ['--typo_flag']" in capsys.readouterr().err


def test_reliab_truncated_safetensors_is_a_checkpoint_error(tmp_path):
    from safetensors.numpy import save_file

    from twolar_jax.hf_conversion import read_hf_tensors

    save_file({"shared.weight": np.ones((4, 4), np.float32)}, str(tmp_path / "model.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    for cut in (4, 20, len(data) - 8):
        (tmp_path / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=rf"{tmp_path / 'model.safetensors'}: not a readable safetensors"):
            read_hf_tensors(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json:1: invalid JSON"):
        read_hf_tensors(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weights": {}}')
    with pytest.raises(CheckpointError, match=r"index.json: weight_map: missing field"):
        read_hf_tensors(tmp_path)


def test_reliab_hf_config_wrong_types_are_checkpoint_errors(tmp_path):
    from twolar_jax.hf_conversion import read_hf_config

    path = tmp_path / "config.json"
    for text, what in [('{"model_type": "t5", "d_model": null}', "config.json"),
                       ('{"model_type": "t5", "num_layers": 1e400}', "config.json"),
                       ('["t5"]', "expected a JSON object"), ('{"model_type": "t5", "d_model": "x"}', "config.json"),
                       ('{"model_type": "t5", "d_model": 0}', "d_model")]:
        path.write_text(text)
        with pytest.raises(CheckpointError, match=what) as info:
            read_hf_config(tmp_path)
        assert str(path) in str(info.value)


# ----------------------------------------------------------------------- 4. options where given
def test_reliab_train_options_checked_before_anything_is_written(tmp_path):
    cases = [(dict(loss="rank_nett"), "loss='rank_nett'"), (dict(score_head="logit"), "score_head='logit'"),
             (dict(mesh_shape=(1, 1, 1, 1)), "mesh shape"), (dict(model_overrides={"dtype": "float16"}),
                                                             "train.model_overrides=.*dtype"),
             (dict(model="tinyy"), "train.model='tinyy'"), (dict(total_steps=-1), "total_steps"),
             (dict(groups_without_pairs="skipp"), "groups_without_pairs")]
    for kw, match in cases:
        model_dir = tmp_path / "never"
        options = dict(model="tiny", total_steps=1, num_devices=1, logging_config=QUIET) | kw
        with pytest.raises(OptionError, match=match):
            train(model_dir=str(model_dir), train_batches=SyntheticSource(), **options)
        assert not model_dir.exists(), kw


def test_reliab_eval_options_checked_at_flag_parsing(tmp_path, capsys, clean_state):
    from eval.run import console_main

    out = tmp_path / "out"
    for binding, what in [("--gin.RerankerConfig.dtype='float16'", "RerankerConfig.dtype='float16': expected one of"),
                          ("--gin.RerankerConfig.score_head='logit'", "RerankerConfig.score_head='logit'"),
                          ("--gin.RerankerConfig.truncation='middle'", "RerankerConfig.truncation='middle'"),
                          ("--gin.evaluate.mode='dense'", "evaluate.mode='dense'"),
                          ("--gin.MESH_SHAPE=(3, 1, 1)",
                           "RerankerConfig.mesh_shape: mesh shape (3, 1, 1) needs 3 devices"),
                          ("--gin.MESH_SHAPE=(-1, 1)", "RerankerConfig.mesh_shape=(-1, 1): expected three integers")]:
        gin.clear_config()
        code = console_main(["--gin_file=eval/trec_dl19.gin", f"--gin.evaluate.output_dir='{out}'",
                             "--gin.RerankerConfig.checkpoint='/nope'", binding, "--no_compile_cache"])
        err = capsys.readouterr().err
        assert code == 2 and len(_error_lines(err, "twolar-eval")) == 1 and what in err, err
    gin.clear_config()
    assert console_main(["--gin_file=eval/trec_dl19.gin", "--gin.evaluate.mode='bm25'", "--gin.evaluate.output_dir=None",
                         "--no_compile_cache"]) == 2
    assert "evaluate.output_dir is required" in capsys.readouterr().err
    gin.clear_config()
    assert console_main(["--gin_file=eval/trec_dl19.gin", f"--gin.evaluate.output_dir='{out}'",
                         "--no_compile_cache"]) == 2
    assert "needs RerankerConfig.checkpoint" in capsys.readouterr().err
    assert not out.exists()  # nothing was read or written


# ------------------------------------------------------------- 6. --help: flags, gin files, macros
HELP_CASES = [
    ("twolar_jax.train", "console_main", ["--skip_invalid", "--model_dir", "--log_level", "--no_compile_cache",
                                          "experiments/tiny_smoke.gin", "models/flan_t5_large.gin",
                                          "mesh/fsdp.gin", "runs/distill_train.gin", "MODEL_DIR", "DISTILL_JSONL"]),
    ("eval.run", "console_main", ["--log_level", "--debug", "eval/trec_dl19.gin", "eval/beir.gin", "mesh/fsdp.gin",
                                  "RerankerConfig.checkpoint"]),
    ("data_pipeline.set_builder.cli", "console_main", ["--log_level", "runs/build_scifact_offline.gin",
                                                       "runs/build_msmarco_openai.gin", "OUTPUT_DIR",
                                                       "MSMARCO_COLLECTION"]),
    ("twolar_jax.demo", "console_main", ["--stages", "--output_dir", "experiments/demo_quick.gin", "--debug"]),
    ("eval.trec", "main", ["--qrels", "--run", "--debug", "gin files: none"]),
    ("eval.reference", "main", ["--datasets", "--debug", "gin files: none"]),
]


@pytest.mark.parametrize("module,function,expected", HELP_CASES, ids=[c[0] for c in HELP_CASES])
def test_reliab_help_lists_flags_gin_files_and_required_macros(module, function, expected, capsys):
    import importlib

    with pytest.raises(SystemExit) as info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, (module, text)


def test_reliab_twolar_dispatches_every_command(capsys):
    from twolar_jax import cli

    assert cli.main(["--help"]) == 0 and "reference" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2 and capsys.readouterr().err.startswith("twolar: error: unknown command 'nope'")
    with pytest.raises(SystemExit):
        cli.main(["build", "--help"])
    assert "runs/build_msmarco_openai.gin" in capsys.readouterr().out


def test_reliab_compile_cache_on_by_default_and_off_by_flag_or_env(tmp_path, monkeypatch, clean_state):
    previous = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("TWOLAR_COMPILE_CACHE", str(tmp_path / "cache"))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        entry.start(argparse.Namespace(log_level="WARNING", no_compile_cache=True))
        assert not jax.config.jax_compilation_cache_dir
        entry.start(argparse.Namespace(log_level="WARNING", no_compile_cache=False))
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")
        jax.config.update("jax_compilation_cache_dir", None)
        monkeypatch.setenv("TWOLAR_COMPILE_CACHE", "off")
        entry.start(argparse.Namespace(log_level="WARNING", no_compile_cache=False))
        assert not jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
