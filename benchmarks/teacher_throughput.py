"""Teacher overhead: calls per second against a loopback server that answers instantly.

Why: a real LLM endpoint serves tens of calls per second at best, so our side (prompt building,
hashing, the durable cache, parsing, asyncio + the openai client) must never be the bottleneck.
The fake chat-completions server runs in its own process (tests/fake_chat_server.py) so it does not
share our GIL; the teacher runs the real sliding-window code with concurrency 64 and an on-disk cache.

    python benchmarks/teacher_throughput.py            # 2,000 queries x 30 passages = 4,000 calls
    python benchmarks/teacher_throughput.py --quick    # 300 queries = 600 calls, well under 60 s

Last line: calls_per_s=<x>  (target >= 200).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data_pipeline.set_builder.llm_client import ChatClient  # noqa: E402
from data_pipeline.set_builder.teacher import ListwiseLLMTeacher, TeacherRequest  # noqa: E402


def start_server() -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_chat_server.py"), "--port", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "PORT":
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line}")
    return proc, int(line[1])


def _cpu_seconds(pid: int) -> float:
    """user+system CPU of a process from /proc (Linux); nan elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 queries (600 calls)")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--passages", type=int, default=30)
    parser.add_argument("--words", type=int, default=60, help="words per passage")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    n_queries = args.queries or (300 if args.quick else 2000)

    filler = " ".join(f"word{i}" for i in range(args.words))
    requests = [TeacherRequest(f"q{i}", f"benchmark query number {i}",
                               tuple(f"passage {j} grade={(i * 7 + j) % 11} {filler}" for j in range(args.passages)))
                for i in range(n_queries)]
    proc, port = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            client = ChatClient(model="bench", base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-bench",
                                timeout_s=30, max_retries=2, max_concurrency=args.concurrency)
            teacher = ListwiseLLMTeacher(client=client, progress=False)
            done = []
            t0, c0 = time.perf_counter(), time.process_time()
            run = teacher.rank_all(requests, done.append, work_dir=Path(tmp), total=len(requests))
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
            teacher.close()
        stats = teacher.call_stats()
        server_cpu = _cpu_seconds(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    calls = stats["successes"]
    print(f"queries={run.labelled} failed={run.failed} calls={calls} attempts={stats['attempts']} "
          f"retries={stats['retries']} concurrency={args.concurrency} cpus={os.cpu_count()} elapsed_s={elapsed:.2f} "
          f"teacher_cpu_s={cpu:.2f} server_cpu_s={server_cpu:.2f} teacher_cpu_ms_per_call={1000 * cpu / max(calls, 1):.2f}")
    print(f"calls_per_s={calls / elapsed:.1f}")


if __name__ == "__main__":
    main()
