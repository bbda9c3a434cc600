"""Sharded scoring: the Reranker lays parameters out by the training rules on a (data, fsdp, model) mesh
(8 simulated CPU devices, tests/conftest.py); fsdp and tensor-parallel layouts score like replicated."""
import math

import jax
import numpy as np
import pytest

from twolar_jax import partitioning
from twolar_jax.errors import OptionError
from twolar_jax.model.config import preset
from twolar_jax.model.network import init_params
from twolar_jax.reranker import Reranker
from twolar_jax.scoring_runtime import per_device_bytes

CONFIG = preset("tiny")  # 4 heads, d_model 64, d_ff 128: divisible by a 4-way model axis and 8-way fsdp
QUERY = "who won the turing award"
DOCS = ["Geoffrey Hinton, Yann LeCun and Yoshua Bengio received the 2018 Turing Award.",
        "Lobster rolls are a sandwich native to New England.", "",
        "The Turing Award is given by the ACM. " * 3, "Paris is the capital of France.",
        "Alan Turing", "award ceremony in San Francisco", "turing machines and the halting problem",
        "The prize money is one million dollars."]


@pytest.fixture(scope="module")
def params():
    return jax.tree.map(np.asarray, init_params(CONFIG, 5))


def _reranker(params, mesh_shape, **kw):
    kw.setdefault("batch_size", 8)
    return Reranker.from_params(CONFIG, params, max_length=64, mesh_shape=mesh_shape, compile_cache=False, **kw)


@pytest.fixture(scope="module")
def replicated_scores(params):
    assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
    return _reranker(params, (-1, 1, 1)).score_pairs([QUERY] * len(DOCS), DOCS)


def _specs(rr):
    return partitioning.sharding_dump(jax.tree.map(lambda x: x.sharding, rr.params))


def test_sharded_scoring_fsdp_matches_replicated_and_splits_parameters(params, replicated_scores):
    rr = _reranker(params, (1, 8, 1))
    assert rr.mesh.shape == {"data": 1, "fsdp": 8, "model": 1}
    np.testing.assert_allclose(rr.score_pairs([QUERY] * len(DOCS), DOCS), replicated_scores, atol=1e-5, rtol=0)
    total = sum(x.nbytes for x in jax.tree.leaves(rr.params))
    assert total == sum(np.asarray(x).nbytes for x in jax.tree.leaves(params))  # fp32, nothing lost
    held = per_device_bytes(rr.params)
    assert len(held) == 8 and max(held.values()) <= total / 4, (max(held.values()), total)
    assert _specs(rr)["token_embedder/embedding"][1] == "fsdp"  # [vocab, embed]: embed split 8 ways


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 4)])
def test_sharded_scoring_tensor_parallel_matches_replicated(params, replicated_scores, mesh_shape):
    rr = _reranker(params, mesh_shape)
    np.testing.assert_allclose(rr.score_pairs([QUERY] * len(DOCS), DOCS), replicated_scores, atol=1e-5, rtol=0)
    specs = _specs(rr)
    query_kernel = next(v for k, v in specs.items() if k.endswith("attention/query/kernel"))
    assert "model" in query_kernel  # heads split over the model axis
    assert rr.parallelism == mesh_shape[0] * mesh_shape[1]  # batches split over data x fsdp only
    held = per_device_bytes(rr.params)
    total = sum(x.nbytes for x in jax.tree.leaves(rr.params))
    assert max(held.values()) < total / 2


def test_sharded_scoring_replicated_default_and_auto_fill(params):
    rr = _reranker(params, (-1, 1, 1), batch_size=5)
    assert rr.mesh.shape == {"data": 8, "fsdp": 1, "model": 1}
    assert rr.batch_size == 8 and rr.parallelism == 8  # rounded up to the batch split
    total = sum(x.nbytes for x in jax.tree.leaves(rr.params))
    assert set(per_device_bytes(rr.params).values()) == {total}  # every device holds everything
    filled = _reranker(params, (1, -1, 2), devices=jax.devices()[:4])
    assert filled.mesh.shape == {"data": 1, "fsdp": 2, "model": 2}
    assert [filled._rows_for(n) for n in (1, 2, 3, 5, 9)] == [2, 2, 4, 8, 8]


def test_sharded_scoring_custom_rules_change_the_layout(params):
    rules = [(name, None if name == "mlp" else target) for name, target in partitioning.load_logical_axis_rules()]
    rr = _reranker(params, (1, 1, 8), logical_axis_rules=rules)
    specs = _specs(rr)
    wi = next(v for k, v in specs.items() if k.endswith("mlp/wi/kernel") or k.endswith("mlp/wi_0/kernel"))
    assert "model" not in wi  # 'mlp' now replicated
    default = _specs(_reranker(params, (1, 1, 8)))
    assert "model" in default[next(k for k in default if k.endswith(("mlp/wi/kernel", "mlp/wi_0/kernel")))]


@pytest.mark.parametrize("mesh_shape, match", [
    ((3, 1, 1), r"mesh_shape=\(3, 1, 1\).*needs 3 devices, but 8"),
    ((-1, -1, 1), "mesh_shape=.*at most one -1"),
    ((8, 1), "mesh_shape=.*expected 3 integers"),
    ("8,1,1", "mesh_shape=.*expected 3 integers"),
    ((8, 1, 0), "mesh_shape=.*positive"),
])
def test_sharded_scoring_rejects_bad_mesh_shapes(params, mesh_shape, match):
    with pytest.raises(OptionError, match=match):
        _reranker(params, mesh_shape)


def test_sharded_scoring_rejects_rules_naming_unknown_mesh_axes(params):
    with pytest.raises(OptionError, match=r"logical_axis_rules: rule \('heads', 'tensor'\) names mesh axes"):
        _reranker(params, (-1, 1, 1), logical_axis_rules=[("batch", "data"), ("heads", "tensor")])
    with pytest.raises(OptionError, match="logical_axis_rules: logical axis rule #0"):
        _reranker(params, (-1, 1, 1), logical_axis_rules=[("batch",)])


def test_sharded_scoring_batch_is_split_over_batch_axes(params):
    rr = _reranker(params, (2, 2, 2))
    batch = jax.device_put(np.zeros((rr.batch_size, 64), np.int32), rr._batch_sharding)
    rows = {(s.index[0].start, s.index[0].stop) for s in batch.addressable_shards}
    assert len(rows) == 4 and math.prod(rr.mesh.shape[a] for a in ("data", "fsdp")) == rr.parallelism == 4
