"""The layers import only downward: every module's imports (lazy ones inside functions included) are parsed.

    twolar_jax (library)  <  retrieval  <  data_pipeline | eval  <  app (twolar_jax.demo, twolar_jax.cli)

twolar_jax imports none of retrieval, data_pipeline, eval; retrieval imports neither data_pipeline nor
eval; data_pipeline and eval never import each other; nothing imports the app modules; TensorFlow
(tensorflow, seqio, tensorflow_datasets) is imported only inside data_pipeline/seqio_input.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("twolar_jax", "retrieval", "data_pipeline", "eval")
APP_MODULES = ("twolar_jax.demo", "twolar_jax.cli")
FORBIDDEN = {
    "twolar_jax": {"retrieval", "data_pipeline", "eval"},
    "retrieval": {"data_pipeline", "eval"},
    "data_pipeline": {"eval"},
    "eval": {"data_pipeline"},
}
TENSORFLOW = {"tensorflow", "seqio", "tensorflow_datasets"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name an `import` or `from ... import` names, anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def all_modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_layers_every_package_has_modules():
    found = {module_name(p).split(".")[0] for p in all_modules()}
    assert found == set(PACKAGES)


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: module_name(p))
def test_layers_imports_only_downward(path):
    name = module_name(path)
    layer = name.split(".")[0]
    imports = imported_modules(path)
    tops = {m.split(".")[0] for m in imports}
    if name not in APP_MODULES:
        assert not (tops & FORBIDDEN[layer]), f"{name} imports {sorted(tops & FORBIDDEN[layer])} (a layer above it)"
        app = sorted(m for m in imports if m in APP_MODULES or any(m.startswith(a + ".") for a in APP_MODULES))
        assert not app, f"{name} imports the app layer {app}"
    if not name.startswith("data_pipeline.seqio_input"):
        assert not (tops & TENSORFLOW), f"{name} imports {sorted(tops & TENSORFLOW)}; only data_pipeline/seqio_input may"


def test_layers_checker_sees_lazy_imports(tmp_path):
    """The parser must catch imports inside functions too, or the test above could not fail."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from eval.run import evaluate\n    import data_pipeline.set_builder\n")
    assert {"eval.run", "data_pipeline.set_builder"} <= imported_modules(probe)


def test_layers_gin_folder_is_not_a_package():
    """gin/ is plain data: an __init__.py there would shadow the gin-config package."""
    import gin

    assert hasattr(gin, "parse_config_files_and_bindings") and "site-packages" in gin.__file__
    assert not list((REPO / "gin").rglob("__init__.py"))
