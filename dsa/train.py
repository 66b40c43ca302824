"""Entry point for `python -m dsa.train`; see `dsa.training.main`."""

import sys

from dsa.cli import run_console
from dsa.training.main import main

if __name__ == "__main__":
    sys.exit(run_console(main, "dsa train"))
