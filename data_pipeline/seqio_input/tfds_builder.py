"""A TFDS builder for the prepared (grouped, validated) distillation set: one example per query.

Why TFDS as well as JSONL: a pod slice reads TFRecord shards from a bucket in parallel, with file-level
sharding across hosts, which a single JSONL file cannot give. Text is stored untokenized so that the
group size, length and truncation stay training-time choices.

Build (files named train.jsonl / validation.jsonl in a folder, the TFDS "manual dir" convention):
    python -m data_pipeline.seqio_input.tfds_builder --train_path=train.jsonl [--validation_path=dev.jsonl] --data_dir=DIR
then `tasks.register_distill_tfds_tasks(data_dir=DIR)`.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

from twolar_jax import entry, user_paths
from twolar_jax.errors import FormatError
from twolar_jax.ranking.features import DISTILL_RECORD, Feature, FeatureSet

if __name__ == "__main__":
    # Quiet the console before TensorFlow loads, then run the module under its own name: TFDS locates a
    # builder by its class's package, which `__main__` is not.
    entry.quiet_console(sys.argv[1:])
    from data_pipeline.seqio_input.tfds_builder import main as _real_main

    sys.exit(_real_main())

import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402

from data_pipeline.distill_format import read_distill_jsonl  # noqa: E402
from data_pipeline.seqio_input.tf_env import tf  # noqa: E402

PathLike = Union[str, os.PathLike]
SPLIT_FILES = {"train": "train.jsonl", "validation": "validation.jsonl"}


def tfds_feature(feature: Feature) -> tfds.features.FeatureConnector:
    """A declared feature as TFDS stores it: strings as Text, other dtypes as Scalar, one Sequence per
    dimension. Stored datasets depend on this mapping: changing it makes existing builds unreadable."""
    connector = tfds.features.Text() if feature.dtype == "string" else \
        tfds.features.Scalar(dtype=tf.as_dtype(feature.dtype))
    for _ in feature.dims:
        connector = tfds.features.Sequence(connector)
    return connector


def tfds_features(record: FeatureSet) -> tfds.features.FeaturesDict:
    """The FeaturesDict of a stored-example declaration (DISTILL_RECORD for this builder)."""
    return tfds.features.FeaturesDict({feature.name: tfds_feature(feature) for feature in record})


class TwolarDistill(tfds.core.GeneratorBasedBuilder):
    """Distillation queries with their teacher-ordered candidates (registered as "twolar_distill")."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "The distillation JSONL (docs/data_format.md), one example per query."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the distillation JSONL files in the manual dir as train.jsonl (required) and "
        "validation.jsonl (optional); `build_tfds(train_path=..., data_dir=...)` does this for you.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS 4.9.10 derives this through the `importlib_resources` backport, which is not installed
        # here (and not needed: the builder lives in this file).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        """Features from DISTILL_RECORD, the same record the JSONL source yields (RAW_SIGNATURE)."""
        return self.dataset_info_from_configs(features=tfds_features(DISTILL_RECORD), supervised_keys=None)

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        splits = {split: self._generate_examples(manual / name)
                  for split, name in SPLIT_FILES.items() if (manual / name).exists()}
        if "train" not in splits:
            raise FileNotFoundError(f"{manual / SPLIT_FILES['train']}: missing. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return splits

    def _generate_examples(self, path: Path):
        # Strict: a bad line stops the build with "<file>:<line>: <field>: <what>".
        for i, record in enumerate(read_distill_jsonl(path)):
            has_scores = record.teacher_scores is not None
            yield i, {
                "qid": record.qid,
                "query": record.query,
                "query_type": record.query_type,
                "docids": [c.docid for c in record.candidates],
                "texts": [c.text for c in record.candidates],
                "teacher_scores": list(record.teacher_scores) if has_scores else [0.0] * len(record.candidates),
                "has_teacher_scores": has_scores,
            }


def to_raw_example(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """TFDS example -> the raw example the preprocessors expect: DISTILL_RECORD's keys, with numbers cast
    to its dtypes (the preprocessors' graph is built for RAW_SIGNATURE, the same declaration)."""
    def fn(ex):
        return {f.name: ex[f.name] if f.dtype == "string" else tf.cast(ex[f.name], tf.as_dtype(f.dtype))
                for f in DISTILL_RECORD}
    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def build_tfds(*, train_path: PathLike, data_dir: PathLike,
               validation_path: Optional[PathLike] = None) -> tfds.core.DatasetBuilder:
    """Prepare the TFDS dataset under data_dir from distillation JSONL files (symlinked into a manual dir)."""
    with tempfile.TemporaryDirectory() as manual:
        for split, path in (("train", train_path), ("validation", validation_path)):
            if path is not None:
                os.symlink(os.path.abspath(path), os.path.join(manual, SPLIT_FILES[split]))
        builder = TwolarDistill(data_dir=str(data_dir))
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return builder


def _check_distill_file(option: str, path: str) -> None:
    """Before TFDS writes anything: the file is there, every line is valid, and it has a record (errors
    name the user's file, not the symlink the builder reads it through)."""
    user_paths.check_input(option, path)
    if not sum(1 for _ in read_distill_jsonl(path)):
        raise FormatError(path, None, None, f"no records: the file is empty ({option})")


def _main(argv: list[str]) -> int:
    parser = entry.ArgumentParser(prog="python -m data_pipeline.seqio_input.tfds_builder",
                                  description=__doc__.splitlines()[0])
    parser.add_argument("--train_path", required=True, help="the training split's distillation JSONL")
    parser.add_argument("--validation_path", help="the validation split's distillation JSONL")
    parser.add_argument("--data_dir", required=True, help="the TFDS data dir to prepare the dataset in")
    entry.add_common_flags(parser, compile_cache=False)
    args = parser.parse_args(argv)
    for option, path in (("--train_path", args.train_path), ("--validation_path", args.validation_path)):
        if path:
            _check_distill_file(option, path)
    user_paths.check_output("--data_dir", args.data_dir, kind="dir")
    entry.start(args)
    builder = build_tfds(train_path=args.train_path, validation_path=args.validation_path, data_dir=args.data_dir)
    print(builder.info.splits)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """0, or 2 with one line on stderr naming the file, line, field or option (--debug: the traceback)."""
    return entry.run_console("python -m data_pipeline.seqio_input.tfds_builder", _main, argv)

