"""The `dsa` command: `dsa train ...` (indexer warm-up and sparse fine-tuning) and `dsa eval ...`."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "train the indexer (--stage warmup) or fine-tune with sparse attention (--stage sparse)",
    "eval": "compare dense attention, the attention-mass oracle and DSA: perplexity, recall, passkey",
}


def _usage() -> str:
    lines = ["usage: dsa COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<8} {help_text}" for name, help_text in COMMANDS.items()]
    lines += ["", "Run `dsa COMMAND --help` for the options of a command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from dsa.training.main import main as train_main

        return train_main(rest)
    if command == "eval":
        from dsa.evaluation.main import main as eval_main

        return eval_main(rest)
    print(f"dsa: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
