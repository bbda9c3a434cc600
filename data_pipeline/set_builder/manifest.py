"""The build manifest: what is in the distillation set and what it cost, rewritten atomically.

Why: a build runs for days and is resumed; the manifest must describe the files as they are, so its
counts come from the durable files (read once at start, then updated as lines are appended), and each
run's call accounting is kept in a `runs` list that a resume extends instead of overwriting.

What the build paid is counted from the call cache, not from teacher_log.jsonl: every answered call is
appended to the cache once, before anything is built from it, so the cache bytes a run appended are its
paid calls, whatever moment a kill -9 chose. A teacher_log line is written before its train.jsonl line;
a kill between them leaves a logged query that the next run labels again from the cache (a second log
line with the windows as cache hits), so per query the paid fields are summed over its log lines and the
label fields (windows, cache hits, repairs) are its last line's.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

from twolar_jax.durable_io import write_json_atomic

MANIFEST_VERSION = 1


PAID_FIELDS = ("api_calls", "retries", "prompt_tokens", "completion_tokens", "cost")


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
        """A query's later log line replaces its label fields and adds to its paid fields (see module doc)."""
        qid, entry = str(obj["qid"]), dict(obj)
        previous = self.teacher_logs.get(qid)
        if previous is not None:
            for key in PAID_FIELDS:
                entry[key] = previous.get(key, 0) + obj.get(key, 0)
        self.teacher_logs[qid] = entry

    def teacher_totals(self, labelled_qids: set[str] | None = None) -> dict:
        """Sums over the labelled queries (all logged queries when qids is None) of add_teacher_log's entries."""
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


def _file_size(path: str | Path) -> int:
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        return 0


def cache_usage(path: str | Path, start: int, end: int | None = None) -> tuple[dict[str, int], int]:
    """Answers and tokens in the call cache's complete lines from byte `start` to `end` (EOF when None);
    also returns the offset just past the last complete line, where the next count starts."""
    usage = {"answers": 0, "prompt_tokens": 0, "completion_tokens": 0}
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read() if end is None else f.read(max(0, end - start))
    except FileNotFoundError:
        return usage, start
    cut = data.rfind(b"\n") + 1
    for raw in data[:cut].splitlines():
        try:
            obj = json.loads(raw)
        except ValueError:
            continue  # a line the cache itself ignores is no answer
        if isinstance(obj, dict) and isinstance(obj.get("key"), str) and isinstance(obj.get("text"), str):
            usage["answers"] += 1
            usage["prompt_tokens"] += int(obj.get("prompt_tokens", 0))
            usage["completion_tokens"] += int(obj.get("completion_tokens", 0))
    return usage, start + cut


class CallLedger:
    """What the build paid for: the call-cache lines each run appended, i.e. its byte range of the cache.

    Each answered call is appended to the cache once, before anything is built from it, so counting a
    run's range counts each paid answer once, at any kill. A run's range starts at the cache's size when
    it opened the cache (a torn last line already cut) and ends at the last line counted; a run killed
    with -9 is settled by the next start: its range ends where the next run's begins. A cache shared with
    another build counts only this build's lines (the two must not run at the same time).
    """

    def __init__(self, path: str | Path, *, prompt_price_per_1k: float = 0.0, completion_price_per_1k: float = 0.0):
        self.path = Path(path)
        self.prices = (float(prompt_price_per_1k or 0.0), float(completion_price_per_1k or 0.0))

    def _priced(self, usage: Mapping[str, int]) -> dict:
        cost = usage["prompt_tokens"] / 1000.0 * self.prices[0] + usage["completion_tokens"] / 1000.0 * self.prices[1]
        return {**usage, "cost": round(cost, 8)}

    def start(self, run: dict) -> None:
        """Open the current run's range at the cache's end."""
        size = _file_size(self.path)
        run["cache"] = {"path": str(self.path), "start": size, "end": size}
        run["paid"] = self._priced({"answers": 0, "prompt_tokens": 0, "completion_tokens": 0})

    def advance(self, run: dict) -> None:
        """Count the lines appended since the last call into the current run's `paid`."""
        rng = run["cache"]
        usage, rng["end"] = cache_usage(self.path, rng["end"])
        total = {key: run["paid"][key] + usage[key] for key in usage}
        run["paid"] = self._priced(total)

    def settle(self, runs: list[dict]) -> None:
        """Recount each killed run's range up to the start of the next run on the same cache (or its end)."""
        for i, run in enumerate(runs):
            rng = run.get("cache")
            if run.get("status") != "killed" or not rng or rng.get("settled"):
                continue
            later = [r["cache"]["start"] for r in runs[i + 1:] if r.get("cache", {}).get("path") == rng["path"]]
            end = later[0] if later else _file_size(rng["path"])
            usage, rng["end"] = cache_usage(rng["path"], rng["start"], end)
            rng["settled"] = True
            run["paid"] = self._priced(usage)


def paid_totals(runs: list[dict]) -> dict:
    """The build's paid answers, tokens and cost: the sum of every run's call-cache range."""
    totals: dict[str, Any] = {"answers": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
    for run in runs:
        for key in totals:
            totals[key] += run.get("paid", {}).get(key, 0)
    totals["cost"] = round(totals["cost"], 8)
    return totals


def estimate_and_spent(runs: list[dict]) -> dict:
    """The build's estimate (its first estimated run's, made before that run's calls) and what all runs spent."""
    estimates = [run["estimate"] for run in runs if run.get("estimate")]
    spent: dict[str, Any] = {"windows": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost": 0.0}
    for run in runs:
        for key in spent:
            spent[key] += run.get("spent", {}).get(key, 0)
    spent["cost"] = round(spent["cost"], 8)
    return {"estimate": estimates[0] if estimates else None, "spent": spent}


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
        "paid": paid_totals(runs),
        "tokens": estimate_and_spent(runs),
        "calls_all_runs": calls,
        "runs": runs,
    }
    return write_json_atomic(path, manifest)
