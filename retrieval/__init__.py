"""The shared bottom layer for data and evaluation: corpora, queries, qrels, runs and candidate lists
(readers and writers), the one Lucene adapter, BM25, SPLADE, dense retrieval, BM25+monoT5 and fusion.

Both data_pipeline (building the distillation set) and eval (reranking and metrics) read text through
here, so the student trains on text built exactly like the text it is evaluated on.
"""
