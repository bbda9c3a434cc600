"""gin/ is plain data (never a package), every model file builds its preset, and flags and lookup work."""
import gin
import pytest

from twolar_jax import configurables, gin_utils, resources
from twolar_jax.errors import MissingFileError, OptionError
from twolar_jax.gin_utils import parse_gin_flags, rewrite_gin_args, split_gin_args
from twolar_jax.model.config import PRESETS, preset

configurables.register_library()
GIN_DIR = resources.gin_dir()

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
    assert set(MODEL_FILES.values()) == set(PRESETS)


@pytest.mark.parametrize("file_stem", sorted(MODEL_FILES))
def test_preset_takes_the_gin_file_spelling(file_stem):
    assert preset(file_stem) == PRESETS[MODEL_FILES[file_stem]]


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown model preset 'flan-t5-huge'.*flan-t5-small"):
        preset("flan-t5-huge")


def test_model_gin_files_hold_no_shapes():
    """One source of presets: the shapes live in PRESETS only; gin files name a preset."""
    for path in (GIN_DIR / "models").glob("*.gin"):
        text = path.read_text()
        assert "model_preset.name = " in text and "T5Config." not in text and "d_model =" not in text, path


def test_model_preset_overrides_from_gin():
    gin.clear_config()
    parse_gin_flags(["models/flan_t5_xl.gin"], ["model_preset.remat = True", "COMPUTE_DTYPE = 'bfloat16'"])
    built = gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn()
    gin.clear_config()
    assert built == preset("flan-t5-xl", remat=True, dtype="bfloat16")


def test_register_is_idempotent_and_refuses_a_second_object():
    def fn(x=1):
        return x

    first = gin_utils.register(fn, name="probe_fn", module="tests")
    assert gin_utils.register(fn, name="probe_fn", module="tests") is first

    def other(x=2):
        return x

    with pytest.raises(ValueError, match="already registered"):
        gin_utils.register(other, name="probe_fn", module="tests")


def test_register_after_a_finalized_run_in_the_same_process():
    """A notebook that trains and then evaluates: the first run's gin.finalize() locked the config."""
    parse_gin_flags(["models/tiny.gin"])
    assert gin.config_is_locked()

    def late(x=3):
        return x

    try:
        configurable = gin_utils.register(late, name="late_fn", module="tests")
        assert configurable() == 3 and gin.config_is_locked()
    finally:
        gin.clear_config()


def test_gin_flag_rewriting():
    argv = ["--gin_file=models/tiny.gin", "--gin.model_preset.dtype='bfloat16'", "--gin_search_paths=/a,/b", "--other"]
    assert rewrite_gin_args(argv)[1] == "--gin_bindings=model_preset.dtype = 'bfloat16'"
    files, bindings, paths, rest = split_gin_args(argv)
    assert files == ["models/tiny.gin"] and bindings == ["model_preset.dtype = 'bfloat16'"]
    assert paths == ["/a", "/b"] and rest == ["--other"]
    gin.clear_config()
    parse_gin_flags(files, bindings)
    assert gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn().dtype == "bfloat16"
    gin.clear_config()
    with pytest.raises(OptionError, match="no --gin_file"):
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
    with pytest.raises(MissingFileError, match="gin file 'models/nope.gin' not found"):
        parse_gin_flags(["models/nope.gin"])
    # A user's own file in the working directory that includes shipped files resolves too.
    (tmp_path / "mine.gin").write_text("include 'models/tiny.gin'\nmodel_preset.remat = True\n")
    gin.clear_config()
    parse_gin_flags(["mine.gin"])
    assert gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn() == preset("tiny", remat=True)
    gin.clear_config()
