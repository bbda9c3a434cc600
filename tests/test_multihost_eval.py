"""Eval on a pod without a pod: `python -m eval.run --multiprocess` and `python -m eval.rerank_run
--multiprocess` as two processes of four CPU devices each (jax.distributed on localhost), against the same
jobs in one process of four devices.

What one process never exercises: each host scores its share of the queries (query i on host i % 2) on
its own devices into its own score log, and process 0 gathers both logs after a barrier and writes the
one run file, metrics and tables; process 1 writes nothing but its log (tests/multihost_eval_worker.py
records every file each process renames into place). One query per scoring call (pairs_per_call =
top_k) and the same devices per process give both runs the same batches on the same per-device shapes,
so every output must be equal byte for byte. (One process of eight devices puts one row of each batch
on a device where a host of four puts two, which moves scores by up to 9 fp32 ulps: a looser test.)
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.os_helpers import cpu_devices_env, free_port

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "multihost_eval_worker.py"
HOSTS, DEVICES_PER_HOST = 2, 4
TIMEOUT_S = 300
QUERIES, TOP_K = 5, 8
SCORING = ["--batch_size", "8", "--max_length", "128", "--pairs_per_call", str(TOP_K), "--log_level", "WARNING"]


def _start_hosts(record: Path, module: str, *args: str) -> list[subprocess.Popen]:
    """Every host of one multi-host job; host i records what it wrote in `record`.i.json."""
    port = free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), f"{record}.{i}.json", module, *args, "--multiprocess",
                              f"--coordinator_address=localhost:{port}", f"--process_count={HOSTS}",
                              f"--process_index={i}"], cwd=REPO, env=cpu_devices_env(DEVICES_PER_HOST),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(HOSTS)]


def _wait_hosts(procs: list[subprocess.Popen], record: Path) -> list[tuple[str, list[str]]]:
    """(stdout, files written) of each host once all exited 0; a host that fails or hangs fails the test
    with every host's last lines (the others would wait for it at the barrier)."""
    outputs, failed = [], False
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            failed = True
        failed |= proc.returncode != 0
        outputs.append((out, err))
    if failed:
        pytest.fail("\n".join(f"--- host {i} (rc {p.returncode}):\n{err[-2500:]}"
                              for i, (p, (_, err)) in enumerate(zip(procs, outputs))))
    return [(_printed(out), json.loads(Path(f"{record}.{i}.json").read_text())) for i, (out, _) in enumerate(outputs)]


def _printed(stdout: str) -> str:
    """What the job printed: without the lines gloo (JAX's CPU collectives) prints as it connects."""
    return "".join(line for line in stdout.splitlines(keepends=True) if not line.startswith("[Gloo]"))


# The one-process reference: both jobs in one interpreter (one start-up), as their commands would run them.
REFERENCE = ("import json, sys\n"
             "import gin\n"
             "from eval import rerank_run\n"
             "from eval.run import console_main\n"
             "eval_args, rerank_args = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
             "assert console_main(eval_args) == 0\n"
             "gin.clear_config()\n"
             "print('METRICS', flush=True)\n"
             "assert rerank_run.main(rerank_args) == 0\n")


def _start_reference(eval_args: list[str], rerank_args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", REFERENCE, json.dumps(eval_args), json.dumps(rerank_args)],
                            cwd=REPO, env=cpu_devices_env(DEVICES_PER_HOST), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _names(paths: list[str], root: Path) -> set[str]:
    return {str(Path(p).relative_to(root.resolve())) for p in paths}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from twolar_jax.hf_conversion import save_hf_checkpoint
    from twolar_jax.model.config import preset
    from twolar_jax.model.network import init_params

    return save_hf_checkpoint(tmp_path_factory.mktemp("mh_ckpt") / "hf", preset("tiny"), init_params(preset("tiny"), 7))


def _eval_args(ckpt: Path, out: Path) -> list[str]:
    return ["--gin_file=eval/trec_dl19.gin", f"--gin.RerankerConfig.checkpoint='{ckpt}'",
            f"--gin.evaluate.output_dir='{out}'", f"--gin.evaluate.max_queries={QUERIES}",
            f"--gin.evaluate.top_k={TOP_K}", f"--gin.evaluate.pairs_per_call={TOP_K}",
            "--gin.RerankerConfig.batch_size=8", "--gin.RerankerConfig.max_length=128", "--log_level=WARNING"]


def _rerank_args(ckpt: Path, cands: Path, out: Path, data_dir: Path) -> list[str]:
    return ["--checkpoint", str(ckpt), "--run", str(cands), "--output", str(out), "--top_k", str(TOP_K),
            "--qrels", str(data_dir / "trec_dl" / "qrels.dl19-passage.txt"), *SCORING]


@pytest.mark.slow
def test_multihost_eval_and_rerank_run_equal_one_process(ckpt, data_dir, tmp_path):
    cands = tmp_path / "cands.json"
    cands.write_text(json.dumps(json.loads((data_dir / "trec_dl" / "dl19_bm25_top100.json").read_text())[:QUERIES]))
    pod, ref = tmp_path / "pod", tmp_path / "ref"
    # Both multi-host jobs and the reference at once (five processes).
    eval_hosts = _start_hosts(tmp_path / "eval_written", "eval.run", *_eval_args(ckpt, pod / "eval"))
    rerank_hosts = _start_hosts(tmp_path / "rerank_written", "eval.rerank_run",
                                *_rerank_args(ckpt, cands, pod / "rr" / "run.trec", data_dir))
    reference = _start_reference(_eval_args(ckpt, ref / "eval"),
                                 _rerank_args(ckpt, cands, ref / "rr" / "run.trec", data_dir))
    eval_done = _wait_hosts(eval_hosts, tmp_path / "eval_written")
    rerank_done = _wait_hosts(rerank_hosts, tmp_path / "rerank_written")
    ref_out, ref_err = reference.communicate(timeout=TIMEOUT_S)
    assert reference.returncode == 0, ref_err[-3000:]
    ref_metrics = json.loads(_printed(ref_out).split("METRICS\n", 1)[1].strip().splitlines()[-1])

    # The eval job: process 0 wrote the run, metrics and tables, equal to one process's; process 1 only
    # its own score log.
    a, b = pod / "eval", ref / "eval"
    for name in ("trec_dl_dl19/run.trec", "trec_dl_dl19/first_stage.trec", "trec_dl_dl19/metrics.json", "results.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    results = [{k: v for k, v in json.loads((d / "results.json").read_text()).items() if k != "seconds"} for d in (a, b)]
    assert results[0] == results[1]
    assert len(json.loads((a / "trec_dl_dl19" / "metrics.json").read_text())["per_query"]) == QUERIES
    (out0, wrote0), (out1, wrote1) = eval_done
    assert _names(wrote0, a) >= {"trec_dl_dl19/run.trec", "trec_dl_dl19/metrics.json", "results.md", "results.json",
                                 "config.gin", "trec_dl_dl19/first_stage.trec"}
    assert _names(wrote1, a) == {"trec_dl_dl19/scores.host1-of-2.meta.json"}
    assert "| trec_dl/dl19 |" in out0 and out1 == ""
    logs = sorted(p.name for p in (a / "trec_dl_dl19").glob("scores*.jsonl"))
    assert logs == ["scores.host0-of-2.jsonl", "scores.host1-of-2.jsonl"]
    assert [len((a / "trec_dl_dl19" / n).read_text().splitlines()) for n in logs] == [3, 2]  # queries 0,2,4 | 1,3

    # rerank_run: the same, its metrics JSON printed by process 0 alone.
    assert (pod / "rr" / "run.trec").read_bytes() == (ref / "rr" / "run.trec").read_bytes()
    (out0, wrote0), (out1, wrote1) = rerank_done
    assert json.loads(out0.strip().splitlines()[-1]) == ref_metrics and out1 == ""
    assert "run.trec" in _names(wrote0, pod / "rr")
    assert _names(wrote1, pod / "rr") == {"run.trec.scores.host1-of-2.meta.json"}


def test_multihost_eval_gather_reads_every_host_log_and_refuses_stale_or_short_ones(tmp_path):
    """Process 0's gather, without processes: every host's log in request order, and a log written for
    other candidates or missing a query of its host's share is an error, never a hole in the run."""
    from eval import multihost, score_log
    from retrieval.readers import RankCandidate, RankRequest

    requests = [RankRequest(f"q{i}", f"query {i}", [RankCandidate(f"d{i}{j}", 0.0, f"text {j}") for j in range(3)])
                for i in range(5)] + [RankRequest("q5", "no candidates", [])]
    model_key = {"checkpoint": {"path": "/m"}, "score_head": "difference"}
    log, meta = tmp_path / "scores.jsonl", tmp_path / "scores.meta.json"

    def write_host(host: int, logged: int) -> None:
        mine = multihost.share(requests, host, 2)  # host 0: q0 q2 q4, host 1: q1 q3 q5
        key = {**model_key, "candidates": score_log.candidates_digest(mine, 2)}
        path = score_log.open_score_log(multihost.host_path(log, ".jsonl", host, 2),
                                        multihost.host_path(meta, ".meta.json", host, 2), key)
        path.write_text("".join(json.dumps({"qid": r.qid, "scores": {c.docid: float(k) for k, c in
                                                                     enumerate(r.candidates[:2])}}) + "\n"
                                for r in mine[:logged] if r.candidates))

    write_host(0, 3)
    write_host(1, 3)
    assert multihost.process_layout() == (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "scores.host0-of-2.jsonl", "scores.host0-of-2.meta.json", "scores.host1-of-2.jsonl", "scores.host1-of-2.meta.json"]
    kw = dict(log_path=log, meta_path=meta, model_key=model_key, count=2)
    run = multihost.gather(requests, top_k=2, **kw)
    assert list(run) == [r.qid for r in requests] and run["q5"] == {} and run["q3"] == {"d30": 0.0, "d31": 1.0}
    with pytest.raises(RuntimeError, match="host 0's score log was written for another model or candidates"):
        multihost.gather(requests, top_k=3, **kw)
    write_host(1, 1)
    with pytest.raises(RuntimeError, match=r"host 1 finished without the scores of queries \['q3'\]"):
        multihost.gather(requests, top_k=2, **kw)
