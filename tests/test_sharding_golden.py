"""Golden sharding dumps (MaxText habit): every parameter's PartitionSpec per model and mesh, committed.

A change to the rules table, the model's axis names or the partitioning code shows up here as a
diff of tests/testdata/sharding/*.json. If the change is intended, regenerate and review the diff:

    .venv/bin/python tests/test_sharding_golden.py --write
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if __name__ == "__main__":  # standalone regeneration: 8 simulated devices before jax is imported
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import pytest  # noqa: E402

from twolar_jax import optimizers, partitioning, train_state  # noqa: E402
from twolar_jax.model import network  # noqa: E402
from twolar_jax.model.config import preset  # noqa: E402

GOLDEN_DIR = Path(__file__).resolve().parent / "testdata" / "sharding"
CASES = [
    ("tiny", (8, 1, 1)),
    ("tiny", (2, 1, 4)),
    ("tiny", (1, 1, 8)),
    ("tiny", (1, 8, 1)),
    ("tiny", (2, 2, 2)),
    ("flan-t5-base", (1, 2, 4)),
    ("flan-t5-base", (1, 1, 8)),
]


def golden_path(model: str, mesh_shape) -> Path:
    return GOLDEN_DIR / f"{model}_{'x'.join(map(str, mesh_shape))}.json"


def sharding_record(model: str, mesh_shape) -> dict:
    """What the golden file holds: mesh, rules, each parameter's spec and the sharded fraction."""
    config = preset(model)
    rules = partitioning.load_logical_axis_rules()
    mesh = partitioning.make_mesh(mesh_shape, devices=jax.devices()[:8])
    opt, _ = optimizers.make_optimizer()
    shapes = train_state.abstract_state(lambda r: network.init_params(config, r), opt, jax.random.PRNGKey(0))
    shardings = train_state.state_shardings(shapes, network.logical_axes(config), mesh, rules)
    return {
        "model": model,
        "mesh": dict(mesh.shape),
        "rules": [[name, list(t) if isinstance(t, tuple) else t] for name, t in rules],
        "sharded_fraction": round(partitioning.sharded_fraction(shardings.params, shapes.params), 6),
        "params": partitioning.sharding_dump(shardings.params),
    }


@pytest.mark.parametrize("model,mesh_shape", CASES, ids=lambda c: c if isinstance(c, str) else "x".join(map(str, c)))
def test_sharding_matches_golden_dump(model, mesh_shape):
    path = golden_path(model, mesh_shape)
    assert path.exists(), f"{path} missing; run: python tests/test_sharding_golden.py --write"
    expected = json.loads(path.read_text())
    got = json.loads(json.dumps(sharding_record(model, mesh_shape)))
    assert got["mesh"] == expected["mesh"]
    assert got["rules"] == expected["rules"], "rules table changed: regenerate the dumps and review the diff"
    assert sorted(got["params"]) == sorted(expected["params"]), "parameter set changed"
    diff = {k: (expected["params"][k], v) for k, v in got["params"].items() if expected["params"][k] != v}
    assert not diff, f"PartitionSpecs changed (expected, got): {diff}"
    assert got["sharded_fraction"] == pytest.approx(expected["sharded_fraction"], abs=1e-6)


def test_sharding_golden_dumps_cover_every_parameter():
    """The dumps are real: every param of the model is listed, and the big matrices are split."""
    record = json.loads(golden_path("flan-t5-base", (1, 2, 4)).read_text())
    config = preset("flan-t5-base")
    n_params = len(jax.tree_util.tree_leaves(jax.eval_shape(lambda: network.init_params(config, 0))))
    assert len(record["params"]) == n_params
    assert record["params"]["token_embedder/embedding"] == ["model", "fsdp"]
    assert record["params"]["encoder/layers_0/mlp/wi_0/kernel"] == ["fsdp", "model"]
    assert record["sharded_fraction"] > 0.99


def _write_all() -> None:
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for model, mesh_shape in CASES:
        path = golden_path(model, mesh_shape)
        path.write_text(json.dumps(sharding_record(model, mesh_shape), indent=1, sort_keys=True) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/test_sharding_golden.py --write")
    _write_all()
