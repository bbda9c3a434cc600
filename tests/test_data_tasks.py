"""seqio side of the distillation data: TF tokenization parity with twolar_jax.ranking.pointwise_inputs
(per pair, and per converted group: the model interface), the registered tasks (via seqio.test_utils), the
feature converter, get_distill_batches (determinism, exact resume, per-host shards, mixtures) and the TFDS
builder, both built from the declarations in twolar_jax.ranking.features."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
seqio = pytest.importorskip("seqio")

from seqio import test_utils  # noqa: E402

from data_pipeline import distill_format as formats
from data_pipeline.seqio_input import batches as dataset, preprocessors, tasks  # noqa: E402
from data_pipeline.seqio_input.feature_converters import DistillFeatureConverter  # noqa: E402
from data_pipeline.distill_format import Candidate, DistillRecord, FormatError  # noqa: E402
from data_pipeline.seqio_input.vocab import get_vocabulary  # noqa: E402
from twolar_jax.ranking.features import DISTILL_RECORD, LISTWISE_GROUP_BATCH  # noqa: E402
from twolar_jax.ranking.pointwise_inputs import encode_query_document, group_features  # noqa: E402
from twolar_jax.tokenizer import T5Tokenizer  # noqa: E402

QUERY_TYPES = ("crop", "doct5query", "msmarco")
N_RECORDS = 12
TOK = T5Tokenizer()


def _records() -> list[DistillRecord]:
    """Record i: query type QUERY_TYPES[i % 3], 2 + i % 5 candidates; teacher score of candidate j is
    100 * i - j, so a batch row names its record (scores only on even i, as data may lack them)."""
    out = []
    for i in range(N_RECORDS):
        n = 2 + i % 5
        cands = tuple(Candidate(f"d{i}-{j}", f"passage {j} of query {i}: " + "words " * (3 * j), "bm25")
                      for j in range(n))
        scores = tuple(100.0 * i - j for j in range(n)) if i % 2 == 0 else None
        out.append(DistillRecord(f"q{i}", f"question number {i}?", QUERY_TYPES[i % 3], cands, scores))
    return out


@pytest.fixture(scope="module")
def tok() -> T5Tokenizer:
    return T5Tokenizer()


@pytest.fixture(scope="module")
def train_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("distill") / "train.jsonl"
    formats.write_distill_jsonl(path, _records())
    return path


@pytest.fixture(scope="module")
def registered(train_file):
    return tasks.register_distill_tasks(train_path=train_file, validation_path=train_file, group_size=4,
                                        max_length=24)


# ------------------------------------------------------------------------------------- tokenization


LONG_DOC = " ".join(f"token{i} alpha beta" for i in range(700))
CASES = [
    ("what is a cat?", "A cat is a small domesticated carnivorous mammal."),
    ("Ünïcode — “quotes” and 1,000.5 numbers", "Café naïve résumé, déjà vu. 東京 is a city."),
    ("q", LONG_DOC),
    ("a very long query " * 40, "short document"),
    ("  spaces   around  ", "  doc   with\ttabs\nand newlines  "),
]


@pytest.mark.parametrize("truncation", ["document", "whole"])
@pytest.mark.parametrize("max_length", [16, 64, 512])
def test_tf_tokenization_equals_python(tok, truncation, max_length):
    vocab = get_vocabulary()
    assert len(tok.encode(LONG_DOC)) > 2000
    for query, doc in CASES:
        got = preprocessors.encode_groups_tf(vocab, tf.constant(query), tf.constant([doc, "x"]),
                                             max_length=max_length, truncation=truncation).numpy()
        for row, text in zip(got, [doc, "x"]):
            want = encode_query_document(tok, query, text, max_length=max_length, truncation=truncation)
            assert row[row != 0].tolist() == want, (query[:20], text[:20])


def test_document_truncation_keeps_template_and_suffix(tok):
    ids = preprocessors.encode_groups_tf(get_vocabulary(), tf.constant("q"), tf.constant([LONG_DOC]),
                                         max_length=512).numpy()[0]
    suffix = tok.encode("Relevant:") + [1]
    prefix = tok.encode("Query: q Document:")
    assert len(ids) == 512 and ids[-len(suffix):].tolist() == suffix and ids[: len(prefix)].tolist() == prefix
    assert ids[len(prefix): -len(suffix)].tolist() == tok.encode(LONG_DOC)[: 512 - len(prefix) - len(suffix)]
    whole = preprocessors.encode_groups_tf(get_vocabulary(), tf.constant("q"), tf.constant([LONG_DOC]),
                                           max_length=512, truncation="whole").numpy()[0]
    assert len(whole) == 512 and whole[-1] == 1
    assert tok.decode(whole).endswith("token99 alpha beta token100 alpha")  # the reference loses "Relevant:"


# ------------------------------------------------------------------------- task preprocessing (seqio)


def _raw(record: DistillRecord) -> dict:
    return {
        "qid": record.qid, "query": record.query, "query_type": record.query_type,
        "docids": [c.docid for c in record.candidates], "texts": [c.text for c in record.candidates],
        "teacher_scores": np.asarray(record.teacher_scores or [0.0] * len(record.candidates), np.float32),
        "has_teacher_scores": record.teacher_scores is not None,
    }


def test_task_preprocessing_single(registered, tok):
    rec = DistillRecord("q", "what is up?", "crop",
                        tuple(Candidate(f"d{j}", f"doc {j} " + "lorem ipsum " * 30, "s") for j in range(6)),
                        tuple(float(10 - j) for j in range(6)))
    ex = test_utils.test_preprocessing_single("twolar_distill", {"train": _raw(rec)},
                                              sequence_length=preprocessors.feature_lengths(4, 24))
    assert ex["inputs"].shape == (4, 24)  # top 4 of 6 kept; every row is cut to exactly 24 tokens
    for j in range(4):
        assert ex["inputs"][j].tolist() == encode_query_document(tok, rec.query, rec.candidates[j].text, max_length=24)
        assert ex["inputs"][j, -4:].tolist() == tok.encode("Relevant:") + [1] == [31484, 17, 10, 1]
    np.testing.assert_array_equal(ex["teacher_ranks"], [0, 1, 2, 3])
    np.testing.assert_allclose(ex["teacher_scores"], [10, 9, 8, 7])
    assert ex["docids"].tolist() == [b"d0", b"d1", b"d2", b"d3"]


def test_task_twolar_padding(registered, train_file, tok):
    tasks.register_distill_tasks(train_path=train_file, group_size=4, max_length=24, padding="twolar",
                                 prefix="twolar_pad_test")
    rec = _records()[0]  # 2 candidates
    ex = test_utils.test_preprocessing_single("twolar_pad_test", {"train": _raw(rec)},
                                              sequence_length=preprocessors.feature_lengths(5, 24))
    assert ex["inputs"].shape[0] == 5
    assert ex["inputs"][4][ex["inputs"][4] != 0].tolist() == encode_query_document(
        tok, rec.query, "<padding_passage>", max_length=24)
    np.testing.assert_allclose(ex["teacher_scores"], [0, -1, -2, -2, -2])  # padding = lowest - 1
    np.testing.assert_array_equal(ex["teacher_ranks"], [0, 1, 2, 3, 4])


def test_feature_converter_shapes_mask_and_ranks():
    ds = tf.data.Dataset.from_generator(
        lambda: iter([
            {"inputs": np.array([[5, 6, 1], [7, 1, 0]], np.int32), "teacher_ranks": np.array([0, 1], np.int32),
             "teacher_scores": np.array([2.5, 1.5], np.float32), "qid": b"a"},
            {"inputs": np.array([[8, 1]], np.int32), "teacher_ranks": np.array([0], np.int32),
             "teacher_scores": np.array([0.0], np.float32), "qid": b"b"},
        ]),
        output_signature={"inputs": tf.TensorSpec([None, None], tf.int32), "teacher_ranks": tf.TensorSpec([None], tf.int32),
                          "teacher_scores": tf.TensorSpec([None], tf.float32), "qid": tf.TensorSpec([], tf.string)})
    out = DistillFeatureConverter()(ds, preprocessors.feature_lengths(3, 8))
    z = [0] * 5
    test_utils.assert_dataset(out, [
        {"encoder_input_tokens": [[5, 6, 1] + z, [7, 1, 0] + z, [0] * 8],
         "teacher_ranks": [0, 1, 2], "passage_mask": [1, 1, 0], "teacher_scores": [2.5, 1.5, 0.0]},
        {"encoder_input_tokens": [[8, 1, 0] + z, [0] * 8, [0] * 8],
         "teacher_ranks": [0, 1, 2], "passage_mask": [1, 0, 0], "teacher_scores": [0.0, 0.0, 0.0]},
    ], expected_dtypes={"encoder_input_tokens": tf.int32, "teacher_ranks": tf.int32,
                        "passage_mask": tf.int32, "teacher_scores": tf.float32})
    assert out.element_spec["encoder_input_tokens"].shape == (3, 8)
    with pytest.raises(ValueError, match="cannot pack"):
        DistillFeatureConverter(pack=True)
    with pytest.raises(ValueError, match=r"\[group_size, max_length\]"):
        DistillFeatureConverter()(ds, {"inputs": 4, "teacher_ranks": 3, "teacher_scores": 3})
    wide = ds.map(lambda ex: {**ex, "inputs": tf.pad(ex["inputs"], [[0, 0], [0, 6]])})  # 9 tokens per row
    too_long = DistillFeatureConverter()(wide, preprocessors.feature_lengths(3, 8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="longer than max_length=8"):
        list(too_long)


@pytest.mark.parametrize("padding", ["mask", "twolar"])
@pytest.mark.parametrize("truncation", ["document", "whole"])
def test_model_interface_seqio_groups_equal_pointwise_group_features(train_file, tok, padding, truncation):
    """The twin at the batch level: what the task + DistillFeatureConverter hand the model for a record
    is `pointwise_inputs.group_features` of that record, id for id, in LISTWISE_GROUP_BATCH's terms."""
    converter = DistillFeatureConverter()
    assert tuple(converter.MODEL_FEATURES) == LISTWISE_GROUP_BATCH.names
    for feature in LISTWISE_GROUP_BATCH:
        spec = converter.MODEL_FEATURES[feature.name]
        assert (spec.dtype, spec.rank) == (tf.as_dtype(feature.dtype), feature.rank - 1), feature.name
        assert spec.sequence_dim == (1 if feature.rank == 3 else 0), feature.name
    n, length = 4, 24
    assert converter.get_model_feature_lengths(preprocessors.feature_lengths(n, length)) == {
        f.name: length if f.rank == 3 else n for f in LISTWISE_GROUP_BATCH}
    prefix = f"model_interface_{padding}_{truncation}"
    tasks.register_distill_tasks(train_path=train_file, group_size=n, max_length=length, padding=padding,
                                 truncation=truncation, prefix=prefix)
    ds = seqio.get_dataset(prefix, task_feature_lengths=preprocessors.feature_lengths(n, length),
                           feature_converter=converter, dataset_split="train", shuffle=False, verbose=False)
    recs = _records()
    got = list(itertools.islice(ds.as_numpy_iterator(), 6))  # 2..6 candidates, with and without scores
    assert len(got) == 6
    for i, ex in enumerate(got):
        rec = recs[i]
        want = group_features(rec.query, [c.text for c in rec.candidates], rec.teacher_scores, tokenizer=tok,
                              group_size=n, max_length=length, truncation=truncation, padding=padding)
        assert set(ex) == set(want) == set(LISTWISE_GROUP_BATCH.names)  # tf.data sorts dict keys
        for k in want:
            assert ex[k].dtype == want[k].dtype, (i, k)
            np.testing.assert_array_equal(ex[k], want[k], err_msg=f"record {i}: {k}")
    tokens_dims = LISTWISE_GROUP_BATCH["encoder_input_tokens"].dims  # (batch, group, length), whatever named
    LISTWISE_GROUP_BATCH.validate({k: np.stack([ex[k] for ex in got]) for k in got[0]},
                                  expect=dict(zip(tokens_dims, (6, n, length))))


# ------------------------------------------------------------------------------ get_distill_batches


def _batches(n, **kw):
    args = dict(task_or_mixture="twolar_distill", split="train", batch_size=2, group_size=4, max_length=24, seed=3)
    args.update(kw)
    return list(itertools.islice(dataset.get_distill_batches(**args), n))


def _record_ids(batch) -> list[int]:
    """Which record each batch row is, read back from its first passage ("Query: question number {i}? ...")."""
    return [int(TOK.decode(row[0]).split("number ")[1].split("?")[0]) for row in batch["encoder_input_tokens"]]


def test_batches_shapes_and_dtypes(registered):
    (b,) = _batches(1)
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "encoder_input_tokens": ((2, 4, 24), np.int32),
        "teacher_ranks": ((2, 4), np.int32), "passage_mask": ((2, 4), np.int32),
        "teacher_scores": ((2, 4), np.float32)}
    recs = _records()
    for row, i in enumerate(_record_ids(b)):
        n = min(4, len(recs[i].candidates))
        assert b["passage_mask"][row].tolist() == [1] * n + [0] * (4 - n)
        assert (b["encoder_input_tokens"][row, n:] == 0).all()
        assert all(r[r != 0][-1] == 1 for r in b["encoder_input_tokens"][row, :n])  # each real row ends in EOS
        want = [100.0 * i - j for j in range(n)] + [0.0] * (4 - n) if i % 2 == 0 else [0.0] * 4
        np.testing.assert_allclose(b["teacher_scores"][row], want)


def test_batches_deterministic_and_resume_exact(registered):
    run = _batches(9)  # > one epoch of 12 records at 2 per batch: crosses an epoch boundary
    again = _batches(9)
    for a, b in zip(run, again):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    resumed = _batches(4, skip_batches=5)
    for a, b in zip(run[5:], resumed):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    epoch1 = sorted(sum((_record_ids(b) for b in run[:6]), []))
    assert epoch1 == list(range(N_RECORDS))  # every query once per epoch (global permutation)
    other = sum((_record_ids(b) for b in _batches(6, seed=4)), [])
    assert other != sum((_record_ids(b) for b in run[:6]), [])


def test_batches_host_shards_are_disjoint(registered):
    seen = []
    for shard in range(3):
        ids = sum((_record_ids(b) for b in _batches(100, batch_size=3, num_shards=3, shard_index=shard,
                                                   repeat=False)), [])
        assert len(ids) == N_RECORDS // 3
        seen += ids
    assert sorted(seen) == list(range(N_RECORDS))
    with pytest.raises(ValueError, match="multiple of num_shards"):
        _batches(1, batch_size=4, num_shards=3)


def test_query_type_variants_and_mixture(registered):
    assert set(registered) == {"twolar_distill", "twolar_distill_crop", "twolar_distill_doct5query",
                               "twolar_distill_msmarco", "twolar_distill_mix"}
    for k, qt in enumerate(QUERY_TYPES):
        ids = sum((_record_ids(b) for b in _batches(10, task_or_mixture=f"twolar_distill_{qt}", repeat=False)), [])
        assert sorted(ids) == [i for i in range(N_RECORDS) if i % 3 == k]
    mixed = sum((_record_ids(b) for b in _batches(20, task_or_mixture="twolar_distill_mix")), [])
    assert {i % 3 for i in mixed} == {0, 1}  # crop and doct5query at 1:1, no msmarco
    assert 10 <= sum(i % 3 == 0 for i in mixed) <= 30


def test_numpy_path_equals_seqio_path(registered, tok):
    seqio_batches = _batches(10, shuffle=False, repeat=False, seed=None, batch_size=5)
    numpy_batches = list(dataset.batches_from_records(_records(), tokenizer=tok, batch_size=5, group_size=4,
                                                      max_length=24))
    assert len(seqio_batches) == len(numpy_batches) == 3
    for a, b in zip(seqio_batches, numpy_batches):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_validation_split_and_errors(registered, train_file, tmp_path):
    (b,) = _batches(1, split="validation", shuffle=False, seed=None)
    assert _record_ids(b) == [0, 1]
    only_crop = tmp_path / "crop.jsonl"
    formats.write_distill_jsonl(only_crop, [r for r in _records() if r.query_type == "crop"])
    tasks.register_distill_tasks(train_path=only_crop, prefix="crop_only", mixture_rates={"crop": 1.0})
    with pytest.raises(ValueError, match="no 'validation' split"):
        _batches(1, task_or_mixture="crop_only", split="validation")
    with pytest.raises(ValueError, match=r"crop_only_msmarco: no records with query_type 'msmarco' .*crop=4"):
        _batches(1, task_or_mixture="crop_only_msmarco")
    assert "crop_only2_mix" in tasks.register_distill_tasks(train_path=only_crop, prefix="crop_only2")
    assert [t.name for t in seqio.get_mixture_or_task("crop_only2_mix").tasks] == ["crop_only2_crop"]
    with pytest.raises(ValueError, match="names query_type 'doct5query', but the training file has no such"):
        tasks.register_distill_tasks(train_path=only_crop, prefix="crop_only3", mixture_rates={"doct5query": 1})
    only_msmarco = tmp_path / "msmarco.jsonl"
    formats.write_distill_jsonl(only_msmarco, [r for r in _records() if r.query_type == "msmarco"])
    assert "ms_only_mix" not in tasks.register_distill_tasks(train_path=only_msmarco, prefix="ms_only")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(formats.record_to_json(_records()[0]) + "\n" + '{"qid": "x"}\n')
    with pytest.raises(FormatError, match=rf"^{bad}:2: query: missing field$"):
        tasks.register_distill_tasks(train_path=bad, prefix="bad_file", mixture_rates={"crop": 1})
    tasks.register_distill_tasks(train_path=bad, prefix="bad_file", mixture_rates={"crop": 1}, skip_invalid=True)
    assert tasks.load_index(bad, skip_invalid=True).stats["skipped"] == 1


def test_tfds_prepared_form_matches_jsonl(registered, train_file, tmp_path):
    from data_pipeline.seqio_input import tfds_builder

    tfds_builder.build_tfds(train_path=train_file, data_dir=tmp_path / "tfds")
    names = tasks.register_distill_tfds_tasks(data_dir=tmp_path / "tfds")
    assert names[0] == "twolar_distill_tfds"
    from_tfds = _batches(20, task_or_mixture="twolar_distill_tfds", shuffle=False, repeat=False, seed=None, batch_size=1)
    from_jsonl = _batches(20, shuffle=False, repeat=False, seed=None, batch_size=1)
    by_id = {_record_ids(b)[0]: b for b in from_jsonl}
    assert sorted(_record_ids(b)[0] for b in from_tfds) == list(range(N_RECORDS))
    for b in from_tfds:
        for k, v in b.items():
            np.testing.assert_array_equal(v, by_id[_record_ids(b)[0]][k], err_msg=k)
    crop = _batches(10, task_or_mixture="twolar_distill_tfds_crop", shuffle=False, repeat=False, seed=None)
    assert sorted(sum((_record_ids(b) for b in crop), [])) == [0, 3, 6, 9]


def test_tfds_builder_features_are_distill_record(tmp_path):
    """The builder's FeaturesDict comes from DISTILL_RECORD and is exactly the one datasets were built with
    (so existing prepared datasets still read); the raw examples the preprocessors expect match it too."""
    tfds = pytest.importorskip("tensorflow_datasets")
    from data_pipeline.seqio_input import tfds_builder

    features = tfds_builder.TwolarDistill(data_dir=str(tmp_path / "tfds")).info.features
    assert tuple(features.keys()) == DISTILL_RECORD.names
    text = tfds.features.Text()
    stored = tfds.features.FeaturesDict({  # the literal dict of builder version 1.0.0
        "qid": text, "query": text, "query_type": text,
        "docids": tfds.features.Sequence(tfds.features.Text()),
        "texts": tfds.features.Sequence(tfds.features.Text()),
        "teacher_scores": tfds.features.Sequence(tfds.features.Scalar(dtype=tf.float32)),
        "has_teacher_scores": tfds.features.Scalar(dtype=tf.bool),
    })
    assert features.to_json() == stored.to_json()
    assert preprocessors.RAW_SIGNATURE == {
        "qid": tf.TensorSpec([], tf.string), "query": tf.TensorSpec([], tf.string),
        "query_type": tf.TensorSpec([], tf.string), "docids": tf.TensorSpec([None], tf.string),
        "texts": tf.TensorSpec([None], tf.string), "teacher_scores": tf.TensorSpec([None], tf.float32),
        "has_teacher_scores": tf.TensorSpec([], tf.bool)}


def test_jsonl_source_runs_no_python_inside_tf_data(train_file):
    """A numpy_function/py_function in a parallel map deadlocks when the iterator is destroyed while its
    workers wait for the GIL (a hang at the end of training): the source must be pure graph ops."""
    index = tasks.load_index(train_file)
    ds = tasks.jsonl_dataset(index, shuffle=True, seed=3)
    graph = ds._as_serialized_graph().numpy().decode("latin-1")
    assert "PyFunc" not in graph and "EagerPyFunc" not in graph
    first = [ex["qid"].decode() for ex in ds.as_numpy_iterator()]
    assert sorted(first) == sorted(r.qid for r in formats.read_distill_jsonl(train_file))
    for _ in range(3):  # create and drop iterators mid-stream: must not hang
        it = iter(ds)
        next(it)
        del it
