"""Hostile inputs to `twolar`, `twolar-train`, `twolar compile`, `twolar-build`, the demo and the TFDS builder,
each run as a user runs it (a subprocess, no JAX_PLATFORMS): exit code 2 and exactly one stderr line that
names the option, binding, path or file line at fault, with nothing created."""
import json

import pytest

from console_cases import Case, assert_one_line, case_names, console_script, python_m, run_all

LONG = "n" * 300  # over every file system's 255-byte name limit


def _distill_line(qid: str, n: int = 4) -> str:
    return json.dumps({"qid": qid, "query": f"query {qid}", "query_type": "t",
                       "candidates": [{"docid": f"{qid}-d{j}", "text": f"passage {j} of {qid}", "source": "s"}
                                      for j in range(n)]})


def _cases(tmp) -> list[Case]:
    good = tmp / "good.jsonl"
    good.write_text("".join(_distill_line(f"q{i}") + "\n" for i in range(4)))
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    bad = tmp / "bad.jsonl"
    bad.write_text(_distill_line("q0") + "\n" + '{"qid": "q1", "query": "x", "query_type": "t", "candidates": [{"docid": 3}]}\n')
    afile = tmp / "afile"
    afile.write_text("not a folder")
    model = tmp / "model"
    smoke = ["--gin_file=experiments/tiny_smoke.gin", f"--gin.DISTILL_JSONL='{good}'"]
    train = lambda *a: python_m("twolar_jax.train", *a)  # noqa: E731
    aot = lambda *a: python_m("twolar_jax.aot", *a)  # noqa: E731
    build = lambda *a: python_m("data_pipeline.set_builder", *a)  # noqa: E731
    demo = lambda *a: python_m("twolar_jax.demo", *a)  # noqa: E731
    tfds = lambda *a: python_m("data_pipeline.seqio_input.tfds_builder", *a)  # noqa: E731
    return [
        # twolar: the dispatcher
        Case("twolar_no_command", console_script("twolar"), ("twolar: error:", "no command given")),
        Case("twolar_unknown_command", console_script("twolar", "trian"), ("unknown command 'trian'",)),
        Case("twolar_rerank_unknown_flag", console_script("twolar", "rerank", "--checkpoint", "x", "--run", "y",
                                                          "--output", "z", "--bogus"), ("--bogus",)),
        Case("twolar_trec_missing_qrels", console_script("twolar", "trec", "--qrels", str(tmp / "none.txt"),
                                                         "--run", str(good)), ("none.txt",)),
        Case("twolar_compile_bad_topology", console_script("twolar", "compile", "--topology=v9z:1x1", "--job=score",
                                                           "--gin_file=models/tiny.gin"), ("v9z",)),
        # twolar-train
        Case("train_no_gin_file", console_script("twolar-train"), ("no --gin_file given",)),
        Case("train_missing_model_dir", train(*smoke), ("MODEL_DIR",)),
        Case("train_bad_dtype", train(*smoke, f"--model_dir={model}", "--gin.model_preset.dtype='float17'"),
             ("model_preset.dtype='float17'",), (str(model),)),
        Case("train_unknown_preset_field", train(*smoke, f"--model_dir={model}", "--gin.model_preset.bogus_field=1"),
             ("model_preset.bogus_field",), (str(model),)),
        Case("train_empty_jsonl", train("--gin_file=experiments/tiny_smoke.gin", f"--gin.DISTILL_JSONL='{empty}'",
                                        f"--model_dir={model}"), (str(empty), "no records"), (str(model),)),
        Case("train_malformed_jsonl", train("--gin_file=experiments/tiny_smoke.gin", f"--gin.DISTILL_JSONL='{bad}'",
                                            f"--model_dir={model}"), (f"{bad}:2:", "docid"), (str(model),)),
        Case("train_model_dir_under_a_file", train(*smoke, f"--model_dir={afile}/run"),
             ("--model_dir", "is a file, not a directory")),
        Case("train_model_dir_name_too_long", train(*smoke, f"--model_dir={tmp / LONG}"),
             ("--model_dir", "File name too long")),
        Case("train_unknown_flag", train(*smoke, "--modle_dir=x"), ("unknown arguments", "--modle_dir")),
        Case("train_negative_steps", train(*smoke, f"--model_dir={model}", "--gin.TRAIN_STEPS=-1"),
             ("train.total_steps",), (str(model),)),
        Case("train_bad_log_level", train(*smoke, "--log_level=LOUD"), ("--log_level", "LOUD")),
        # twolar compile
        Case("compile_no_topology", aot("--job=score", "--gin_file=models/tiny.gin"), ("--topology",)),
        Case("compile_bad_topology", aot("--topology=v5e:3x7", "--job=score", "--gin_file=models/tiny.gin"),
             ("3x7",)),
        Case("compile_unbound_steps", aot("--topology=v5e:2x2", "--job=train", "--gin_file=models/tiny.gin",
                                          "--gin.TRAIN_STEPS=None"), ("train.total_steps",)),
        Case("compile_bad_dtype", aot("--topology=v5e:2x2", "--job=score", "--gin_file=models/tiny.gin",
                                      "--gin.model_preset.dtype='float17'"), ("model_preset.dtype",)),
        Case("compile_zero_batch", aot("--topology=v5e:2x2", "--job=score", "--gin_file=models/tiny.gin",
                                       "--batch_size=0"), ("--batch_size", "must be >= 1")),
        Case("compile_dump_dir_under_a_file", aot("--topology=v5e:2x2", "--job=score", "--gin_file=models/tiny.gin",
                                                  f"--dump_dir={afile}/dump"), ("--dump_dir", "not a directory")),
        Case("compile_score_names_no_model", aot("--topology=v5e:2x2", "--job=score", "--gin_file=mesh/fsdp.gin"),
             ("name no model", "MODEL_CONFIG")),
        Case("compile_missing_gin_file", aot("--topology=v5e:2x2", "--gin_file=models/nope.gin"), ("nope.gin",)),
        # twolar-build
        Case("build_no_output_dir", build("--gin_file=runs/build_scifact_offline.gin"), ("OUTPUT_DIR",)),
        Case("build_output_under_a_file", build("--gin_file=runs/build_scifact_offline.gin",
                                                f"--gin.OUTPUT_DIR='{afile}/out'"), ("OUTPUT_DIR", "not a directory")),
        Case("build_output_name_too_long", build("--gin_file=runs/build_scifact_offline.gin",
                                                 f"--gin.OUTPUT_DIR='{tmp / LONG}'"), ("OUTPUT_DIR", "too long")),
        Case("build_missing_corpus", build("--gin_file=runs/build_scifact_offline.gin",
                                           f"--gin.OUTPUT_DIR='{tmp / 'b'}'", f"--gin.build.corpus_path='{tmp}/c.jsonl'"),
             ("build.corpus_path", "c.jsonl"), (str(tmp / "b"),)),
        Case("build_unknown_binding", build("--gin_file=runs/build_scifact_offline.gin",
                                            f"--gin.OUTPUT_DIR='{tmp / 'b'}'", "--gin.build.num_querys=3"),
             ("num_querys",), (str(tmp / "b"),)),
        # the demo
        Case("demo_unknown_stage", demo("--stages=build,tune", f"--output_dir={tmp / 'd'}"), ("--stages", "tune"),
             (str(tmp / "d"),)),
        Case("demo_output_under_a_file", demo(f"--output_dir={afile}/demo"), ("--output_dir", "not a directory")),
        Case("demo_output_name_too_long", demo(f"--output_dir={tmp / LONG}"), ("--output_dir", "too long")),
        Case("demo_unknown_flag", demo("--quik"), ("--quik",)),
        Case("demo_bad_binding", demo(f"--output_dir={tmp / 'd'}", "--gin.train.total_stepz=3"), ("total_stepz",),
             (str(tmp / "d"),)),
        # the TFDS builder
        Case("tfds_no_data_dir", tfds(f"--train_path={good}"), ("--data_dir",)),
        Case("tfds_missing_train", tfds(f"--train_path={tmp / 'none.jsonl'}", f"--data_dir={tmp / 't'}"),
             ("--train_path", "not found")),
        Case("tfds_empty_train", tfds(f"--train_path={empty}", f"--data_dir={tmp / 't'}"), (str(empty), "no records"),
             (str(tmp / "t"),)),
        Case("tfds_malformed_train", tfds(f"--train_path={bad}", f"--data_dir={tmp / 't'}"), (f"{bad}:2:",),
             (str(tmp / "t"),)),
        Case("tfds_data_dir_under_a_file", tfds(f"--train_path={good}", f"--data_dir={afile}/t"), ("--data_dir",)),
    ]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_line")
    cases = {c.name: c for c in _cases(tmp)}
    return cases, run_all(list(cases.values()), cwd=str(tmp))


@pytest.mark.parametrize("name", case_names(_cases))
def test_one_line_train_build_compile_demo(name, outcomes):
    cases, results = outcomes
    assert_one_line(cases[name], results[name])


def test_one_line_table_covers_each_command_five_times():
    names = case_names(_cases)
    for prefix in ("twolar_", "train_", "compile_", "build_", "demo_", "tfds_"):
        assert sum(n.startswith(prefix) for n in names) >= 5, prefix
