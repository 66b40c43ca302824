"""The `dsa` command: `dsa train ...` (indexer warm-up and sparse fine-tuning), `dsa eval ...` and
`dsa layers ...`."""

from __future__ import annotations

import os
import sys
from typing import Callable

# Errors that report bad input (a missing file, an invalid option, bad data): the console prints their
# message alone. Anything else keeps its traceback.
INPUT_ERRORS = (ValueError, FileExistsError, FileNotFoundError, NotADirectoryError)

COMMANDS = {
    "train": "train the indexer (--stage warmup) or fine-tune with sparse attention (--stage sparse)",
    "eval": "compare dense attention, the attention-mass oracle and DSA: perplexity, recall, passkey",
    "layers": "rank layers by the perplexity sparse attention costs there, to choose dense_layers",
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
    if command == "layers":
        from dsa.evaluation.layers import main as layers_main

        return layers_main(rest)
    print(f"dsa: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


def run_console(entry: Callable[[list[str] | None], int], prog: str, argv: list[str] | None = None) -> int:
    """Run `entry(argv)` for a console command; print input errors as one line and return 2.

    Set DSA_TRACEBACK=1 to get the full traceback instead.
    """
    try:
        return entry(argv)
    except INPUT_ERRORS as error:
        if os.environ.get("DSA_TRACEBACK") == "1":
            raise
        print(f"{prog}: error: {error}\n(set DSA_TRACEBACK=1 to see the traceback)", file=sys.stderr)
        return 2


def console_main() -> int:
    """Entry point of the installed `dsa` command."""
    argv = sys.argv[1:]
    prog = f"dsa {argv[0]}" if argv and argv[0] in COMMANDS else "dsa"
    return run_console(main, prog, argv)


if __name__ == "__main__":
    sys.exit(console_main())
