"""The build manifest: what is in the distillation set and what it cost, rewritten atomically.

Why: a build runs for days and is resumed; the manifest must describe the files as they are, so its
counts come from the durable files (read once at start, then updated as lines are appended), and each
run's call accounting is kept in a `runs` list that a resume extends instead of overwriting.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from twolar_jax.durable_io import write_json_atomic

MANIFEST_VERSION = 1


def _zero_repairs() -> dict[str, int]:
    return {"duplicates": 0, "out_of_range": 0, "missing": 0, "unparseable": 0}


class ManifestState:
    """Counters over queries, candidates, labelled records and per-query teacher logs."""

    def __init__(self, *, depth: int, retrievers: list[str]):
        self.depth = depth
        self.retrievers = list(retrievers)
        self.candidate_queries = 0
        self.no_candidates = 0
        self.short_lists = 0  # queries with fewer than `depth` merged candidates
        self.retrieved_hits: Counter = Counter()
        self.short_of_k: Counter = Counter()
        self.missing_hits: Counter = Counter()
        self.unknown_docids: Counter = Counter()
        self.labelled = 0
        self.labelled_by_type: Counter = Counter()
        self.candidates_by_source: Counter = Counter()
        self.labelled_candidates = 0
        self.teacher_logs: dict[str, dict] = {}

    def add_candidates(self, obj: Mapping[str, Any]) -> None:
        self.candidate_queries += 1
        cands = obj.get("candidates", [])
        if not cands:
            self.no_candidates += 1
        elif len(cands) < self.depth:
            self.short_lists += 1
        for name, info in obj.get("retrieval", {}).items():
            self.retrieved_hits[name] += info.get("hits", 0)
            self.missing_hits[name] += info.get("missing", 0)
            self.unknown_docids[name] += info.get("unknown_docids", 0)
            if info.get("missing", 0):
                self.short_of_k[name] += 1

    def add_record(self, query_type: str, sources: list[str]) -> None:
        self.labelled += 1
        self.labelled_by_type[query_type] += 1
        self.candidates_by_source.update(sources)
        self.labelled_candidates += len(sources)

    def add_teacher_log(self, obj: Mapping[str, Any]) -> None:
        self.teacher_logs[str(obj["qid"])] = dict(obj)

    def teacher_totals(self, labelled_qids: set[str] | None = None) -> dict:
        """Sums over the last log line of each labelled query (all logged queries when qids is None)."""
        totals: dict[str, Any] = {"windows": 0, "api_calls": 0, "cache_hits": 0, "retries": 0,
                                  "repaired_windows": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0,
                                  "repairs": _zero_repairs()}
        for qid, log in self.teacher_logs.items():
            if labelled_qids is not None and qid not in labelled_qids:
                continue
            for key in ("windows", "api_calls", "cache_hits", "retries", "repaired_windows", "prompt_tokens",
                        "completion_tokens", "cost"):
                totals[key] += log.get(key, 0)
            for key, value in log.get("repairs", {}).items():
                totals["repairs"][key] = totals["repairs"].get(key, 0) + value
        totals["cost"] = round(totals["cost"], 8)
        return totals

    def to_dict(self, *, labelled_qids: set[str] | None = None) -> dict:
        return {
            "candidates": {
                "queries": self.candidate_queries,
                "depth": self.depth,
                "no_candidates": self.no_candidates,
                "short_lists": self.short_lists,
                "by_retriever": {
                    name: {"hits": self.retrieved_hits[name], "queries_short_of_k": self.short_of_k[name],
                           "missing_hits": self.missing_hits[name], "unknown_docids": self.unknown_docids[name]}
                    for name in self.retrievers
                },
            },
            "labelled": {
                "queries": self.labelled,
                "by_query_type": dict(sorted(self.labelled_by_type.items())),
                "candidates": self.labelled_candidates,
                "candidates_by_source": dict(sorted(self.candidates_by_source.items())),
            },
            "teacher_labels": self.teacher_totals(labelled_qids),
        }


def load_runs(path: Path) -> list[dict]:
    """The `runs` list of an existing manifest (empty when there is none or it is unreadable)."""
    try:
        return list(json.loads(Path(path).read_text()).get("runs", []))
    except (OSError, ValueError, AttributeError):
        return []


def write_manifest(path: Path, *, state: ManifestState, build: Mapping[str, Any], teacher: Mapping[str, Any],
                   queries: Mapping[str, Any], runs: list[dict], labelled_qids: set[str] | None = None) -> Path:
    """Assemble and atomically write manifest.json. `runs[-1]` is the current run's live counters."""
    calls = {"attempts": 0, "successes": 0, "retries": 0, "cache_hits": 0, "prompt_tokens": 0,
             "completion_tokens": 0, "cost": 0.0}
    for run in runs:
        for key in calls:
            calls[key] += run.get("teacher_calls", {}).get(key, 0)
    calls["cost"] = round(calls["cost"], 8)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build": dict(build),
        "teacher": dict(teacher),
        "queries": dict(queries),
        **state.to_dict(labelled_qids=labelled_qids),
        "calls_all_runs": calls,
        "runs": runs,
    }
    return write_json_atomic(path, manifest)
