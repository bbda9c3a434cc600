"""Where the project's files are: gin configs, the shipped demo data and the SentencePiece vocabulary.

Two layouts, one answer: in a checkout, `gin/` and `data/` sit beside the `twolar_jax/` package; in an
installed wheel, setup.py copies them into `twolar_jax/_packaged/`. Every path to a shipped file goes
through this module, so nothing computes paths from the working directory or the checkout.
"""
from __future__ import annotations

from pathlib import Path

from twolar_jax.errors import MissingFileError

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGED_DIR = PACKAGE_DIR / "_packaged"  # filled by setup.py's build_py in a wheel
CHECKOUT_DIR = PACKAGE_DIR.parent
SPIECE_MODEL = PACKAGE_DIR / "assets" / "spiece.model"


def _locate(name: str, marker: str) -> Path:
    for base in (PACKAGED_DIR, CHECKOUT_DIR):
        candidate = base / name
        if (candidate / marker).exists():
            return candidate
    raise MissingFileError(f"no {name}/ folder found in {PACKAGED_DIR} (installed package) or {CHECKOUT_DIR} "
                           "(checkout); reinstall twolar-jax")


def gin_dir() -> Path:
    """The folder of shipped gin files (models/, runs/, mesh/, experiments/, eval/)."""
    return _locate("gin", "mesh/rules.gin")


def data_dir() -> Path:
    """The folder of shipped data (data/README.md says what and under which licence)."""
    return _locate("data", "README.md")


def shipped_data(relative_path: str) -> str:
    """A path under the shipped data folder, e.g. 'beir/scifact/corpus.jsonl' (gin: `@shipped_data()`)."""
    path = data_dir() / relative_path
    if not path.exists():
        raise MissingFileError(f"{path}: not in the shipped data (see {data_dir() / 'README.md'})")
    return str(path)


def shipped_data_dir() -> str:
    """The shipped data folder as a string (gin: `@shipped_data_dir()`)."""
    return str(data_dir())
