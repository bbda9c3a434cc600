"""gin/ is plain data (never a package) and every model file builds exactly its named preset."""
from pathlib import Path

import gin
import pytest

from twolar_jax import gin_configurables  # noqa: F401  (registers T5Config)
from twolar_jax.gin_utils import GIN_DIR, parse_gin_flags, rewrite_gin_args, split_gin_args
from twolar_jax.model.config import preset

MODEL_FILES = {
    "t5_small": "t5-small", "t5_base": "t5-base", "t5_large": "t5-large", "t5_3b": "t5-3b",
    "flan_t5_small": "flan-t5-small", "flan_t5_base": "flan-t5-base", "flan_t5_large": "flan-t5-large",
    "flan_t5_xl": "flan-t5-xl", "flan_t5_xxl": "flan-t5-xxl", "tiny": "tiny",
}


def test_import_gin_is_gin_config():
    assert hasattr(gin, "parse_config_files_and_bindings")
    assert "site-packages" in gin.__file__
    assert not (GIN_DIR / "__init__.py").exists()
    assert not list(GIN_DIR.rglob("__init__.py"))


@pytest.mark.parametrize("name", sorted(MODEL_FILES))
def test_model_gin_file_equals_preset(name):
    gin.clear_config()
    parse_gin_flags([f"models/{name}.gin"])
    built = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    gin.clear_config()
    assert built == preset(MODEL_FILES[name])


def test_every_model_preset_has_a_file():
    assert {p.stem for p in (GIN_DIR / "models").glob("*.gin")} == set(MODEL_FILES)


def test_gin_flag_rewriting():
    argv = ["--gin_file=models/tiny.gin", "--gin.T5Config.dtype='bfloat16'", "--gin_search_paths=/a,/b", "--other"]
    assert rewrite_gin_args(argv)[1] == "--gin_bindings=T5Config.dtype = 'bfloat16'"
    files, bindings, paths, rest = split_gin_args(argv)
    assert files == ["models/tiny.gin"] and bindings == ["T5Config.dtype = 'bfloat16'"]
    assert paths == ["/a", "/b"] and rest == ["--other"]
    gin.clear_config()
    parse_gin_flags(files, bindings)
    assert gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn().dtype == "bfloat16"
    gin.clear_config()
    with pytest.raises(SystemExit, match="no --gin_file"):
        parse_gin_flags([], [])


def test_gin_files_resolve_despite_namespace_folders(tmp_path, monkeypatch):
    """A data/ or runs/ folder in the cwd must not break `--gin_file=data/x.gin` or `include 'runs/...'`."""
    (tmp_path / "data").mkdir()
    (tmp_path / "runs").mkdir()
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    gin.clear_config()
    parse_gin_flags(["models/tiny.gin"])
    assert gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn() == preset("tiny")
    gin.clear_config()
    with pytest.raises(SystemExit, match="gin file 'models/nope.gin' not found"):
        parse_gin_flags(["models/nope.gin"])
