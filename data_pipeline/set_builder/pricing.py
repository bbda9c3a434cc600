"""What a build's teacher stage will cost, before it runs (`--dry_run`), and what it spent against that.

Why: a distillation set is labelled by a paid LLM over tens of thousands of windows; the price should be
known before the first call, and a running build should show how far its spending is from the estimate.
The estimate walks the teacher's own windows (ListwiseLLMTeacher.planned_windows: the same window/step
arithmetic and prompt construction as the calls) and counts each prompt with the teacher's counter
(token_count.py); a completion is priced as the expected answer for a full permutation of its window,
"[1] > [2] > ... > [n]". Windows already in the call cache are replayed and cost nothing, as in the build.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional

from data_pipeline.set_builder.teacher import TeacherRequest, expected_answer
from twolar_jax.errors import OptionError


@dataclasses.dataclass(frozen=True)
class Prices:
    """USD per million input (prompt) and output (completion) tokens."""

    input_per_million: float = 0.0
    output_per_million: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_million + completion_tokens * self.output_per_million) / 1e6


def parse_price(value: Any) -> float:
    """A price as a float; ValueError (saying why, not naming the option) unless it is finite and >= 0."""
    try:
        price = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a number of USD per million tokens") from None
    if not math.isfinite(price) or price < 0:
        raise ValueError("a price must be a finite number >= 0 (USD per million tokens)")
    return price


def check_price(option: str, value: Any) -> Optional[float]:
    """parse_price for an option that may be unset (None stays None); a bad price is an OptionError naming it."""
    if value is None:
        return None
    try:
        return parse_price(value)
    except ValueError as e:
        raise OptionError(f"{option}={value!r}: {e}") from None


def resolve_prices(teacher: Any, input_per_million: Optional[float], output_per_million: Optional[float]) -> Prices:
    """The given per-million prices; each one not given falls back to the teacher's per-1K price x 1000 (or 0)."""
    inp = check_price("price_per_million_input", input_per_million)
    out = check_price("price_per_million_output", output_per_million)
    if inp is None:
        inp = float(getattr(teacher, "prompt_price", 0.0) or 0.0) * 1000.0
    if out is None:
        out = float(getattr(teacher, "completion_price", 0.0) or 0.0) * 1000.0
    return Prices(inp, out)


def tolerant_jsonl(path: Path) -> Iterator[dict]:
    """A JSONL file's objects, read only: a line that does not parse (a torn tail the build would cut) is skipped."""
    if not Path(path).is_file():
        return
    with open(path, "rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                continue
            if isinstance(obj, dict):
                yield obj


def read_cached_answers(path: Path) -> dict[str, dict]:
    """The call cache's answers by key, read only (a foreign line is skipped, as the cache skips it)."""
    return {obj["key"]: obj for obj in tolerant_jsonl(path)
            if isinstance(obj.get("key"), str) and isinstance(obj.get("text"), str)}


@dataclasses.dataclass
class Estimate:
    """The windows, tokens and cost of the calls a teacher stage would make."""

    queries: int = 0
    windows: int = 0
    cached_windows: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    token_counter: str = "none"
    prices: Prices = dataclasses.field(default_factory=Prices)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["cost"] = round(self.cost, 8)
        return d

    def line(self) -> str:
        """The dry run's one output line (key=value, no spaces inside a value)."""
        return (f"dry_run queries={self.queries} windows={self.windows} cached_windows={self.cached_windows} "
                f"prompt_tokens={self.prompt_tokens} completion_tokens={self.completion_tokens} "
                f"cost={self.cost:.4f} price_per_million_input={self.prices.input_per_million:g} "
                f"price_per_million_output={self.prices.output_per_million:g} token_counter={self.token_counter}")


def estimate(teacher: Any, requests: Iterable[TeacherRequest], prices: Prices,
             cached: Optional[Mapping[str, dict]] = None) -> Estimate:
    """Count the windows and tokens `teacher` would send for `requests`; no call is made.

    A teacher without `planned_windows` (the offline teacher) sends nothing: zero windows, zero cost.
    """
    est = Estimate(prices=prices)
    plan = getattr(teacher, "planned_windows", None)
    if plan is None:
        est.queries = sum(1 for _ in requests)
        return est
    counter = teacher.counter
    est.token_counter = counter.name
    for req in requests:
        est.queries += 1
        for messages, n, hit in plan(req, cached):
            if hit:
                est.cached_windows += 1
                continue
            est.windows += 1
            est.prompt_tokens += counter.messages(messages)
            est.completion_tokens += counter.text(expected_answer(n))
    est.cost = prices.cost(est.prompt_tokens, est.completion_tokens)
    return est


def spent(paid: Mapping[str, Any], prices: Prices) -> dict:
    """What a run spent (the call-cache lines it appended: the servers' usage, else the counter) at the estimate's prices."""
    pt, ct = int(paid.get("prompt_tokens", 0)), int(paid.get("completion_tokens", 0))
    return {"windows": int(paid.get("answers", 0)), "prompt_tokens": pt, "completion_tokens": ct,
            "cost": round(prices.cost(pt, ct), 8)}


def settle_spent(runs: list[dict]) -> None:
    """Each estimated run's `spent` from its `paid` (which CallLedger settles after a kill -9), at its own prices."""
    for run in runs:
        if run.get("estimate") and "paid" in run:
            run["spent"] = spent(run["paid"], Prices(**run["estimate"].get("prices", {})))


def progress_line(run: Mapping[str, Any]) -> str:
    """One log line of tokens spent so far against the run's estimate."""
    est, got = run.get("estimate") or {}, run.get("spent") or {}
    return (f"teacher spent {got.get('windows', 0)}/{est.get('windows', 0)} windows, "
            f"prompt_tokens {got.get('prompt_tokens', 0)}/{est.get('prompt_tokens', 0)}, "
            f"completion_tokens {got.get('completion_tokens', 0)}/{est.get('completion_tokens', 0)}, "
            f"cost {got.get('cost', 0.0):.4f}/{est.get('cost', 0.0):.4f} USD (spent/estimated)")
