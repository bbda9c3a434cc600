"""A non-editable install works from any directory: the wheel carries the gin files and the demo data."""
import json
import subprocess
import sys
import zipfile

import pytest

REPO_MODULES = ("twolar_jax", "retrieval", "data_pipeline", "eval")


def _run(installed_wheel, *args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=installed_wheel["cwd"], env=installed_wheel["env"],
                          capture_output=True, text=True, timeout=timeout)


def test_wheel_holds_gin_files_and_demo_data(installed_wheel, repo_root):
    names = set(zipfile.ZipFile(installed_wheel["wheel"]).namelist())
    gin_files = {f"twolar_jax/_packaged/gin/{p.relative_to(repo_root / 'gin')}" for p in (repo_root / "gin").rglob("*.gin")}
    assert gin_files and gin_files <= names
    for data in ("README.md", "beir/scifact/corpus.jsonl", "beir/scifact/train_claims.jsonl"):
        assert f"twolar_jax/_packaged/data/{data}" in names  # the demo's data, with its licence notes
    assert not any(n.startswith("gin/") or "__init__" in n and "_packaged/gin" in n for n in names)
    assert {n.split("/")[0] for n in names if n.endswith(".py")} == set(REPO_MODULES)
    packages = {str(init.parent.relative_to(repo_root)) for top in REPO_MODULES
                for init in (repo_root / top).rglob("__init__.py")}
    assert {f"{package}/__init__.py" for package in packages} <= names  # every subpackage, e.g. twolar_jax/aot


def test_wheel_compile_help_from_another_directory(installed_wheel):
    proc = _run(installed_wheel, "-m", "twolar_jax.aot", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--topology" in proc.stdout


def test_wheel_imports_resolve_to_the_installed_copy(installed_wheel):
    code = ("import json, twolar_jax, eval.trec, retrieval, data_pipeline.set_builder; "
            "from twolar_jax import resources; "
            "print(json.dumps([twolar_jax.__file__, eval.trec.__file__, str(resources.gin_dir()), "
            "str(resources.data_dir())]))")
    proc = _run(installed_wheel, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    site = str(installed_wheel["site"])
    assert all(path.startswith(site) for path in json.loads(proc.stdout))


def test_wheel_demo_help_from_another_directory(installed_wheel):
    proc = _run(installed_wheel, "-m", "twolar_jax.demo", "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout and "--stages" in proc.stdout


def test_wheel_eval_trec_from_another_directory(installed_wheel, data_dir):
    proc = _run(installed_wheel, "-m", "eval.trec", "--qrels", str(data_dir / "trec_dl" / "qrels.dl19-passage.txt"),
                "--run", str(data_dir / "trec_dl" / "run.bm25.dl19.top100.trec"), "--measures", "nDCG@10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert round(json.loads(proc.stdout)["nDCG@10"], 4) == 0.5058


@pytest.mark.slow
@pytest.mark.bm25
def test_wheel_eval_job_on_shipped_data_without_a_checkout(installed_wheel, tmp_path):
    """twolar-eval's gin job (an included base file, the shipped SciFact) with no --gin_search_paths."""
    out = tmp_path / "eval"
    proc = _run(installed_wheel, "-m", "eval.run", "--gin_file=eval/beir_scifact.gin", "--gin.evaluate.mode='bm25'",
                f"--gin.evaluate.output_dir='{out}'", f"--gin.FirstStage.cache_dir='{tmp_path / 'cache'}'",
                "--gin.evaluate.max_queries=20", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "beir_scifact" / "metrics.json").read_text())
    assert metrics["num_queries"] == 20 and 0.3 < metrics["mean"]["nDCG@10"] <= 1.0
