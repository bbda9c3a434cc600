"""The LLM listwise teacher: RankGPT's prompt, sliding windows, permutation repair, cached calls.

Why: TWOLAR labels each query's candidates with an LLM's permutation (RankGPT style). Windows of 20
passages move from the bottom of the list to the top in steps of 10, so the best passages bubble up
to the first window. The model's answer ("[3] > [1] > [2]") is repaired when it is not a permutation
(duplicates and out-of-range numbers dropped, missing passages appended in their current order), and
every repair is counted. Each answered window is cached on disk under sha256(model + request), so an
interrupted build resumes without paying twice.

Queries run concurrently (one worker per allowed in-flight call); windows within a query are
sequential because each window's content depends on the previous answer.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

from data_pipeline.set_builder.cache import CallCache, request_key
from data_pipeline.set_builder.llm_client import CallFailed, ChatClient, ChatResponse, FatalAPIError
from data_pipeline.set_builder.token_count import TokenCounter, counter_for_model

log = logging.getLogger(__name__)

# The prompt follows RankGPT (Sun et al. 2023), sunnweiwei/RankGPT rank_gpt.py (`get_prefix_prompt`,
# `get_post_prompt`, `create_permutation_instruction`): a system line, the instruction, then one user
# turn per passage "[i] text" acknowledged by the assistant, then the ranking request. rank_llm's
# RankGPT mode (castorini/rank_llm) uses the same wording. TWOLAR used RankGPT's prompt unchanged.
# Bump PROMPT_VERSION whenever any of these strings change (it is recorded in the manifest).
PROMPT_VERSION = "rankgpt-v1"
SYSTEM_PROMPT = ("You are RankGPT, an intelligent assistant that can rank passages based on their relevancy "
                 "to the query.")
PREFIX_PROMPT = ("I will provide you with {num} passages, each indicated by number identifier []. \n"
                 "Rank the passages based on their relevance to query: {query}.")
PREFIX_ACK = "Okay, please provide the passages."
PASSAGE_ACK = "Received passage [{rank}]."
POST_PROMPT = ("Search Query: {query}. \nRank the {num} passages above based on their relevance to the search "
               "query. The passages should be listed in descending order using identifiers. The most relevant "
               "passages should be listed first. The output format should be [] > [], e.g., [1] > [2]. Only "
               "response the ranking results, do not say any word or explain.")


def build_messages(query: str, passages: Sequence[str], *, max_words: int = 300) -> list[dict[str, str]]:
    """RankGPT chat messages for one window; each passage is cut to its first `max_words` words."""
    num = len(passages)
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": PREFIX_PROMPT.format(num=num, query=query)},
        {"role": "assistant", "content": PREFIX_ACK},
    ]
    for rank, text in enumerate(passages, 1):
        content = " ".join(text.split()[:max_words])
        messages.append({"role": "user", "content": f"[{rank}] {content}"})
        messages.append({"role": "assistant", "content": PASSAGE_ACK.format(rank=rank)})
    messages.append({"role": "user", "content": POST_PROMPT.format(num=num, query=query)})
    return messages


@dataclasses.dataclass
class Repairs:
    """What `parse_permutation` had to fix in one answer."""

    duplicates: int = 0
    out_of_range: int = 0
    missing: int = 0
    unparseable: int = 0  # 1 when the answer held no usable identifier at all

    @property
    def repaired(self) -> bool:
        return bool(self.duplicates or self.out_of_range or self.missing or self.unparseable)

    def add(self, other: "Repairs") -> None:
        self.duplicates += other.duplicates
        self.out_of_range += other.out_of_range
        self.missing += other.missing
        self.unparseable += other.unparseable


_BRACKETED = re.compile(r"\[\s*(\d+)\s*\]")
_NUMBER = re.compile(r"\d+")


def parse_permutation(text: str, n: int) -> tuple[list[int], Repairs]:
    """0-based permutation of range(n) from an answer such as "[3] > [1] > [2]".

    Identifiers in brackets are read; if there are none, bare numbers are (as RankGPT's
    `clean_response` does). Duplicates and numbers outside 1..n are dropped, missing passages are
    appended in their current order; every fix is counted.
    """
    found = _BRACKETED.findall(text)
    if not found:
        found = _NUMBER.findall(text)
    repairs = Repairs()
    order: list[int] = []
    seen: set[int] = set()
    for token in found:
        idx = int(token) - 1
        if not 0 <= idx < n:
            repairs.out_of_range += 1
        elif idx in seen:
            repairs.duplicates += 1
        else:
            seen.add(idx)
            order.append(idx)
    if n and not order:
        repairs.unparseable = 1
    missing = [i for i in range(n) if i not in seen]
    repairs.missing = len(missing)
    return order + missing, repairs


def expected_answer(n: int) -> str:
    """A full permutation's answer for a window of n, "[1] > [2] > ... > [n]": what a completion is priced at."""
    return " > ".join(f"[{i}]" for i in range(1, n + 1))


def window_spans(n: int, window: int, step: int) -> list[tuple[int, int]]:
    """[start, end) windows from the bottom of a list of n to the top.

    n=30, window=20, step=10 -> [(10, 30), (0, 20)]. Unlike RankGPT's original loop, a list whose
    length is not window + k*step still gets a final window at the top (as rank_llm does).
    """
    if window < 1 or step < 1:
        raise ValueError(f"window and step must be >= 1, got {window}, {step}")
    if n <= 0:
        return []
    spans, end = [], n
    while True:
        start = max(0, end - window)
        spans.append((start, end))
        if start == 0:
            return spans
        end -= step


# ---------------------------------------------------------------------------------------------- shared


@dataclasses.dataclass(frozen=True)
class TeacherRequest:
    qid: str
    query: str
    passages: tuple[str, ...]


@dataclasses.dataclass
class QueryStats:
    """Per-query teacher accounting; one line of teacher_log.jsonl."""

    windows: int = 0
    api_calls: int = 0  # HTTP attempts, retries included
    cache_hits: int = 0
    retries: int = 0
    repaired_windows: int = 0
    repairs: Repairs = dataclasses.field(default_factory=Repairs)
    prompt_tokens: int = 0  # of calls made now (cache hits cost nothing)
    completion_tokens: int = 0
    cost: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cost"] = round(self.cost, 8)
        return d


@dataclasses.dataclass
class TeacherResult:
    qid: str
    order: list[int]  # indices into the request's passages, best first
    scores: list[float] | None  # aligned with `order`, when the teacher has scores
    stats: QueryStats


@dataclasses.dataclass
class RunStats:
    labelled: int = 0
    failed: int = 0
    failed_qids: list[str] = dataclasses.field(default_factory=list)
    aborted: str | None = None


class Teacher(Protocol):
    """Ranks candidate lists. `rank_all` calls `on_result` once per finished query (in completion
    order) and returns counts; queries it could not label are reported, not raised."""

    model_name: str
    prompt_version: str

    def rank_all(self, requests: Iterable[TeacherRequest], on_result: Callable[[TeacherResult], None], *,
                 work_dir: Path, total: int | None = None) -> RunStats:
        ...

    def describe(self) -> dict:
        ...

    def call_stats(self) -> dict:
        ...


# ---------------------------------------------------------------------------------------------- LLM


class ListwiseLLMTeacher:
    """RankGPT sliding-window teacher over an OpenAI-compatible server (see module docstring).

    cache_path: the call cache (default <work_dir>/llm_cache.jsonl); prices are per 1K tokens and only
    feed the manifest's cost estimate. token_counter: how tokens are counted when a response has no
    `usage`, and by the dry run (token_count.KINDS; 'auto': tiktoken for OpenAI models when offline-ready).
    """

    prompt_version = PROMPT_VERSION

    def __init__(
        self,
        *,
        client: ChatClient,
        window_size: int = 20,
        step: int = 10,
        max_words_per_passage: int = 300,
        cache_path: str | None = None,
        prompt_price_per_1k: float = 0.0,
        completion_price_per_1k: float = 0.0,
        progress: bool = True,
        token_counter: str = "auto",
    ):
        if step > window_size:
            raise ValueError(f"step ({step}) larger than window_size ({window_size}) would skip passages")
        window_spans(1, window_size, step)  # validates
        self.client = client
        self.window_size, self.step, self.max_words = window_size, step, max_words_per_passage
        self.cache_path = cache_path
        self.prompt_price, self.completion_price = prompt_price_per_1k, completion_price_per_1k
        self.progress = progress
        self.cache: CallCache | None = None
        self.cache_hits = 0
        self.repairs = Repairs()
        self.repaired_windows = 0
        self.token_counter_kind = token_counter
        self._counter: Optional[TokenCounter] = None

    @property
    def model_name(self) -> str:
        return self.client.model

    @property
    def counter(self) -> TokenCounter:
        """The token counter for this model, made once (loading a vocabulary is not free)."""
        if self._counter is None:
            self._counter = counter_for_model(self.model_name, self.token_counter_kind)
        return self._counter

    def window_messages(self, query: str, passages: Sequence[str]) -> list[dict[str, str]]:
        """The exact chat messages of one window: rank_query and the dry run's estimate build them here."""
        return build_messages(query, passages, max_words=self.max_words)

    def cache_key(self, messages: list[dict[str, str]]) -> str:
        """The call cache's key of one window's request (the model, the messages, the sampling params)."""
        return request_key(self.model_name, {"messages": messages, **self.client.request_params()})

    def planned_windows(self, req: TeacherRequest, cached: Optional[Mapping[str, dict]] = None
                        ) -> Iterator[tuple[list[dict[str, str]], int, bool]]:
        """(messages, n, cached) for each window rank_query would walk, by its own arithmetic, without a call.

        A window whose answer is in `cached` (the call cache's entries) is replayed from it, as rank_query
        does; an unanswered window is assumed to keep the current order, so the windows after it hold the
        passages that an order-keeping answer would leave there (their count and sizes are exact).
        """
        order = list(range(len(req.passages)))
        if len(order) < 2:  # rank_query makes no call
            return
        for start, end in window_spans(len(order), self.window_size, self.step):
            window = order[start:end]
            messages = self.window_messages(req.query, [req.passages[i] for i in window])
            hit = cached.get(self.cache_key(messages)) if cached else None
            yield messages, len(window), hit is not None
            if hit is not None:
                perm, _ = parse_permutation(hit["text"], len(window))
                order[start:end] = [window[p] for p in perm]

    def _usage(self, resp: ChatResponse, messages: list[dict[str, str]]) -> tuple[int, int]:
        """(prompt, completion) tokens of an answered call: the server's `usage`, else this teacher's count."""
        if resp.usage_reported:
            return resp.prompt_tokens, resp.completion_tokens
        pt, ct = self.counter.messages(messages), self.counter.text(resp.text)
        self.client.stats.prompt_tokens += pt
        self.client.stats.completion_tokens += ct
        return pt, ct

    def describe(self) -> dict:
        return {"kind": "listwise_llm", "model": self.model_name, "prompt_version": self.prompt_version,
                "window_size": self.window_size, "step": self.step, "max_words_per_passage": self.max_words,
                "prompt_price_per_1k": self.prompt_price, "completion_price_per_1k": self.completion_price,
                "token_counter": self.token_counter_kind, "endpoint": self.client.describe()}

    def call_stats(self) -> dict:
        s = self.client.stats.to_dict()
        s["cache_hits"] = self.cache_hits
        s["cost"] = round(self._cost(s["prompt_tokens"], s["completion_tokens"]), 8)
        return s

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return prompt_tokens / 1000.0 * self.prompt_price + completion_tokens / 1000.0 * self.completion_price

    def open_cache(self, work_dir: Path) -> CallCache:
        if self.cache is None:
            self.cache = CallCache(self.cache_path or Path(work_dir) / "llm_cache.jsonl")
        return self.cache

    async def rank_query(self, req: TeacherRequest) -> TeacherResult:
        """Sliding windows over one query's list; raises CallFailed / FatalAPIError from the client."""
        assert self.cache is not None, "open_cache() first"
        stats = QueryStats()
        order = list(range(len(req.passages)))
        if len(order) < 2:  # nothing to order: no call
            return TeacherResult(req.qid, order, None, stats)
        for start, end in window_spans(len(order), self.window_size, self.step):
            window = order[start:end]
            messages = self.window_messages(req.query, [req.passages[i] for i in window])
            key = self.cache_key(messages)
            stats.windows += 1
            hit = self.cache.get(key)
            if hit is not None:
                text = hit["text"]
                stats.cache_hits += 1
                self.cache_hits += 1
            else:
                resp = await self.client.complete(messages)
                text = resp.text
                stats.api_calls += resp.attempts
                stats.retries += resp.attempts - 1
                prompt_tokens, completion_tokens = self._usage(resp, messages)
                stats.prompt_tokens += prompt_tokens
                stats.completion_tokens += completion_tokens
                self.cache.put(key, model=self.model_name, text=text, prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens)
            perm, repairs = parse_permutation(text, len(window))
            if repairs.repaired:
                stats.repaired_windows += 1
                self.repaired_windows += 1
            stats.repairs.add(repairs)
            self.repairs.add(repairs)
            order[start:end] = [window[p] for p in perm]
        stats.cost = self._cost(stats.prompt_tokens, stats.completion_tokens)
        return TeacherResult(req.qid, order, None, stats)

    async def _rank_all(self, requests: Iterator[TeacherRequest], on_result: Callable[[TeacherResult], None],
                        run: RunStats, pbar) -> None:
        stop = asyncio.Event()
        fatal: list[BaseException] = []

        async def worker() -> None:
            while not stop.is_set():
                try:
                    req = next(requests)
                except StopIteration:
                    return
                try:
                    result = await self.rank_query(req)
                except CallFailed as e:
                    run.failed += 1
                    run.failed_qids.append(req.qid)
                    log.warning("query %s left unlabelled: %s", req.qid, e)
                    pbar.update(1)
                    continue
                except FatalAPIError as e:
                    fatal.append(e)
                    stop.set()
                    return
                on_result(result)
                run.labelled += 1
                pbar.update(1)
                pbar.set_postfix(calls=self.client.stats.attempts, cached=self.cache_hits, refresh=False)

        try:
            await asyncio.gather(*(worker() for _ in range(self.client.max_concurrency)))
        finally:
            await self.client.aclose()
        if fatal:
            raise fatal[0]

    def rank_all(self, requests: Iterable[TeacherRequest], on_result: Callable[[TeacherResult], None], *,
                 work_dir: Path, total: int | None = None) -> RunStats:
        from twolar_jax.progress import progress_bar

        self.open_cache(work_dir)
        run = RunStats()
        with progress_bar(total=total, desc=f"teacher {self.model_name}", unit="query", disable=not self.progress,
                  dynamic_ncols=True) as pbar:
            try:
                asyncio.run(self._rank_all(iter(requests), on_result, run, pbar))
            except FatalAPIError as e:
                run.aborted = str(e)
        return run

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
