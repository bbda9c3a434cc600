"""`twolar <command> ...`: one console script in front of the entry points (each also runs as `python -m`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("twolar_jax.demo", "build, distil and evaluate TWOLAR end to end on the shipped data"),
    "build": ("data_pipeline.build", "build a distillation set (query sources, retrievers, teacher)"),
    "train": ("twolar_jax.train", "distil a distillation set into a T5 student"),
    "eval": ("eval.run", "rerank and evaluate on TREC DL / BEIR"),
    "trec": ("eval.trec", "score a TREC run file against qrels"),
    "rerank": ("eval.rerank_run", "rerank a run file (TREC / rank_llm) with a checkpoint, resumably"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {doc}" for name, (_, doc) in COMMANDS.items()]
        print("usage: twolar <command> [args]\n\ncommands:\n" + "\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    entry = getattr(module, "console_main", None) or module.main
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
