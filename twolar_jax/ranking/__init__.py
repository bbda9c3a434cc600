"""Ranking models: the interface every student family implements, its feature declarations, and the
first family (the pointwise T5 cross-encoder). See docs/architecture.md, "Adding a model family"."""
