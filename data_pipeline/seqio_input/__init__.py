"""The SeqIO input pipeline of training: tasks and mixtures over the distillation JSONL, preprocessors,
the listwise feature converter, the TFDS builder, and the batch source the trainer iterates."""
