"""Entry point for `python -m dsa.train`; see `dsa.training.main`."""

import sys

from dsa.training.main import main

if __name__ == "__main__":
    sys.exit(main())
