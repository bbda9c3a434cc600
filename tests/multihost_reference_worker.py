"""The single-process reference of a multi-host training run, for tests/test_multihost_train.py.

    python tests/multihost_reference_worker.py NUM_HOSTS --gin_file=... [--gin.NAME=VALUE ...]

Parses the same gin files and bindings as `python -m twolar_jax.train`, then trains in this one process,
fed at every step the batches that hosts 0..NUM_HOSTS-1 of the multi-host run read from their own data
shards (`shard_index=i, num_shards=NUM_HOSTS`), joined in host order: the global batch that run assembles
across its processes. So the two runs must take the same steps, up to the order of fp32 reductions.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def joined_shards(source, num_hosts: int):
    """A BatchSource for one process that yields what `num_hosts` processes read, joined row-wise."""

    def batches(*, shard_index: int, num_shards: int, skip_batches: int) -> Iterator[Mapping[str, np.ndarray]]:
        if (shard_index, num_shards) != (0, 1):
            raise ValueError("the reference runs in one process")
        hosts = [source(shard_index=i, num_shards=num_hosts, skip_batches=skip_batches) for i in range(num_hosts)]
        for parts in zip(*hosts):
            yield {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    return batches


def main(argv: list[str]) -> int:
    import gin

    from twolar_jax import gin_utils, train

    num_hosts, rest = int(argv[0]), argv[1:]
    files, bindings, paths, unknown = gin_utils.split_gin_args(rest)
    if unknown:
        raise SystemExit(f"unknown arguments {unknown}")
    train_fn = train.register_configurables()["train"]
    gin_utils.parse_gin_flags(files, bindings, paths)
    source = gin.query_parameter("train.train_batches").scoped_configurable_fn
    result = train_fn(train_batches=joined_shards(source, num_hosts))
    print(f"done: step {result.step}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
