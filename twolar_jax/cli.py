"""`twolar <command> ...`: one console script in front of the entry points (each also runs as `python -m`)."""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": ("twolar_jax.demo", "build, distil and evaluate TWOLAR end to end on the shipped data"),
    "build": ("data_pipeline.set_builder.cli", "build a distillation set (query sources, retrievers, teacher)"),
    "train": ("twolar_jax.train", "distil a distillation set into a T5 student"),
    "eval": ("eval.run", "rerank and evaluate on TREC DL / BEIR"),
    "trec": ("eval.trec", "score a TREC run file against qrels"),
    "rerank": ("eval.rerank_run", "rerank a run file (TREC / rank_llm) with a checkpoint, resumably"),
    "reference": ("eval.reference", "re-run the recorded first-stage scores and diff them"),
    "compile": ("twolar_jax.aot.main", "compile a train or score step for a TPU slice ahead of time (no TPU needed)"),
}


def usage() -> str:
    lines = [f"  {name:<10} {doc}" for name, (_, doc) in COMMANDS.items()]
    return ("usage: twolar <command> [args]   (twolar <command> --help lists its flags and gin files)\n\n"
            "commands:\n" + "\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a command's console entry; its exit code is ours (2 for an unknown command)."""
    if argv is None:  # a process of its own: third-party chatter off the console (entry.quiet_console)
        from twolar_jax import entry

        entry.quiet_console(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv:
        print(f"twolar: error: no command given; expected one of {list(COMMANDS)} (twolar --help)", file=sys.stderr)
        return 2
    if argv[0] not in COMMANDS:
        print(f"twolar: error: unknown command {argv[0]!r}; expected one of {list(COMMANDS)} (twolar --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    entry = getattr(module, "console_main", None) or module.main
    return int(entry(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
