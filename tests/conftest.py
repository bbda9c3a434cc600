"""Test set-up: 8 simulated CPU devices for the sharding tests, set before jax is imported."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# glibc as it is in the test process and the CLIs it starts: a kept heap (twolar_jax.host_heap, "auto" on
# CPU) would hold each process's peak memory for the whole session; tests/test_host_heap.py covers it.
os.environ.setdefault("TWOLAR_HOST_HEAP", "release")
# The persistent compilation cache (on by default in the Reranker and the CLIs) goes to one folder per test
# process, shared with the subprocesses its tests start, never to the user's ~/.cache, and removed at exit.
# Each pytest-xdist worker gets its own (it inherits the controller's environment): jax writes cache entries
# in place without a lock unless eviction is on, so two workers compiling the same program could read a
# half-written entry. A folder the user names in TWOLAR_COMPILE_CACHE is used as it is and kept.
if "TWOLAR_COMPILE_CACHE" not in os.environ or os.environ.get("TWOLAR_TEST_OWNS_COMPILE_CACHE") == "1":
    import atexit
    import shutil
    import tempfile

    _session_cache = os.path.join(tempfile.gettempdir(), f"twolar-test-compile-cache-{os.getpid()}")
    os.environ["TWOLAR_COMPILE_CACHE"] = _session_cache
    os.environ["TWOLAR_TEST_OWNS_COMPILE_CACHE"] = "1"
    atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from twolar_jax.compile_cache import enable_compilation_cache  # noqa: E402

# Before anything compiles: jax decides once per process whether the persistent cache is on. The tests
# compile the same small programs many times (a fresh jit per train() call), so the cache pays.
enable_compilation_cache()

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def spiece_path() -> Path:
    return REPO / "twolar_jax" / "assets" / "spiece.model"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return REPO / "data"


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory) -> dict:
    """The project built as a wheel and installed with --no-deps into a temporary target, as a user would.

    Returns {"site": target dir, "env": an environment whose PYTHONPATH puts the wheel's copy first,
    "cwd": an empty directory to run from}. The editable install of the checkout stays in the venv but its
    finder comes after PYTHONPATH, so every import resolves to the installed wheel (the tests check it).
    """
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("wheel")
    src, dist, site, cwd = root / "src", root / "dist", root / "site", root / "cwd"
    cwd.mkdir()
    # Build from a clean copy: an in-tree build/ folder could carry stale modules into the wheel.
    top_level = {".git", ".venv", "build", "runs", ".pytest_cache", ".whl"}

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if (Path(folder) == REPO and n in top_level) or n == "__pycache__"
                or n.endswith(".egg-info")]

    shutil.copytree(REPO, src, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, cwd=cwd, capture_output=True, text=True)
    wheels = sorted(dist.glob("twolar_jax-*.whl"))
    subprocess.run(pip + ["install", "--no-deps", "--target", str(site), str(wheels[-1])],
                   check=True, cwd=cwd, capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["PYTHONPATH"] = str(site)
    return {"site": site, "env": env, "cwd": cwd, "wheel": wheels[-1]}
