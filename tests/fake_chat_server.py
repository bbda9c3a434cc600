"""A real HTTP server on 127.0.0.1 that speaks OpenAI chat completions and answers from a scripted plan.

Why: the teacher's retries, repairs, cache and resume logic must be tested against real sockets,
real timeouts and real status codes, with no network and no key. The server reads RankGPT prompts,
knows the "right" order (passages carrying `grade=N` rank by N descending, ties in given order), and
for each query (the text after "Search Query:") plays the plan's actions in order, one per request;
when a query's actions run out it answers right. Actions:

    ok            the right permutation, "[3] > [1] > [2]"
    malformed     prose without any identifier
    dup           the right permutation with its first identifier repeated once
    oob           the right permutation with one identifier n+5 inserted after the first
    partial       the right permutation without its last two identifiers
    429[:S]       HTTP 429 with Retry-After: S (default 1)
    500           HTTP 500
    hang[:S]      sleep S seconds (default 5) before answering right: past the client's timeout
    401           HTTP 401 (a bad key: fatal)

Usage: prompt_tokens = words in all messages, completion_tokens = words in the answer (logged with the
call as `usage`; `send_usage = False` leaves it out of the response, as some servers do). Every request
is logged in `calls` with its messages (never the key: only whether the bearer token matched
`expected_key`). A request whose body did not fully arrive (a client killed between sending the
headers and the body: httpcore writes them separately) is no request: no call is logged, no action is
played, it goes to `incomplete`. `wait_idle()` waits until no connection is open, e.g. until every
request a killed client had sent has been read and logged.
Run as a script for the benchmark: `python tests/fake_chat_server.py` prints "PORT <n>" and serves.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data_pipeline.set_builder.cache import request_key  # noqa: E402

_QUERY = re.compile(r"^Search Query: (.*)\. \nRank the (\d+) passages above", re.S)
_PASSAGE = re.compile(r"^\[(\d+)\] (.*)$", re.S)
_GRADE = re.compile(r"grade=(\d+)")


def right_order(passages: list[str]) -> list[int]:
    """0-based order by grade descending, ties in given order (the server's notion of 'right')."""
    def grade(text: str) -> int:
        m = _GRADE.search(text)
        return int(m.group(1)) if m else 0
    return sorted(range(len(passages)), key=lambda i: (-grade(passages[i]), i))


def render(order: list[int]) -> str:
    return " > ".join(f"[{i + 1}]" for i in order)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args: Any) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:  # noqa: N802 (http.server API)
        t_start = time.time()
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        if len(raw) < length:  # the client died mid-request: nothing was asked (an empty body is not `{}`)
            self.server.fake.log_incomplete({"t_start": t_start, "content_length": length, "received": len(raw)})
            self.close_connection = True
            return
        body = json.loads(raw or b"{}")
        if not self.path.endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        fake: FakeChatServer = self.server.fake
        messages = body.get("messages", [])
        query, passages = "", []
        for m in messages:
            if m.get("role") != "user":
                continue
            content = m.get("content", "")
            pm = _PASSAGE.match(content)
            qm = _QUERY.match(content)
            if qm:
                query = qm.group(1)
            elif pm:
                passages.append(pm.group(2))
        action = fake.next_action(query)
        params = {k: body[k] for k in ("temperature", "max_tokens") if k in body}
        entry = {"query": query, "n": len(passages), "action": action, "t_start": t_start, "messages": messages,
                 "cache_key": request_key(body.get("model", ""), {"messages": messages, **params}),
                 "auth_ok": self.headers.get("Authorization") == f"Bearer {fake.expected_key}"}
        fake.log(entry)  # at receipt: a request whose client gave up (hang) is still counted
        name, _, arg = action.partition(":")
        order = right_order(passages)
        if name == "hang":
            time.sleep(float(arg or 5))
        if name == "429":
            self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                       {"Retry-After": arg or "1"})
            return
        if name in ("500", "401"):
            message = f"scripted {name}"
            if name == "401" and fake.echo_key_on_401:
                message = f"Incorrect API key provided: {self.headers.get('Authorization', '')[len('Bearer '):]}"
            self._send(int(name), {"error": {"message": message, "type": "server_error"}})
            return
        if fake.delay_s:
            time.sleep(fake.delay_s)
        if name == "malformed":
            text = "I am sorry, but I cannot rank these passages."
        elif name == "dup" and order:
            text = render([order[0], *order])
        elif name == "oob" and order:
            text = " > ".join([f"[{order[0] + 1}]", f"[{len(order) + 5}]", *[f"[{i + 1}]" for i in order[1:]]])
        elif name == "partial":
            text = render(order[:-2])
        else:
            text = render(order)
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in messages)
        completion_tokens = len(text.split())
        entry.update(t_end=time.time(), text=text, usage={"prompt_tokens": prompt_tokens, "completion_tokens":
                     completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
        self._send(200, {
            "id": f"chatcmpl-{len(fake.calls)}", "object": "chat.completion", "created": int(t_start),
            "model": body.get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            **({"usage": entry["usage"]} if fake.send_usage else {}),
        })


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    fake: "FakeChatServer"

    def process_request(self, request: Any, client_address: Any) -> None:  # at accept, before its thread
        self.fake._connection(+1)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:  # when its thread is done with it
        try:
            super().shutdown_request(request)
        finally:
            self.fake._connection(-1)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):  # a killed client
            super().handle_error(request, client_address)


class FakeChatServer:
    """Start with `with FakeChatServer(plan) as srv:`; `srv.base_url` is http://127.0.0.1:<port>/v1."""

    def __init__(self, plan: dict[str, list[str]] | None = None, *, delay_s: float = 0.0,
                 expected_key: str = "sk-test-key", port: int = 0):
        self.plan = {q: list(actions) for q, actions in (plan or {}).items()}
        self.delay_s = delay_s
        self.expected_key = expected_key
        self.echo_key_on_401 = False  # OpenAI quotes the (masked) key in its 401 message
        self.send_usage = True  # False: responses carry no `usage` field
        self.calls: list[dict] = []
        self.incomplete: list[dict] = []
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._open = 0
        self._accepted = 0
        self._served: dict[str, int] = {}
        self._httpd = _Server(("127.0.0.1", port), _Handler)
        self._httpd.fake = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def next_action(self, query: str) -> str:
        with self._lock:
            i = self._served.get(query, 0)
            self._served[query] = i + 1
            actions = self.plan.get(query, [])
            return actions[i] if i < len(actions) else "ok"

    def log(self, entry: dict) -> None:
        with self._lock:
            entry["i"] = len(self.calls)
            self.calls.append(entry)

    def log_incomplete(self, entry: dict) -> None:
        with self._lock:
            self.incomplete.append(entry)

    def _connection(self, delta: int) -> None:
        with self._idle:
            self._open += delta
            self._accepted += max(delta, 0)
            if self._open == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Until no connection is open and none was accepted for a few accept polls (a killed client's
        connections close when the kernel reaps it; one it opened just before may still be in the
        listen backlog). Only call when no live client is talking to the server."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while True:
                if not self._idle.wait_for(lambda: self._open == 0, max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"{self._open} connection(s) still open after {timeout_s}s")
                accepted = self._accepted
                self._idle.wait(0.25)  # > a few serve_forever polls (0.05 s)
                if self._open == 0 and self._accepted == accepted:
                    return

    def start(self) -> "FakeChatServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FakeChatServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay_s", type=float, default=0.0)
    args = parser.parse_args()
    srv = FakeChatServer(delay_s=args.delay_s, port=args.port)
    print(f"PORT {srv.port}", flush=True)
    try:
        srv._httpd.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
