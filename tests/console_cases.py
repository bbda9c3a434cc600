"""Running console commands as a user does, for the one-line error tests: a subprocess, the environment a
user has (no JAX_PLATFORMS, no simulated devices, no TF log level), and stderr read as a terminal shows it.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# What the test session sets for itself (conftest.py) and a user's shell has not.
TEST_ONLY_ENV = ("JAX_PLATFORMS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "CUDA_VISIBLE_DEVICES", "TWOLAR_DEBUG",
                 "PYTEST_CURRENT_TEST", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT",
                 "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "GRPC_VERBOSITY")


def user_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_ENV}
    env.update(extra)
    return env


def python_m(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def console_script(name: str, *args: str) -> list[str]:
    """The installed console script (`twolar`, `twolar-train`, ...) next to this interpreter."""
    script = BIN / name
    assert script.exists(), f"{script}: the console script is not installed (pip install -e .)"
    return [str(script), *args]


def visible_lines(stderr: str) -> list[str]:
    """The non-empty lines a terminal would show: each line's text after its last carriage return (a
    progress bar redrawn, or erased by tqdm's leave=False, leaves only what was drawn last)."""
    out = []
    for line in stderr.split("\n"):  # not splitlines(): it would also split at each carriage return
        shown = line.rsplit("\r", 1)[-1].strip()
        if shown:
            out.append(shown)
    return out


@dataclasses.dataclass(frozen=True)
class Case:
    """A hostile input: the command, what its one stderr line must contain, and the files it must not create."""

    name: str
    argv: tuple[str, ...]
    expect: tuple[str, ...]
    not_created: tuple[str, ...] = ()
    cwd: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def run(argv: Sequence[str], *, cwd: Optional[str] = None, timeout: float = 300, **kw) -> Outcome:
    # Bytes, decoded here: text=True would turn each carriage return into a newline (universal newlines),
    # and a redrawn progress bar would read as many lines.
    done = subprocess.run(list(argv), env=kw.pop("env", None) or user_env(), cwd=cwd or str(REPO),
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    return Outcome(done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))


def case_names(make_cases: Callable[..., Sequence[Case]], *args: object) -> list[str]:
    """The names of a table's cases, for parametrize (the table is built in a scratch folder and dropped)."""
    with tempfile.TemporaryDirectory() as folder:
        return [c.name for c in make_cases(Path(folder), *args)]


def run_all(cases: Sequence[Case], *, cwd: str, workers: int = 2) -> dict[str, Outcome]:
    """Every case in its own process, `workers` at a time (most of each is interpreter and import start-up),
    from `cwd` (a scratch folder: relative default outputs must not land in the checkout)."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {c.name: pool.submit(run, c.argv, cwd=c.cwd or cwd) for c in cases}
        return {name: f.result() for name, f in futures.items()}


def assert_one_line(case: Case, outcome: Outcome) -> None:
    lines = visible_lines(outcome.stderr)
    detail = f"{case.name}: rc={outcome.returncode}\nstderr:\n{outcome.stderr[-3000:]}"
    assert outcome.returncode == 2, detail
    assert len(lines) == 1, detail
    assert "error:" in lines[0], detail
    for text in case.expect:
        assert text in lines[0], f"{text!r} not in the line\n{detail}"
    for path in case.not_created:
        assert not Path(path).exists(), f"{path} was created\n{detail}"
