"""What the build's gin files may name, registered through the one helper (twolar_jax.gin_utils.register)."""
from __future__ import annotations

from typing import Any

from twolar_jax import configurables as library
from twolar_jax import gin_utils


def register_build() -> Any:
    """Register the build entry and its pluggable parts (query sources, retrievers, teachers); returns the
    configured `build`. Idempotent."""
    from data_pipeline.set_builder import build, llm_client, offline_teacher, queries, teacher
    from retrieval import bm25, dense, monot5, run_file, splade

    library.register_resources()
    for obj in (queries.CroppedSentences, queries.DocT5Query, queries.OriginalQueries):
        gin_utils.register(obj, module="queries")
    for obj in (bm25.BM25Retriever, splade.SpladeRetriever, dense.DenseRetriever, monot5.MonoT5Retriever,
                run_file.RunFileRetriever):
        gin_utils.register(obj, module="retrievers")
    gin_utils.register(llm_client.ChatClient, module="llm_client")
    gin_utils.register(teacher.ListwiseLLMTeacher, module="teacher")
    for obj in (offline_teacher.OfflineTeacher, offline_teacher.SentenceTransformerScorer,
                offline_teacher.RerankerScorer, offline_teacher.bundled_minilm_path):
        gin_utils.register(obj, module="offline_teacher")
    return gin_utils.register(build.build, name="build")
