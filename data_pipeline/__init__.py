"""Data for training: `set_builder` builds the distillation set (queries, candidates, teacher order; no
TensorFlow) and `seqio_input` feeds it to the trainer (SeqIO tasks, preprocessors, feature converter, TFDS
builder; the only TensorFlow user). `distill_format` is the JSONL between them."""
