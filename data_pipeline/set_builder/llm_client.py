"""A chat-completions client for any OpenAI-compatible server, with our own retries and exact counts.

Why not the openai client's retries: we must know exactly how many calls were made and paid for, and
honour a server's Retry-After under many concurrent callers. So the official `openai.AsyncOpenAI` is
built with `max_retries=0`, and this wrapper retries 429 (waiting Retry-After / retry-after-ms when
given), 5xx, 408/409, timeouts and connection errors with exponential backoff and jitter; any other
4xx (bad key, unknown model) is fatal and stops the build. The API key is read from gin or
$OPENAI_API_KEY, kept in memory only, and scrubbed from every message this module produces.
"""
from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import ipaddress
import logging
import os
import random
import re
import time
from typing import Any, Mapping, Sequence
from urllib.parse import urlsplit, urlunsplit

from twolar_jax.errors import OptionError
from twolar_jax.secrets import redact as redact_secrets
from twolar_jax.secrets import register_secret, register_url_credentials

log = logging.getLogger(__name__)

_KEY_LIKE = re.compile(r"(sk|key|tok)-[A-Za-z0-9_\-*.]{4,}")


class FatalAPIError(RuntimeError):
    """A response that retrying cannot fix (401, 403, 404, 400...): the build stops, finished work stays."""


class CallFailed(RuntimeError):
    """Retries exhausted for one call: the query stays unlabelled and is retried on the next run."""


@dataclasses.dataclass
class ChatResponse:
    text: str
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    usage_reported: bool = True  # False: the server sent no `usage`, the token counts above are 0


@dataclasses.dataclass
class ClientStats:
    """Counts over every HTTP attempt this client made (cache hits never reach it)."""

    attempts: int = 0
    successes: int = 0
    retries: int = 0
    retries_429: int = 0
    retries_5xx: int = 0
    retries_timeout: int = 0
    retries_connection: int = 0
    retries_other: int = 0
    failed_calls: int = 0
    fatal_errors: int = 0
    missing_usage: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retry_wait_s: float = 0.0

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["retry_wait_s"] = round(d["retry_wait_s"], 3)
        return d


def _is_local(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def safe_url(url: str | None) -> str | None:
    """The URL without user:password@ (for the manifest and logs)."""
    if url is None:
        return None
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def _without_userinfo(url: str | None) -> str | None:
    """The URL with any user:password@ removed (query and fragment kept)."""
    if not url:
        return None
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds from `retry-after-ms`, or `retry-after` as seconds or an HTTP date; None if absent."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        return max(0.0, email.utils.mktime_tz(parsed) - time.time())


class ChatClient:
    """Bounded-concurrency chat completions with retries.

    base_url/api_key default to $OPENAI_BASE_URL/$OPENAI_API_KEY; a password in the URL
    (`http://user:KEY@host/v1`) is the key when api_key is not given, and the URL is used without it.
    A server on a loopback address (vLLM, Ollama, TGI on this machine) may go without a key. Every
    key and URL credential is registered with twolar_jax.secrets, so it is redacted wherever it appears. `request_params()` (temperature,
    max_tokens, extra_body) is part of the teacher's cache key.
    """

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 8,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_concurrency: int = 16,
        temperature: float = 0.0,
        max_tokens: int | None = None,
        extra_body: Mapping[str, Any] | None = None,
        seed: int | None = None,
    ):
        if not model:
            raise OptionError("llm_client.ChatClient.model is required (the teacher LLM's name on the server)")
        if max_concurrency < 1 or max_retries < 0 or timeout_s <= 0:
            raise OptionError(f"llm_client.ChatClient: need max_concurrency >= 1 (got {max_concurrency}), "
                              f"max_retries >= 0 (got {max_retries}) and timeout_s > 0 (got {timeout_s})")
        self.model = model
        url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        url_key = register_url_credentials(url)
        self.base_url = _without_userinfo(url)  # the credentials never reach openai/httpx or a log
        key = api_key or url_key or os.environ.get("OPENAI_API_KEY") or None
        if key is None:
            if _is_local(urlsplit(self.base_url).hostname if self.base_url else None):
                key = "EMPTY"
            else:
                raise OptionError("no API key: set OPENAI_API_KEY (or llm_client.ChatClient.api_key in gin, or "
                                  "http://user:KEY@host/v1 as ChatClient.base_url)")
        if key != "EMPTY":
            register_secret(key)  # redacted by value from configs, logs and messages, whatever route it came by
        self.__key = key
        self.timeout_s, self.max_retries = float(timeout_s), int(max_retries)
        self.backoff_base_s, self.backoff_max_s = float(backoff_base_s), float(backoff_max_s)
        self.max_concurrency = int(max_concurrency)
        self.temperature, self.max_tokens = temperature, max_tokens
        self.extra_body = dict(extra_body) if extra_body else None
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._clients: list = []
        self._next = 0
        self._sem: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return f"ChatClient(model={self.model!r}, base_url={safe_url(self.base_url)!r})"

    def redact(self, text: str) -> str:
        """Remove the key (and anything key-shaped, e.g. a server's masked echo of it) from text."""
        if self.__key and self.__key != "EMPTY":
            text = text.replace(self.__key, "***")
        return redact_secrets(_KEY_LIKE.sub(r"\1-***", text))

    def request_params(self) -> dict:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = int(self.max_tokens)
        if self.extra_body:
            params["extra_body"] = self.extra_body
        return params

    def describe(self) -> dict:
        """What the manifest records about the endpoint (never the key)."""
        return {"model": self.model, "base_url": safe_url(self.base_url), "timeout_s": self.timeout_s,
                "max_retries": self.max_retries, "max_concurrency": self.max_concurrency,
                **{k: v for k, v in self.request_params().items() if k != "extra_body"}}

    def _ensure_client(self):
        """The official AsyncOpenAI clients, built inside the running loop.

        Connections are split over several clients of at most 8 connections each: httpcore scans
        every connection of its pool on each request, which made one 64-connection pool cost ~5 ms
        of CPU per call (the throughput benchmark measures this).
        """
        if not self._clients:
            import httpx
            import openai

            n_pools = max(1, -(-self.max_concurrency // 8))
            per_pool = -(-self.max_concurrency // n_pools)
            limits = httpx.Limits(max_connections=per_pool, max_keepalive_connections=per_pool)
            timeout = httpx.Timeout(self.timeout_s, connect=min(10.0, self.timeout_s))
            self._clients = [
                openai.AsyncOpenAI(api_key=self.__key, base_url=self.base_url, max_retries=0, timeout=timeout,
                                   http_client=httpx.AsyncClient(limits=limits, timeout=timeout))
                for _ in range(n_pools)
            ]
            self._sem = asyncio.Semaphore(self.max_concurrency)
        self._next = (self._next + 1) % len(self._clients)
        return self._clients[self._next]

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients = []
        self._sem = None

    def _backoff(self, retry_index: int) -> float:
        """Equal jitter: half of min(cap, base * 2^i) plus a uniform draw over the other half."""
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** retry_index))
        return cap / 2 + self._rng.uniform(0, cap / 2)

    async def complete(self, messages: Sequence[Mapping[str, str]]) -> ChatResponse:
        """One chat completion, retried as documented; raises CallFailed or FatalAPIError."""
        import openai
        from openai.types.chat import ChatCompletion

        client = self._ensure_client()
        assert self._sem is not None
        params = self.request_params()
        extra_body = params.pop("extra_body", None)
        last_reason = ""
        for attempt in range(self.max_retries + 1):
            retry_after: float | None = None
            async with self._sem:
                self.stats.attempts += 1
                try:
                    # `post` on the official client: same auth, base URL, timeouts and typed errors as
                    # chat.completions.create, without its per-message TypedDict transform, which costs
                    # ~35 ms of CPU for a 20-passage prompt and capped us near 70 calls/s.
                    body = {"model": self.model, "messages": list(messages), **params, **(extra_body or {})}
                    resp = await client.post("/chat/completions", cast_to=ChatCompletion, body=body)
                except openai.RateLimitError as e:
                    kind, retry_after = "429", parse_retry_after(getattr(e.response, "headers", None))
                    last_reason = f"429 rate limited"
                except openai.APITimeoutError:
                    kind, last_reason = "timeout", f"timed out after {self.timeout_s:g}s"
                except openai.APIConnectionError as e:
                    kind, last_reason = "connection", f"connection error: {type(e).__name__}"
                except openai.APIStatusError as e:
                    status = e.status_code
                    if status >= 500:
                        kind = "5xx"
                    elif status in (408, 409):
                        kind = "other"
                    else:
                        self.stats.fatal_errors += 1
                        raise FatalAPIError(self.redact(f"HTTP {status} from {safe_url(self.base_url) or 'OpenAI'}: "
                                                        f"{e.message}")) from None
                    last_reason = f"HTTP {status}"
                    retry_after = parse_retry_after(getattr(e.response, "headers", None))
                else:
                    self.stats.successes += 1
                    text = ""
                    if resp.choices:
                        text = resp.choices[0].message.content or ""
                    usage = resp.usage
                    if usage is None:
                        self.stats.missing_usage += 1
                    pt = int(getattr(usage, "prompt_tokens", 0) or 0)
                    ct = int(getattr(usage, "completion_tokens", 0) or 0)
                    self.stats.prompt_tokens += pt
                    self.stats.completion_tokens += ct
                    return ChatResponse(text=text, prompt_tokens=pt, completion_tokens=ct, attempts=attempt + 1,
                                        usage_reported=usage is not None)
            if attempt == self.max_retries:
                break
            self.stats.retries += 1
            setattr(self.stats, f"retries_{kind}", getattr(self.stats, f"retries_{kind}") + 1)
            wait = self._backoff(attempt)
            if retry_after is not None:
                wait = retry_after + self._rng.uniform(0, 0.1 * max(retry_after, 0.1))
            self.stats.retry_wait_s += wait
            log.debug("retrying after %s (attempt %d) in %.2fs", last_reason, attempt + 1, wait)
            await asyncio.sleep(wait)
        self.stats.failed_calls += 1
        raise CallFailed(self.redact(f"gave up after {self.max_retries + 1} attempts: {last_reason}"))
